"""The wheel: built from the project's files, installed in a fresh virtual
environment, importable, typed, and without the repository's other folders."""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*args, **kwargs):
  return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


def test_wheel_installs_in_a_fresh_environment_and_imports(tmp_path):
  run(sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w', str(tmp_path), str(ROOT))
  (wheel,) = tmp_path.glob('kwng_jax-*.whl')
  names = zipfile.ZipFile(wheel).namelist()
  assert 'kwng_jax/py.typed' in names
  assert 'kwng_jax/_src/estimator.py' in names and 'kwng_jax/examples/demo.py' in names
  assert not any(n.startswith(('tests/', 'benchmarks/', 'docs/', 'notebooks/')) for n in names)

  venv = tmp_path / 'venv'
  run(sys.executable, '-m', 'venv', str(venv))
  python = venv / 'bin' / 'python'
  run(str(python), '-m', 'pip', 'install', '-q', str(wheel))
  script = (
      'import pathlib, sys, jax, jax.numpy as jnp, kwng_jax\n'
      'assert pathlib.Path(kwng_jax.__file__).is_relative_to(sys.prefix), kwng_jax.__file__\n'
      "assert (pathlib.Path(kwng_jax.__file__).parent / 'py.typed').exists()\n"
      'x = jax.random.normal(jax.random.key(0), (16, 2))\n'
      "d, info = kwng_jax.natural_gradient({'w': jnp.ones(2)}, lambda p: x * p['w'],"
      " {'w': jnp.ones(2)}, key=jax.random.key(1), num_basis=3)\n"
      'assert bool(jnp.all(jnp.isfinite(d["w"])))\n'
      "heavy = [m for m in sys.modules if m.split('.')[0] in ('sklearn', 'matplotlib', 'flax')]\n"
      'assert not heavy, heavy\n'
      'print(kwng_jax.__version__)\n'
  )
  result = run(str(python), '-c', script, cwd=tmp_path)
  assert result.stdout.strip() == __import__('kwng_jax').__version__
