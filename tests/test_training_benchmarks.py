"""The training benchmarks: quick variants run end to end and write their JSON.

``benchmarks/classification.py --quick`` and ``benchmarks/speed.py --quick``
run in-process into a temporary folder; the tests check the JSON (every
optimizer present, finite numbers, consistent selections) and the plots.
Speed is never asserted. Smaller tests pin the pieces the quick runs cannot
check: learning-rate selection, the CNN's sequential training path, the
KWNG variants of the GPU speed run.

The benchmarks run optax.adam, optax.contrib.sophia and Flax code, which
strict dtype promotion rejects: those tests use ``standard_promotion``.
"""

import json
import math

import jax
import numpy as np
import optax
import pytest

import kwng_jax



def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


def _image_size(path):
  from PIL import Image  # matplotlib's dependency
  with Image.open(path) as image:
    image.verify()
    return image.size


@pytest.mark.usefixtures('standard_promotion', 'fast_compile')
def test_classification_quick_writes_complete_json(bench, tmp_path):
  classification = bench('classification')
  classification.main(['--quick', '--out', str(tmp_path)])

  payload = json.loads((tmp_path / 'classification.json').read_text())
  names = [m.name for m in classification.methods()]
  assert [m['name'] for m in payload['methods']] == names
  assert 'kfac-jax' in payload['kfac_jax']
  seeds = [0, 1]
  for conditioning in ('well', 'ill'):
    results = {r['method']: r for r in payload['results']
               if (r['model'], r['conditioning']) == ('mlp', conditioning)}
    assert sorted(results) == sorted(names)
    for name, r in results.items():
      grid = next(m['learning_rates'] for m in payload['methods'] if m['name'] == name)
      assert len(grid) == 2
      # The selected learning rate is the grid's best mean validation accuracy.
      best = max(r['by_learning_rate'], key=lambda row: row['val_accuracy']['mean'])
      assert r['selected_learning_rate'] == best['learning_rate']
      assert r['val_accuracy'] == best['val_accuracy']
      assert r['seeds'] == seeds
      assert all(0.0 <= a <= 1.0 for a in r['test_accuracy_per_seed'])
      assert _finite(r['test_accuracy']['mean'])
      # (4 significant digits in the JSON)
      assert np.isclose(r['test_accuracy']['mean'], np.mean(r['test_accuracy_per_seed']), atol=1e-3)
      for curve in r['curves'].values():
        assert np.shape(curve) == (len(seeds), 2)
      assert _finite(r['compile_seconds']) and r['compile_seconds'] > 0
      assert r['reused_compilation'] == (conditioning == 'ill')
      assert len(r['grid_epoch_seconds']) == 2
      assert all(_finite(s) and s > 0 for s in r['grid_epoch_seconds'])

  comparisons = payload['fresh_seeds']
  assert [(c['model'], c['conditioning']) for c in comparisons] == [('mlp', 'well'), ('mlp', 'ill')]
  for comparison in comparisons:
    entries = comparison['entries']
    assert list(entries) == list(classification.COMPARED)
    for entry in entries.values():
      assert len(entry['seeds']) == 2 and not set(entry['seeds']) & set(seeds)
      assert all(0.0 <= a <= 1.0 for a in entry['test_accuracy_per_seed'])
    selected = {r['method']: r for r in payload['results']
                if (r['model'], r['conditioning']) == ('mlp', comparison['conditioning'])}
    assert entries['SGD']['learning_rate'] == selected['SGD']['selected_learning_rate']
    # 'Muon' is the Muon entry with the better validation accuracy.
    muons = [name for name in selected if name.startswith('Muon')]
    assert entries['Muon']['method'] == max(muons, key=lambda m: selected[m]['val_accuracy']['mean'])
    kwngs = classification.TARGETED
    assert sorted(comparison['versus']) == sorted(kwngs)
    for kwng in kwngs:
      versus = comparison['versus'][kwng]
      assert sorted(versus) == sorted(set(classification.COMPARED) - set(kwngs))
      expected = np.mean(np.subtract(entries[kwng]['test_accuracy_per_seed'],
                                     entries['Adam']['test_accuracy_per_seed']))
      assert np.isclose(versus['Adam']['mean'], expected, atol=1e-3)

  targets = payload['targets']
  for key in ('mlp_vs_adam', 'mlp_vs_muon', 'mlp_vs_muon_m20', 'mlp_ill_within_5_of_well',
              'mlp_well_vs_adam'):
    assert isinstance(targets[key]['met'], bool)
  assert np.isclose(targets['mlp_vs_adam']['points'],
                    100 * comparisons[1]['versus']['KWNG']['Adam']['mean'], atol=1e-2)
  for name in ('classification.png', 'classification_fresh_seeds.png'):
    assert min(_image_size(tmp_path / name)) > 200

  markdown = bench('readme_training').render([tmp_path / 'classification.json'], [])
  for name in names + ['Fresh seeds', 'Targets']:
    assert name in markdown


def _run(learning_rate, seed, epochs):
  """A fake grid run whose accuracy curves end at the given values."""
  return {'learning_rate': learning_rate, 'seed': seed,
          'train_loss': np.linspace(2.0, 1.0, epochs),
          'val_accuracy': np.linspace(0.1, 0.5, epochs),
          'test_accuracy': np.linspace(0.1, 0.4, epochs)}


def test_summarize_selects_on_validation_not_test(bench):
  classification = bench('classification')
  runs = []
  for lr, val, test in ((0.1, 0.6, 0.9), (1.0, 0.8, 0.5), (10.0, 0.7, 0.95)):
    for seed in (0, 1):
      run = _run(lr, seed, 3)
      run['val_accuracy'][-1] = val + 0.01 * seed
      run['test_accuracy'][-1] = test
      runs.append(run)
  runs[-1]['train_loss'][-1] = np.nan
  summary = classification.summarize(
      {'runs': runs, 'compile_seconds': 1.0, 'reused_compilation': False,
       'epoch_seconds': [0.1, 0.2, 0.3]}, (0.1, 1.0, 10.0))
  assert summary['selected_learning_rate'] == 1.0
  assert not summary['selected_at_grid_edge']
  assert summary['test_accuracy']['mean'] == pytest.approx(0.5)
  assert summary['val_accuracy']['mean'] == pytest.approx(0.805)
  assert [row['diverged_runs'] for row in summary['by_learning_rate']] == [0, 0, 1]
  assert summary['seconds_per_run_epoch'] == pytest.approx(0.2 / 6)


def test_paired_difference_pairs_runs_by_seed(bench):
  classification = bench('classification')
  a = {'seeds': [100, 101, 102, 103], 'test_accuracy_per_seed': [0.9, 0.8, 0.7, 0.1]}
  b = {'seeds': [102, 101, 100], 'test_accuracy_per_seed': [0.9, 0.8, 0.5]}
  diff = classification.paired_difference(a, b)
  assert diff['mean'] == pytest.approx(0.2 / 3)
  assert diff['wins'] == 1 and diff['ties'] == 1 and diff['runs'] == 3
  assert diff['standard_error'] == pytest.approx(np.std([0.4, 0.0, -0.2], ddof=1) / np.sqrt(3))


@pytest.mark.usefixtures('standard_promotion', 'fast_compile')
def test_sequential_training_matches_vmapped(bench):
  """The CNN's path (Python loop over runs and steps) trains like the vmapped one."""
  classification = bench('classification')
  task = classification.make_task('mlp', hidden=8)
  data = classification.load_data('ill')
  method = next(m for m in classification.methods() if m.name == 'SGD+momentum')
  learning_rates, seeds = [0.1, 0.3], [3, 4]
  curves = []
  for sequential in (False, True):
    trainer = classification.GridTrainer(
        task, method.factory, num_runs=2, batch_size=256,
        num_train=int(data.train_labels.shape[0]), sequential=sequential)
    result = trainer.train(learning_rates, seeds, data, epochs=2)
    curves.append(np.array([run['train_loss'] for run in result['runs']]))
    runs = [(r['learning_rate'], r['seed']) for r in result['runs']]
    assert runs == list(zip(learning_rates, seeds))
  np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)
  # Different learning rates train differently: the grid is not one run repeated.
  assert not np.allclose(curves[0][0], curves[0][1])


@pytest.mark.usefixtures('standard_promotion', 'fast_compile')
def test_speed_quick_writes_complete_json(bench, tmp_path):
  speed = bench('speed')
  speed.main(['--quick', '--out', str(tmp_path)])

  payload = json.loads((tmp_path / 'speed_cpu.json').read_text())
  assert payload['finished'] and payload['device']['platform'] == 'cpu'
  (record,) = payload['models']
  assert record['model'] == 'mlp' and record['batch_size'] == 128
  assert record['num_params'] == 64 * 128 + 128 + 128 * 10 + 10
  entries = record['optimizers']
  assert list(entries) == [
      'SGD', 'Adam', 'floor M=5', 'published M=5', 'floor M=5 + JVP', 'KWNG M=5',
      'floor M=20', 'published M=20', 'floor M=20 + JVP', 'KWNG M=20',
      'KWNG M=5 [stacked]', 'KWNG M=5 [jacobian_samples=None]', 'KWNG M=5 [jacobian_batching=vmap]',
      'KWNG M=5 [jacobian_batching=map]', 'KWNG M=5 [update_every=10]']
  for entry in entries.values():
    assert entry['timed_steps'] == 3 == len(entry['step_seconds'])
    assert len(entry['round_mean_seconds']) == 1
    assert isinstance(entry['temp_bytes'], int) and entry['temp_bytes'] > 0  # CPU reports it
    assert entry['mean_step_ms'] == pytest.approx(1e3 * np.mean(entry['step_seconds']), rel=1e-4)
    for key in ('compile_seconds', 'median_step_ms', 'ratio_to_sgd', 'mean_ratio_to_sgd'):
      assert _finite(entry[key]) and entry[key] > 0
    assert entry['p10_step_ms'] <= entry['median_step_ms'] <= entry['p90_step_ms']
  assert entries['SGD']['ratio_to_sgd'] == 1.0
  # The state of update_every holds the M rows of T̃ and D: (M + 1)·P float32 numbers at least.
  assert entries['SGD']['state_bytes'] == 0
  assert entries['KWNG M=5 [update_every=10]']['state_bytes'] >= 6 * 4 * record['num_params']
  # kwng()'s state: its momentum and the running average of the metric
  # diagonal (2·P float32 numbers) and a few scalars.
  state_bytes = entries['KWNG M=5']['state_bytes']
  assert 8 * record['num_params'] <= state_bytes < 8 * record['num_params'] + 1000
  assert entries['KWNG M=20']['temp_bytes'] > entries['SGD']['temp_bytes']
  # The floors do the VJPs (their scratch memory grows with M), not SGD's step alone.
  assert entries['floor M=20']['temp_bytes'] > entries['floor M=5']['temp_bytes']
  targets = {t['target']: t for t in record['targets']}
  assert targets['KWNG M=5 step / SGD step']['limit'] == 3.0
  assert targets['KWNG M=5 step / SGD step']['value'] == entries['KWNG M=5']['ratio_to_sgd']
  floor = targets['published M=20 step / its floor']
  assert floor['value'] == pytest.approx(  # the JSON keeps 6 significant digits
      entries['published M=20']['median_step_ms'] / entries['floor M=20']['median_step_ms'],
      rel=1e-4)
  assert floor['met'] == (floor['value'] <= 1.2)
  assert 'KWNG M=5 + JVP' not in str(targets) and 'KWNG M=5 step / its floor' in targets
  assert targets['KWNG M=20 compile / SGD compile']['limit'] == 3.0
  assert payload['glibc_malloc_settings'] in (None, {'M_MMAP_THRESHOLD': 32 << 20,
                                                     'M_TRIM_THRESHOLD': 2**31 - 1})
  assert min(_image_size(tmp_path / 'speed_cpu.png')) > 200

  markdown = bench('readme_training').render([], [tmp_path / 'speed_cpu.json'])
  assert all(f'| {name} |' in markdown for name in entries)


def _digits_mlp(speed):
  """The speed benchmark's digits MLP, split for a step, and 64 digits."""
  from flax import nnx
  graphdef, params, rest = nnx.split(speed.build_model('mlp'), nnx.Param, ...)
  images, labels, _ = speed.batch('mlp', 64)
  return graphdef, nnx.as_pure(params), nnx.as_pure(rest), images, labels


@pytest.mark.usefixtures('standard_promotion', 'fast_compile')
def test_speed_floor_step_is_the_sgd_step(bench):
  """The floor runs M VJPs and a JVP but moves the params as SGD does."""
  speed = bench('speed')
  graphdef, params, rest, images, labels = _digits_mlp(speed)
  sgd, floor = optax.sgd(0.1), speed.Floor(5, with_jvp=True)
  sgd_state = (params, rest, sgd.init(params))
  floor_state = (params, rest, floor.init(params))
  sgd_step = jax.jit(speed.make_step(graphdef, sgd, fused=True))
  floor_step = jax.jit(speed.make_step(graphdef, floor, fused=True))
  expected = sgd_step(sgd_state, images, labels)[0][0]
  moved = floor_step(floor_state, images, labels)[0][0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               moved, expected)
  # The compiled floor step does the work of the VJPs: several times SGD's FLOPs.
  def flops(step, state):
    return step.lower(state, images, labels).compile().cost_analysis()['flops']
  assert flops(floor_step, floor_state) > 3 * flops(sgd_step, sgd_state)


def test_speed_variant_options_are_checked(bench):
  speed = bench('speed')
  assert speed.parse_variant('jacobian_samples=32,update_every=5') == {
      'jacobian_samples': 32, 'update_every': 5}
  assert speed.parse_variant('epsilon=1e-3') == {'epsilon': 1e-3}
  with pytest.raises(ValueError, match='not_an_option'):
    speed.parse_variant('not_an_option=3')
  with pytest.raises(ValueError, match='KEY=VALUE'):
    speed.parse_variant('jacobian_samples')


@pytest.mark.usefixtures('standard_promotion', 'fast_compile')
def test_speed_step_with_a_sub_batch_runs_its_vjps_on_it(bench):
  """The jacobian_samples rows pass the model on the first n images."""
  speed = bench('speed')
  graphdef, params, rest, images, labels = _digits_mlp(speed)
  tx = kwng_jax.kwng(num_basis=4, **speed.parse_variant('jacobian_samples=16'))
  step = jax.jit(speed.make_step(graphdef, tx, fused=True, jacobian_rows=16))
  # Without jacobian_outputs_fn the VJPs run on the whole batch, with the same
  # numbers: the MLP's first 16 logits do not depend on the other samples.
  whole_batch = jax.jit(speed.make_step(graphdef, tx, fused=False))
  state = (params, rest, tx.init(params))
  for _ in range(3):
    new_state, loss = step(state, images, labels)
    assert math.isfinite(float(loss))
    moved = jax.tree.map(lambda a, b: a - b, new_state[0], state[0])
    norm = float(optax.tree.norm(moved))
    assert norm > 0.0
    reference = whole_batch(state, images, labels)[0]
    moved_reference = jax.tree.map(lambda a, b: a - b, reference[0], state[0])
    difference = float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, moved, moved_reference)))
    assert difference <= 1e-4 * norm
    state = new_state
  # The step does pass its own jacobian_outputs_fn: 16 rows where KWNG expects 8.
  mismatched = jax.jit(speed.make_step(
      graphdef, kwng_jax.kwng(num_basis=4, jacobian_samples=8), fused=True, jacobian_rows=16))
  with pytest.raises(ValueError, match='jacobian_outputs_fn must return the first'):
    mismatched(state, images, labels)


@pytest.mark.usefixtures('standard_promotion', 'fast_compile')
def test_fused_forward_quick_agrees_with_two_passes(bench, tmp_path):
  """The stacked variant (the loss cotangent in T's backward pass, built from
  kwng_jax.solve's pieces) gives the update of two separate passes."""
  fused_forward = bench('fused_forward')
  fused_forward.main(['--quick', '--models', 'mlp', '--out', str(tmp_path)])
  variants = json.loads((tmp_path / 'fused_forward.json').read_text())['models']['mlp']['variants']
  assert set(variants) == {'sgd', 'two_pass', 'fused', 'stacked'}
  assert variants['fused']['relative_difference_to_two_pass'] < 1e-5
  assert variants['stacked']['relative_difference_to_two_pass'] < 1e-3


def test_compile_cache_quick_reads_the_kwng_step_back(bench, tmp_path, monkeypatch):
  """A second process reads the recommended KWNG step from JAX's persistent
  cache (its HLO is the same from process to process) and the step runs."""
  # Children read JAX options from the environment: skip XLA's optimizations.
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  compile_cache = bench('compile_cache')
  compile_cache.main(['--quick', '--out', str(tmp_path)])

  payload = json.loads((tmp_path / 'compile_cache.json').read_text())
  (record,) = payload['models']
  assert record['model'] == 'mlp' and list(record['optimizers']) == ['SGD', 'KWNG M=5']
  for entry in record['optimizers'].values():
    settings = entry['settings']
    assert list(settings) == ['no cache', 'cold cache', 'warm cache']
    assert settings['no cache']['cache_hit'] == [False]
    assert settings['cold cache']['cache_hit'] == [False]
    assert settings['warm cache']['cache_hit'] == [True]
    for setting in settings.values():
      seconds = setting['lower_seconds'] + setting['compile_seconds']
      assert all(_finite(s) and s > 0 for s in seconds)
      assert setting['median_total_seconds'] == pytest.approx(
          setting['median_lower_seconds'] + setting['median_compile_seconds'], rel=1e-4)
  assert record['optimizers']['SGD']['settings']['warm cache']['total_ratio_to_sgd'] == 1.0
  assert min(_image_size(tmp_path / 'compile_cache.png')) > 200

  markdown = '\n'.join(bench('readme_training').compile_cache_page(
      tmp_path / 'compile_cache.json'))
  assert '| mlp | KWNG M=5 |' in markdown and markdown.count(' | yes |') == 2
