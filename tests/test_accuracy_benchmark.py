"""The quick variants of the accuracy and trajectory benchmarks, end to end.

They run in float64 (the scripts switch it on and restore it), under the
strict promotion rules of conftest.py, into a temporary folder.
"""

import importlib.util
import json
import pathlib
import sys

import jax
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'


def load_script(name):
  """Imports benchmarks/<name>.py (not a package) as a module."""
  module_name = f'benchmark_{name}'
  if module_name in sys.modules:
    return sys.modules[module_name]
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their sibling ``common``
  spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  # Dataclasses look their module up in sys.modules while it executes.
  sys.modules[module_name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def accuracy_results(tmp_path_factory):
  out = tmp_path_factory.mktemp('accuracy')
  x64_before = jax.config.read('jax_enable_x64')
  load_script('accuracy').main(['--quick', '--no-progress', '--out', str(out)])
  # The script switches float64 on and must restore the flag.
  assert jax.config.read('jax_enable_x64') == x64_before
  return out


def test_accuracy_quick_writes_json_and_plots(accuracy_results):
  results = json.loads((accuracy_results / 'accuracy.json').read_text())
  for study in ('n_sweep', 'm_sweep', 'bandwidth_sweep', 'variants', 'lognormal', 'targets'):
    assert results[study], study
  for name in results['plots']:
    assert (accuracy_results / name).stat().st_size > 0


def test_accuracy_error_decreases_with_samples(accuracy_results):
  results = json.loads((accuracy_results / 'accuracy.json').read_text())
  for dim in (1, 2):
    table = results['n_sweep'][f'd={dim}']['kwng']
    error = dict(zip(table['num_samples'], table['median']))
    assert error[4096] < error[256], (dim, error)


def test_accuracy_kwng_beats_naive_on_cholesky_gaussian(accuracy_results):
  # At d = 2 the Cholesky tangents are not gradient fields: the naive metric
  # is biased, KWNG's projection is not.
  results = json.loads((accuracy_results / 'accuracy.json').read_text())
  tables = results['n_sweep']['d=2']
  i = tables['kwng']['num_samples'].index(4096)
  assert tables['kwng']['median'][i] < 0.5 * tables['naive']['median'][i]


def test_accuracy_rejects_bad_seeds():
  with pytest.raises(ValueError, match='--seeds'):
    load_script('accuracy').main(['--quick', '--seeds', '0'])


def test_trajectory_quick_natural_gradients_are_invariant(tmp_path):
  load_script('trajectory').main(['--quick', '--no-progress', '--out', str(tmp_path)])
  results = json.loads((tmp_path / 'trajectory.json').read_text())
  assert (tmp_path / 'trajectory.png').stat().st_size > 0
  curves = results['dims']['d=2']['curves']
  for label, by_param in curves.items():
    losses = by_param['original']['loss']
    assert losses[-1] < losses[0], label
  # Natural gradients follow the same path in both parametrizations (up to
  # the damping epsilon = 1e-5, which is not reparametrized); gradient descent
  # does not.
  assert curves['exact']['max_log10_gap'] < 1e-4
  assert curves['kwng N=128']['max_log10_gap'] < 1e-4
  assert curves['gd']['max_log10_gap'] > 0.1
