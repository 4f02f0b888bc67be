"""The teaching notebooks under notebooks/.

Each notebook is a jupytext ``py:percent`` file paired with its ``.ipynb``.
The tests check that every notebook executes at its small default parameters
(in a fresh Jupyter kernel running this interpreter, so with JAX's standard
dtype promotion rather than the strict one this test session sets), that its
"Open in Colab" badge points at a file of this repository, that the ``.py``
and the ``.ipynb`` hold the same cells, and that the shape the notebooks
promise (badge, Colab-only install cell, parameters cell, plots) is there.

One test per notebook executes it, so ``pytest -n 2`` runs two at a time.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys

import jupytext
import nbclient
import nbformat
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / 'notebooks'
NOTEBOOK_NAMES = (
    '01_quickstart',
    '02_flax_nnx_classification',
    '03_implicit_generative_model',
    '04_kernels_and_diagnostics',
)
COLAB_PREFIX = 'https://colab.research.google.com/github/kwng-jax/kwng_jax/blob/main/'
COLAB_LINK = re.compile(r'\((https://colab\.research\.google\.com/github/[^)\s]+)\)')
# Generous: a safety net against a hung kernel, not a speed requirement.
CELL_TIMEOUT_SECONDS = 900
# The test session forces 8 fake CPU devices (conftest.py); notebooks should
# see the machine as a user would.
FAKE_DEVICES_FLAG = re.compile(r'--xla_force_host_platform_device_count=\S+')

KERNEL_PROBE = """\
import json, sys
import jax
print('KERNEL_PROBE ' + json.dumps({
    'executable': sys.executable,
    'dtype_promotion': jax.config.jax_numpy_dtype_promotion,
    'rank_promotion': jax.config.jax_numpy_rank_promotion,
}))
"""


def _paths(name: str) -> tuple[pathlib.Path, pathlib.Path]:
  return NOTEBOOKS_DIR / f'{name}.py', NOTEBOOKS_DIR / f'{name}.ipynb'


def _read_ipynb(name: str) -> nbformat.NotebookNode:
  _, ipynb_path = _paths(name)
  return nbformat.read(ipynb_path, as_version=4)


def _code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
  return [cell for cell in notebook.cells if cell.cell_type == 'code']


def _kernel_env() -> dict[str, str]:
  env = dict(os.environ)
  flags = FAKE_DEVICES_FLAG.sub('', env.get('XLA_FLAGS', '')).strip()
  if flags:
    env['XLA_FLAGS'] = flags
  else:
    env.pop('XLA_FLAGS', None)
  # Let ipykernel choose its inline backend, so plots become image outputs.
  env.pop('MPLBACKEND', None)
  return env


def _kernel_manager() -> KernelManager:
  """A manager for ipykernel's own 'python3' spec, i.e. this interpreter.

  No kernel_dirs: a 'python3' spec a user installed elsewhere (pointing at
  another Python) must not be picked up instead.
  """
  spec_manager = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)
  return KernelManager(kernel_name='python3', kernel_spec_manager=spec_manager)


@pytest.mark.parametrize('name', NOTEBOOK_NAMES)
def test_notebook_executes(name, tmp_path):
  notebook = _read_ipynb(name)
  notebook.cells.append(nbformat.v4.new_code_cell(KERNEL_PROBE))
  client = nbclient.NotebookClient(
      notebook,
      km=_kernel_manager(),
      timeout=CELL_TIMEOUT_SECONDS,
      resources={'metadata': {'path': str(tmp_path)}},
  )
  # Raises CellExecutionError, with the cell and its traceback, on any error.
  client.execute(env=_kernel_env())

  outputs = [output for cell in _code_cells(notebook) for output in cell.outputs]
  stdout = ''.join(
      output.get('text', '') for output in outputs
      if output.output_type == 'stream' and output.name == 'stdout'
  )
  assert 'devices:' in stdout, 'the notebook should print jax.devices()'
  images = [
      output for output in outputs
      if output.output_type in ('display_data', 'execute_result')
      and 'image/png' in output.get('data', {})
  ]
  assert images, 'the notebook should end with plots'

  probe_line = next(
      line for line in stdout.splitlines() if line.startswith('KERNEL_PROBE ')
  )
  probe = json.loads(probe_line[len('KERNEL_PROBE '):])
  assert pathlib.Path(probe['executable']).resolve() == pathlib.Path(sys.executable).resolve()
  # The kernel is a separate process: the strict promotion of this test
  # session does not reach it, and users run the notebooks with the default.
  assert probe['dtype_promotion'] == 'standard'
  assert probe['rank_promotion'] == 'allow'


@pytest.mark.parametrize('name', NOTEBOOK_NAMES)
def test_colab_badge_points_at_this_notebook(name):
  py_path, _ = _paths(name)
  notebook = _read_ipynb(name)
  first = notebook.cells[0]
  assert first.cell_type == 'markdown'
  assert 'colab-badge.svg' in first.source
  links = COLAB_LINK.findall(first.source)
  assert links, f'{name}: no Open-in-Colab link in the first cell'
  assert links[0] == f'{COLAB_PREFIX}notebooks/{name}.ipynb'
  every_link = set(COLAB_LINK.findall(py_path.read_text()))
  for cell in notebook.cells:
    if cell.cell_type == 'markdown':
      every_link.update(COLAB_LINK.findall(cell.source))
  for link in every_link:
    assert link.startswith(COLAB_PREFIX), f'{link} is not on kwng-jax/kwng_jax main'
    relative = link[len(COLAB_PREFIX):]
    assert (REPO_ROOT / relative).is_file(), f'{link} points at a missing file {relative}'


@pytest.mark.parametrize('name', NOTEBOOK_NAMES)
def test_py_and_ipynb_hold_the_same_cells(name):
  py_path, _ = _paths(name)
  from_py = jupytext.read(py_path, fmt='py:percent')
  from_ipynb = _read_ipynb(name)
  assert _code_cells(from_py), f'{py_path} has no code cells'
  assert [c.source for c in _code_cells(from_py)] == [
      c.source for c in _code_cells(from_ipynb)
  ], f'{name}.py and {name}.ipynb differ: run jupytext --sync notebooks/{name}.py'
  assert [(c.cell_type, c.source) for c in from_py.cells] == [
      (c.cell_type, c.source) for c in from_ipynb.cells
  ], f'the prose of {name}.py and {name}.ipynb differs: run jupytext --sync'
  for cell in _code_cells(from_ipynb):
    assert not cell.outputs and cell.execution_count is None, (
        f'{name}.ipynb stores outputs; commit it without them'
    )


@pytest.mark.parametrize('name', NOTEBOOK_NAMES)
def test_notebook_layout(name):
  """Badge, then the Colab-only install cell, then the parameters cell."""
  code = _code_cells(_read_ipynb(name))
  install, parameters = code[0], code[1]

  assert "'google.colab' in sys.modules" in install.source
  assert 'git+https://github.com/kwng-jax/kwng_jax' in install.source
  assert 'pip' in install.source
  # Colab's jax must be left alone: no upgrades, no pinned jax.
  assert not re.search(r"(^|[\s'\"])(-U|--upgrade)([\s'\"]|$)", install.source)
  assert not re.search(r'\bjax(lib)?\s*[=<>~!]', install.source)

  assert 'parameters' in parameters.metadata.get('tags', [])
  assignments = [
      line for line in parameters.source.splitlines()
      if line.strip() and not line.lstrip().startswith('#')
  ]
  assert assignments and all(
      re.match(r'^[A-Z][A-Z0-9_]* = ', line) for line in assignments
  ), 'the parameters cell should hold only UPPER_CASE = value assignments'

  later = '\n'.join(cell.source for cell in code[2:])
  assert 'jax.devices()' in later
  assert 'SEED' in parameters.source and 'SEED' in later
