r"""What KWNG's amortization options cost in accuracy and gain in speed.

On the digits MLP (64–128–10, ReLU) with the paper's ill-conditioned head
(logits multiplied by ``logspace(-6, 1, 10)``), side by side in one process:

* step time and, separately, compile time of SGD, KWNG(M=5), and KWNG(M=5)
  with each option of :func:`kwng_jax.scale_by_kwng`: ``update_every=10``,
  T from a subsample of the batch (``jacobian_samples`` with
  ``jacobian_outputs_fn``), bf16 VJPs (``jacobian_dtype``). All run the
  published chain (adaptive damping, clipping to norm 1, learning rate),
  jitted with params and state donated. A step time is the mean over a
  cycle of ``update_every`` consecutive steps, so a rebuild is paid for in
  full; the median over cycles is reported. Methods are timed in turn, cycle
  by cycle, so that machine load hits all alike;
* the bytes KWNG adds: its optimizer state beyond SGD's, and the M×P
  factor T (T̃ is a second one) that a step holds while building;
* each option's accuracy cost, as the relative error and the cosine of its
  direction against the non-amortized direction with the same basis
  (subsample, bf16) or against a freshly built one k/2 steps after the
  build (update_every), next to the noise floor (two fresh directions with
  different random bases), along the ``update_every`` training run; and, on
  the Cholesky-parametrized Gaussian, the relative error against the exact
  Wasserstein natural gradient of :mod:`kwng_jax.exact`.

Run ``python benchmarks/amortization.py`` (about a minute on two CPU cores;
``--quick`` for a smoke run whose time is mostly compilation). Writes
``amortization.json`` and ``amortization.png`` under ``benchmarks/results/amortization/`` (or
``--out``).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import kwng_jax
from kwng_jax.examples import datasets

import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_BASIS = 5
EPSILON = 1e-5


def init_mlp(key, sizes, dtype=jnp.float32):
  """Weights and biases of an MLP with layer sizes ``sizes``."""
  params = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    weight = jax.random.normal(sub, (fan_in, fan_out), dtype) / np.sqrt(fan_in)
    params.append({'w': weight, 'b': jnp.zeros((fan_out,), dtype)})
  return params


def mlp_logits(params, images, scales):
  """Ill-conditioned logits; computes in the dtype of the params it gets,
  which is what the bf16 VJPs of ``jacobian_dtype`` need."""
  dtype = params[0]['w'].dtype
  hidden = images.reshape(images.shape[0], -1).astype(dtype)
  for layer in params[:-1]:
    hidden = jax.nn.relu(hidden @ layer['w'] + layer['b'][None, :])
  logits = hidden @ params[-1]['w'] + params[-1]['b'][None, :]
  return logits * scales.astype(dtype)[None, :]


def cross_entropy(logits, labels):
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def kwng_optimizer(learning_rate, **options):
  """The published KWNG chain, with amortization options."""
  return kwng_jax.published_kwng(learning_rate, NUM_BASIS, EPSILON, **options)


def methods(config):
  k, n = config['update_every'], config['jacobian_samples']
  lr = config['learning_rate']
  return {
      'sgd': (optax.sgd(config['sgd_learning_rate']), None),
      'kwng': (kwng_optimizer(lr), None),
      'kwng_update_every': (kwng_optimizer(lr, update_every=k), None),
      'kwng_subsample': (kwng_optimizer(lr, jacobian_samples=n), n),
      'kwng_bf16': (kwng_optimizer(lr, jacobian_dtype=jnp.bfloat16), None),
  }


def make_step(opt, scales, jacobian_samples, uses_kwng):
  def step(params, state, images, labels):
    outputs_fn = lambda p: mlp_logits(p, images, scales)
    loss, grads = jax.value_and_grad(lambda p: cross_entropy(outputs_fn(p), labels))(params)
    if not uses_kwng:
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss
    extra = {}
    if jacobian_samples is not None:
      # The VJPs that give T run on the first n images only.
      extra['jacobian_outputs_fn'] = lambda p: mlp_logits(p, images[:jacobian_samples], scales)
    updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss, **extra)
    return optax.apply_updates(params, updates), state, loss
  return step


def tree_nbytes(tree):
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def compare(a, b):
  """How far direction a is from direction b (all leaves), as device scalars.

  ``relative_error`` is ||a - b|| / ||b||; ``cosine`` is <a, b>/(||a|| ||b||),
  what matters after the chain clips the direction to norm 1 (its norm is
  of order 1/epsilon, so clipping is active at almost every step).
  """
  flat = lambda t: jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(t)])
  a, b = flat(a), flat(b)
  norm_a, norm_b = jnp.linalg.norm(a), jnp.linalg.norm(b)
  return {'relative_error': jnp.linalg.norm(a - b) / norm_b,
          'cosine': jnp.dot(a, b) / (norm_a * norm_b)}


def batches(split, batch_size, key):
  """An endless stream of shuffled training batches (device arrays)."""
  images = jnp.asarray(split.train_images)
  labels = jnp.asarray(split.train_labels)
  num = images.shape[0] // batch_size * batch_size
  epoch = 0
  while True:
    order = jax.random.permutation(jax.random.fold_in(key, epoch), images.shape[0])[:num]
    for start in range(0, num, batch_size):
      index = order[start:start + batch_size]
      yield images[index], labels[index]
    epoch += 1


def time_methods(config, split, scales, params0):
  """Compile times, per-step times (mean over a cycle), final loss and state."""
  rows = {}
  runners = {}
  images, labels = next(batches(split, config['batch_size'], jax.random.key(0)))
  for name, (opt, jacobian_samples) in methods(config).items():
    # Copies give every leaf its own buffer, which donation needs (an init
    # may use one zero array for several fields).
    state = jax.tree.map(jnp.copy, opt.init(params0))
    # Params and state are donated, as in a training loop: otherwise every
    # step copies the stored factors of update_every into a fresh state.
    step = jax.jit(make_step(opt, scales, jacobian_samples, uses_kwng=name != 'sgd'),
                   donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = step.lower(params0, state, images, labels).compile()
    compile_s = time.perf_counter() - start
    runners[name] = {'step': compiled, 'params': jax.tree.map(jnp.copy, params0), 'state': state,
                     'stream': batches(split, config['batch_size'], jax.random.key(1)),
                     'times': [], 'losses': []}
    rows[name] = {'name': name, 'compile_s': compile_s, 'state_bytes': tree_nbytes(state)}

  cycle = config['update_every']
  total = (config['warmup_cycles'] + config['timed_cycles']) * len(runners)
  with tqdm(total=total, desc='timing steps', file=sys.stdout) as bar:
    for index in range(config['warmup_cycles'] + config['timed_cycles']):
      for name, run in runners.items():
        # The batches are fetched before the clock starts.
        data = [next(run['stream']) for _ in range(cycle)]
        params, state = jax.block_until_ready((run['params'], run['state']))
        start = time.perf_counter()
        for images, labels in data:
          params, state, loss = run['step'](params, state, images, labels)
        jax.block_until_ready((params, state, loss))
        seconds = (time.perf_counter() - start) / cycle
        run['params'], run['state'] = params, state
        run['losses'].append(float(loss))
        if index >= config['warmup_cycles']:
          run['times'].append(seconds)
        bar.update()

  test_images = jnp.asarray(split.test_images)
  test_labels = jnp.asarray(split.test_labels)
  sgd_ms = 1e3 * statistics.median(runners['sgd']['times'])
  for name, run in runners.items():
    step_ms = 1e3 * statistics.median(run['times'])
    predictions = jnp.argmax(mlp_logits(run['params'], test_images, scales), axis=1)
    rows[name].update(
        step_ms=step_ms,
        step_ms_spread=[1e3 * min(run['times']), 1e3 * max(run['times'])],
        step_ratio_vs_sgd=step_ms / sgd_ms,
        final_train_loss=run['losses'][-1],
        test_accuracy=float(jnp.mean(predictions == test_labels)),
        steps_trained=len(run['losses']) * cycle,
    )
  return list(rows.values()), runners


def accuracy_errors(config, split, scales, runner):
  """Each option's direction against the default one, along the training
  run of ``kwng_update_every`` (continued from where the timing left it).

  Every ``update_every`` steps, k/2 steps after a build, at the current
  params, batch and (adapted) epsilon: the subsample and the bf16
  directions against the default direction with the same basis; the
  direction of the stored, k/2-step-old factors against a fresh one; and,
  as the noise floor, two fresh directions with different random bases.
  """
  n, k = config['jacobian_samples'], config['update_every']

  @jax.jit
  def errors_at(params, state, images, labels, key):
    outputs_fn = lambda p: mlp_logits(p, images, scales)
    grads = jax.grad(lambda p: cross_entropy(outputs_fn(p), labels))(params)
    epsilon = optax.tree_utils.tree_get(state, 'kwng_epsilon')
    stored = optax.tree_utils.tree_get(state, 'kwng_preconditioner')
    direction = functools.partial(
        kwng_jax.natural_gradient, grads, outputs_fn, params, num_basis=NUM_BASIS,
        epsilon=epsilon)
    reference, _ = direction(key=key)
    others = {
        'kwng_subsample': direction(
            key=key, jacobian_samples=n,
            jacobian_outputs_fn=lambda p: mlp_logits(p, images[:n], scales))[0],
        'kwng_bf16': direction(key=key, jacobian_dtype=jnp.bfloat16)[0],
        'kwng_update_every': kwng_jax.apply_preconditioner(stored, grads, epsilon)[0],
        'noise_floor': direction(key=jax.random.fold_in(key, 1))[0],
    }
    return {name: compare(other, reference) for name, other in others.items()}

  errors = {name: [] for name in ('kwng_subsample', 'kwng_bf16', 'kwng_update_every',
                                  'noise_floor')}
  params, state = runner['params'], runner['state']
  for cycle in tqdm(range(config['accuracy_cycles']), desc='direction errors', file=sys.stdout):
    for step_index in range(k):
      images, labels = next(runner['stream'])
      if step_index == k // 2:
        key = jax.random.key(100 + cycle)
        for name, error in errors_at(params, state, images, labels, key).items():
          errors[name].append(jax.tree.map(float, error))
      params, state, _ = runner['step'](params, state, images, labels)
  same_basis = {name: errors[name] for name in ('kwng_subsample', 'kwng_bf16', 'noise_floor')}
  staleness = {'kwng_update_every': errors['kwng_update_every'],
               'noise_floor': errors['noise_floor']}
  return same_basis, staleness


def gaussian_errors(config):
  """Relative error against the exact Wasserstein natural gradient of a
  Cholesky-parametrized 2-D Gaussian, float32."""
  try:
    from kwng_jax import exact
  except ImportError:
    return None
  num_samples, num_basis = config['gaussian_samples'], config['gaussian_basis']
  theta = jnp.array([0.3, -0.5, 1.0, 0.5, 0.8])
  grads = jnp.asarray(np.random.default_rng(0).normal(size=5), jnp.float32)
  with jax.default_matmul_precision('highest'):  # an exact reference, also on GPUs.
    target = exact.wasserstein_natural_gradient(
        exact.gaussian_metric(theta, 'cholesky'), grads, EPSILON)
  options = {
      'kwng': {},
      'kwng_subsample': dict(jacobian_samples=num_samples // 4),
      'kwng_bf16': dict(jacobian_dtype=jnp.bfloat16),
  }

  @jax.jit
  def errors_of_one_draw(noise, key):
    outputs_fn = lambda th: exact.gaussian_sample(th, noise, 'cholesky')
    return {
        name: compare(kwng_jax.natural_gradient(
            grads, outputs_fn, theta, key=key, num_basis=num_basis, epsilon=EPSILON,
            damping='identity', **opts)[0], target)
        for name, opts in options.items()
    }

  errors = {name: [] for name in options}
  for seed in tqdm(range(config['gaussian_draws']), desc='exact Gaussian', file=sys.stdout):
    noise = jax.random.normal(jax.random.key(seed), (num_samples, 2))
    for name, error in errors_of_one_draw(noise, jax.random.key(100 + seed)).items():
      errors[name].append(jax.tree.map(float, error))
  return errors


def summary(errors):
  """Median (and worst) relative error and cosine of each comparison."""
  out = {}
  for name, draws in errors.items():
    rel = [d['relative_error'] for d in draws]
    cos = [d['cosine'] for d in draws]
    out[name] = {'median': float(np.median(rel)), 'max': float(np.max(rel)),
                 'median_cosine': float(np.median(cos)), 'min_cosine': float(np.min(cos)),
                 'count': len(draws)}
  return out


def plot(payload, path):
  plt = common.pyplot()

  fig, (ax_time, ax_cos, ax_exact) = plt.subplots(1, 3, figsize=(15, 4.2))
  rows = payload['methods']
  ax_time.bar([r['name'] for r in rows], [r['step_ratio_vs_sgd'] for r in rows])
  ax_time.axhline(1.0, color='k', lw=0.5, label='SGD')
  ax_time.set_ylabel('step time / SGD step (mean over cycles)')
  ax_time.set_title(f"step time ({payload['device']['platform']})")
  ax_time.tick_params(axis='x', rotation=30, labelsize=8)
  ax_time.legend(fontsize=8)

  acc = payload['accuracy']
  bars = [
      ('subsample\nvs same basis', acc['mlp_same_basis']['kwng_subsample']),
      ('bf16 VJPs\nvs same basis', acc['mlp_same_basis']['kwng_bf16']),
      ('another basis\n(noise floor)', acc['mlp_same_basis']['noise_floor']),
      ('update_every\nstale vs fresh', acc['mlp_staleness']['kwng_update_every']),
      ('fresh vs fresh\n(noise floor)', acc['mlp_staleness']['noise_floor']),
  ]
  ax_cos.bar([b[0] for b in bars], [b[1]['median_cosine'] for b in bars],
             color=['tab:orange', 'tab:orange', 'tab:gray', 'tab:orange', 'tab:gray'])
  ax_cos.set_ylim(min(0.0, min(b[1]['median_cosine'] for b in bars)), 1.0)
  ax_cos.set_ylabel('median cosine of the directions')
  ax_cos.set_title('digits MLP: agreement of directions')
  ax_cos.tick_params(axis='x', labelsize=7)

  if acc.get('gaussian_exact'):
    names = list(acc['gaussian_exact'])
    ax_exact.bar(names, [acc['gaussian_exact'][n]['median'] for n in names], color='tab:green')
    ax_exact.set_ylabel('median relative error vs exact')
    ax_exact.set_title('Cholesky Gaussian: vs exact W-natural gradient')
    ax_exact.tick_params(axis='x', rotation=20, labelsize=8)
  else:
    ax_exact.set_axis_off()
  fig.tight_layout()
  common.save_png(fig, path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='a smoke run: a few steps, one draw of each check')
  parser.add_argument('--out', type=pathlib.Path,
                      default=ROOT / 'benchmarks' / 'results' / 'amortization')
  parser.add_argument('--hidden', type=int, nargs='+', default=[128])
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--timed-cycles', type=int, default=40)
  args = parser.parse_args(argv)

  config = {
      'hidden': args.hidden,
      'batch_size': args.batch_size,
      'num_basis': NUM_BASIS,
      'epsilon': EPSILON,
      'learning_rate': 0.1,
      'sgd_learning_rate': 0.01,
      'update_every': 10,
      'jacobian_samples': args.batch_size // 4,
      'warmup_cycles': 1 if args.quick else 3,
      'timed_cycles': 2 if args.quick else args.timed_cycles,
      'accuracy_cycles': 1 if args.quick else 10,
      'gaussian_samples': 512 if args.quick else 4096,
      'gaussian_basis': 16 if args.quick else 64,
      'gaussian_draws': 1 if args.quick else 5,
      'quick': args.quick,
  }
  split = datasets.load_digits()
  scales = jnp.asarray(datasets.ill_conditioned_scales())
  sizes = [64, *config['hidden'], 10]
  params0 = init_mlp(jax.random.key(0), sizes)
  num_params = sum(x.size for x in jax.tree.leaves(params0))

  rows, runners = time_methods(config, split, scales, params0)
  same_basis, staleness = accuracy_errors(config, split, scales, runners['kwng_update_every'])
  gaussian = gaussian_errors(config)

  sgd_state = next(r['state_bytes'] for r in rows if r['name'] == 'sgd')
  memory = {
      'num_params': int(num_params),
      'factor_bytes': int(NUM_BASIS * num_params * 4),
      'factor_bytes_formula': 'M * P * 4 (T, float32); the whitened T~ is a second one while building',
      'state_bytes_beyond_sgd': {r['name']: r['state_bytes'] - sgd_state for r in rows},
      'stored_factors_formula': '(M + 1) * P * 4 + M * M * 4 + 9 (update_every > 1)',
      'stored_factors_bytes': int((NUM_BASIS + 1) * num_params * 4 + NUM_BASIS**2 * 4 + 9),
  }
  payload = {
      'config': config,
      'device': common.device_description(),
      'methods': rows,
      'memory': memory,
      'accuracy': {
          'mlp_same_basis': summary(same_basis),
          'mlp_staleness': summary(staleness),
          'gaussian_exact': summary(gaussian) if gaussian else None,
      },
  }
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / 'amortization.json').write_text(json.dumps(payload, indent=2))
  plot(payload, args.out / 'amortization.png')

  print(f"\n{'method':20s} {'step ms':>8s} {'×SGD':>6s} {'compile s':>9s} {'state B':>9s} "
        f"{'loss':>7s} {'test acc':>8s}")
  for r in rows:
    print(f"{r['name']:20s} {r['step_ms']:8.3f} {r['step_ratio_vs_sgd']:6.2f} "
          f"{r['compile_s']:9.2f} {memory['state_bytes_beyond_sgd'][r['name']]:9d} "
          f"{r['final_train_loss']:7.3f} {r['test_accuracy']:8.3f}")
  print('\nrelative error of the direction, median (median cosine):')
  for group, stats in payload['accuracy'].items():
    if stats:
      print(f'  {group}: ' + ', '.join(
          f"{k} {v['median']:.3g} (cos {v['median_cosine']:.3f})" for k, v in stats.items()))
  print(f"\nP = {num_params}; T is M×P = {memory['factor_bytes']} bytes; "
        f"stored factors (update_every) = {memory['stored_factors_bytes']} bytes")
  print(f"written to {args.out / 'amortization.json'} and amortization.png")


if __name__ == '__main__':
  main()
