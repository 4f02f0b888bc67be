"""The public API: what ``import kwng_jax`` gives, imports, and still accepts."""

import subprocess
import sys

import pytest

import kwng_jax


def test_public_names_are_exported():
  for name in kwng_jax.__all__:
    assert getattr(kwng_jax, name) is not None
  assert 'sharding' not in kwng_jax.__all__


def test_import_pulls_in_no_optional_dependency():
  script = (
      'import sys, kwng_jax\n'
      "heavy = ('sklearn', 'matplotlib', 'flax', 'tqdm', 'torch', 'kwng_jax.examples',"
      " 'kwng_jax.flax_utils')\n"
      'print(sorted({m.split(".")[0] if not m.startswith("kwng_jax") else m'
      ' for m in sys.modules if m.startswith(heavy)}))\n'
  )
  result = subprocess.run([sys.executable, '-c', script], capture_output=True,
                          text=True, check=True)
  assert result.stdout.strip() == '[]'


@pytest.mark.parametrize('old, new', [
    ('datasets', 'kwng_jax.examples.datasets'),
    ('models', 'kwng_jax.examples.models'),
    ('transform', 'kwng_jax._src.transform'),
    ('damping', 'kwng_jax._src.adaptive_epsilon'),
])
def test_moved_modules_warn_and_still_resolve(old, new):
  with pytest.warns(DeprecationWarning, match=new):
    module = getattr(kwng_jax, old)
  assert module.__name__ == new


def test_unknown_attribute_is_an_attribute_error():
  with pytest.raises(AttributeError, match='no_such_name'):
    kwng_jax.no_such_name  # noqa: B018
