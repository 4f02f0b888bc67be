r"""Does KWNG's ``outputs_fn`` cost a second forward pass? And what would fusing save?

A KWNG training step needs the loss gradient g and, through ``outputs_fn``,
a ``jax.vjp`` of the model's outputs. The documented step runs
``jax.value_and_grad(loss)`` and passes ``outputs_fn`` to the update, which
traces the forward pass a second time. This benchmark compares, per model,
four jitted steps on the same batch:

* ``sgd``: ``value_and_grad`` and an SGD update (the cost of one forward and
  one backward pass);
* ``two_pass``: ``value_and_grad``, then ``optax.chain(scale_by_kwng,
  clip_by_global_norm(1), sgd)`` with ``outputs_fn`` = the model (two traced
  forward passes);
* ``fused``: :func:`kwng_jax.flax_utils.value_grad_and_vjp`: one
  ``jax.vjp``, g = vjp(∂loss/∂outputs), and the pair ``(samples, vjp_fn)``
  passed to the update as ``samples_and_vjp=``, from which
  :func:`kwng_jax.preconditioner_from_vjp` builds the preconditioner (M
  vmapped VJPs, no second forward pass); the JSON of runs before kwng_jax
  0.3 measured a ``custom_vjp`` replay of the forward pass here instead;
* ``stacked``: a prototype beyond what kwng_jax offers: the cotangent of the
  loss is stacked with the M kernel cotangents, so g and the M rows of T come
  from ONE vmapped backward pass of M + 1 cotangents, after one forward pass
  (assembled from the public :mod:`kwng_jax.factors`, :mod:`kwng_jax.kernels`
  and :mod:`kwng_jax.solve`).

For each step it reports the convolution and matrix-product ops of the
lowered program (before XLA optimizes: what was traced) and of the compiled
program (after: what runs), XLA's FLOP estimate, the compile time, and the
median step time (each step ends with ``block_until_ready``; variants are
timed round-robin in one process so that load changes hit them alike). It
also checks that the four KWNG directions agree.

Run (from the repository root)::

  python benchmarks/fused_forward.py                 # MLP, CNN, small ResNet-18 on CPU
  python benchmarks/fused_forward.py --quick         # seconds: MLP only, few steps
  python benchmarks/fused_forward.py --models resnet18 --resnet-width 64 \
      --resnet-image-size 32 --batch-size 128        # the published size (GPU)

Writes ``fused_forward.json`` and ``fused_forward.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kwng_jax
from kwng_jax import factors
from kwng_jax import flax_utils
from kwng_jax import kernels
from kwng_jax import solve
from kwng_jax.examples import datasets
from kwng_jax.examples import models

import common

PyTree = Any
VARIANTS = ('sgd', 'two_pass', 'fused', 'stacked')
DEFAULT_OUT = pathlib.Path(__file__).parent / 'results' / 'fused_forward'
LEARNING_RATE = 0.1
EPSILON = 1e-5
SEED = 0

# Op patterns: lowered StableHLO, compiled HLO on CPU, and the cuDNN / cuBLAS
# custom calls XLA emits for the same ops on GPU.
LOWERED_OPS = {
    'convolution': r'stablehlo\.convolution',
    'matmul': r'stablehlo\.dot_general',
}
COMPILED_OPS = {
    'convolution': r'= \S+ convolution\(|__cudnn\$conv',
    'matmul': r'= \S+ dot\(|__cublas\$gemm|__cublas\$lt\$matmul',
}


def count_ops(text: str, patterns: dict[str, str]) -> dict[str, int]:
  return {name: len(re.findall(p, text)) for name, p in patterns.items()}


def stacked_kwng_direction(
    samples: jax.Array,
    vjp_fn: Callable[[jax.Array], tuple[PyTree]],
    loss_cotangent: jax.Array,
    *,
    key: jax.Array,
    num_basis: int,
    epsilon: float,
) -> tuple[PyTree, PyTree]:
  r"""g and the KWNG direction from one forward pass and one batched backward.

  The published configuration (Gaussian kernel, mean-distance bandwidth,
  'reference' damping, ridgeless) of :func:`kwng_jax.natural_gradient`, with
  the basis drawn from ``key`` as :func:`kwng_jax.scale_by_kwng` draws it,
  and the fallback to g of :func:`kwng_jax.scale_by_kwng`.

  Returns:
    ``(grads, direction)``.
  """
  points = factors.as_sample_matrix(samples).astype(jnp.float32)
  num_samples, dim = points.shape
  indices, coords = factors.select_basis(num_samples, dim, num_basis, key=key)
  basis = points[indices]
  sigma = kernels.select_bandwidth(
      'mean_distance', basis, points, jnp.zeros((), jnp.float32)
  )
  cross = factors.cross_derivatives(
      kernels.resolve_kernel('gaussian'), basis, coords, points, sigma
  )
  gram = factors.basis_gradient_gram(cross)
  kernel_cotangents = (cross / num_samples).astype(samples.dtype)
  cotangents = jnp.concatenate([
      loss_cotangent[None],
      kernel_cotangents.reshape((num_basis,) + samples.shape),
  ])
  (rows,) = jax.vmap(vjp_fn)(cotangents)
  grads = jax.tree.map(lambda r: r[0], rows)
  jacobian = jax.tree.map(lambda r: r[1:], rows)
  whitened, _ = solve.whitened_jacobian(jacobian, gram)
  rows = [jax.tree.map(lambda t, m=m: t[m], whitened) for m in range(num_basis)]
  damping = solve.damping_diagonal(solve.column_squared_norms(rows), 'reference')
  direction = solve.damped_natural_gradient(
      grads, rows, damping, solve.damped_gram(rows, damping), epsilon
  )
  alignment = optax.tree_utils.tree_vdot(grads, direction)
  finite = jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(direction)]
  ))
  use_direction = finite & (alignment > 0)
  direction = jax.tree.map(
      lambda g, d: jnp.where(use_direction, d, g), grads, direction
  )
  return grads, direction


def build_problem(name: str, args: argparse.Namespace):
  """(model, images, labels) of one benchmark model, ill-conditioned head."""
  # The 'rbg' PRNG initializes the model with few small compilations.
  rngs = nnx.Rngs(jax.random.key(SEED, impl='rbg'))
  scales = datasets.ill_conditioned_scales()
  batch = args.batch_size
  if name == 'mlp':
    model = models.MLP(64, (128,), 10, logit_scales=scales, rngs=rngs)
    shape = (batch, 8, 8, 1)
  elif name == 'cnn':
    model = models.CNN(10, logit_scales=scales, rngs=rngs)
    shape = (batch, 8, 8, 1)
  elif name == 'resnet18':
    model = models.ResNet18(
        10, logit_scales=scales, width=args.resnet_width, rngs=rngs
    )
    size = args.resnet_image_size
    shape = (batch, size, size, 3)
  else:
    raise ValueError(f'Unknown model {name!r}; use mlp, cnn or resnet18.')
  key_images, key_labels = jax.random.split(jax.random.key(1))
  images = jax.random.normal(key_images, shape)
  labels = jax.random.randint(key_labels, (batch,), 0, 10)
  return model, images, labels


def make_steps(model: nnx.Module, images: jax.Array, labels: jax.Array, num_basis: int):
  """The four steps, as pure functions ``(params, opt_state) -> (params, opt_state, direction)``."""
  # The non-trained state (BatchNorm statistics in train mode, constants) is
  # held fixed: all four steps run the same forward pass.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  def outputs_fn(p):
    return nnx.merge(graphdef, p, rest)(images)

  def loss_from_outputs(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def loss_fn(p):
    return loss_from_outputs(outputs_fn(p))

  kwng_tx = optax.chain(
      kwng_jax.scale_by_kwng(num_basis, EPSILON, seed=SEED),
      optax.clip_by_global_norm(1.0),
      optax.sgd(LEARNING_RATE),
  )
  post_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(LEARNING_RATE))
  sgd_tx = optax.sgd(LEARNING_RATE)

  def sgd(p, state):
    _, grads = jax.value_and_grad(loss_fn)(p)
    updates, state = sgd_tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, grads

  def two_pass(p, state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, state = kwng_tx.update(grads, state, p, outputs_fn=outputs_fn, value=loss)
    return optax.apply_updates(p, updates), state, updates

  def fused(p, state):
    loss, grads, samples_and_vjp = flax_utils.value_grad_and_vjp(
        loss_from_outputs, outputs_fn, p
    )
    updates, state = kwng_tx.update(grads, state, p, samples_and_vjp=samples_and_vjp,
                                    value=loss)
    return optax.apply_updates(p, updates), state, updates

  def stacked(p, state):
    count, post_state = state
    samples, vjp_fn = jax.vjp(outputs_fn, p)
    loss_cotangent = jax.grad(loss_from_outputs)(samples)
    # The key scale_by_kwng would use at this step.
    key = jax.random.fold_in(jax.random.key(SEED), count)
    _, direction = stacked_kwng_direction(
        samples, vjp_fn, loss_cotangent, key=key, num_basis=num_basis,
        epsilon=EPSILON,
    )
    updates, post_state = post_tx.update(direction, post_state, p)
    return optax.apply_updates(p, updates), (count + 1, post_state), updates

  states = {
      'sgd': sgd_tx.init(params),
      'two_pass': kwng_tx.init(params),
      'fused': kwng_tx.init(params),
      'stacked': (jnp.zeros((), jnp.int32), post_tx.init(params)),
  }
  steps = {'sgd': sgd, 'two_pass': two_pass, 'fused': fused, 'stacked': stacked}
  return params, steps, states


def _flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return None if not analysis else analysis.get('flops')


def benchmark_model(name: str, args: argparse.Namespace, bar) -> dict[str, Any]:
  model, images, labels = build_problem(name, args)
  params, steps, states = make_steps(model, images, labels, args.num_basis)
  result: dict[str, Any] = {
      'num_params': sum(x.size for x in jax.tree.leaves(params)),
      'input_shape': list(images.shape),
      'variants': {},
  }
  compiled = {}
  first_updates = {}
  for variant in VARIANTS:
    lowered = jax.jit(steps[variant]).lower(params, states[variant])
    start = time.perf_counter()
    compiled[variant] = lowered.compile()
    compile_seconds = time.perf_counter() - start
    result['variants'][variant] = {
        'lowered_ops': count_ops(lowered.as_text(), LOWERED_OPS),
        'compiled_ops': count_ops(compiled[variant].as_text(), COMPILED_OPS),
        'flops': _flops(compiled[variant]),
        'compile_seconds': compile_seconds,
    }
    first_updates[variant] = jax.block_until_ready(
        compiled[variant](params, states[variant])[2]
    )
    bar.update(1)

  # The three KWNG steps draw the same basis: their first updates agree.
  reference = first_updates['two_pass']
  norm = optax.tree_utils.tree_norm(reference)
  for variant in ('fused', 'stacked'):
    difference = optax.tree_utils.tree_norm(
        jax.tree.map(jnp.subtract, first_updates[variant], reference)
    )
    result['variants'][variant]['relative_difference_to_two_pass'] = float(
        difference / norm
    )

  carries = {v: (params, states[v]) for v in VARIANTS}
  times = {v: [] for v in VARIANTS}
  for v in VARIANTS:  # warm-up
    for _ in range(2):
      carries[v] = jax.block_until_ready(compiled[v](*carries[v])[:2])
  for _ in range(args.steps):
    for v in VARIANTS:
      start = time.perf_counter()
      carries[v] = jax.block_until_ready(compiled[v](*carries[v])[:2])
      times[v].append(time.perf_counter() - start)
  sgd_median = statistics.median(times['sgd'])
  for v in VARIANTS:
    median = statistics.median(times[v])
    result['variants'][v].update(
        median_step_seconds=median,
        step_seconds=common.spread(times[v]),
        ratio_to_sgd=median / sgd_median,
    )
  bar.update(1)
  return result


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
  plt = common.pyplot()
  names = list(results['models'])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  width = 0.8 / len(VARIANTS)
  for i, variant in enumerate(VARIANTS):
    x = np.arange(len(names)) + (i - (len(VARIANTS) - 1) / 2) * width
    ratios = [results['models'][n]['variants'][variant]['ratio_to_sgd'] for n in names]
    flops = [
        (results['models'][n]['variants'][variant]['flops'] or np.nan)
        / (results['models'][n]['variants']['sgd']['flops'] or np.nan)
        for n in names
    ]
    axes[0].bar(x, ratios, width, label=variant)
    axes[1].bar(x, flops, width, label=variant)
  for ax, title in zip(axes, ('median step time / SGD step', 'XLA FLOP estimate / SGD step')):
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_title(title)
    ax.axhline(1.0, color='gray', lw=0.5)
  axes[0].legend(loc='lower left', fontsize='small')
  device = results['device']
  fig.suptitle(
      f"KWNG M={results['config']['num_basis']}, batch {results['config']['batch_size']}, "
      f"{device['platform']} ({device['device_kind']})"
  )
  fig.tight_layout()
  common.save_png(fig, path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default='mlp,cnn,resnet18',
                      help='comma-separated: mlp, cnn, resnet18')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--num-basis', type=int, default=5)
  parser.add_argument('--steps', type=int, default=20,
                      help='timed steps per variant (after 2 warm-up steps)')
  parser.add_argument('--resnet-width', type=int, default=8,
                      help='ResNet-18 first-stage channels (published: 64)')
  parser.add_argument('--resnet-image-size', type=int, default=16,
                      help='ResNet-18 input height and width (CIFAR: 32)')
  parser.add_argument('--quick', action='store_true',
                      help='MLP only, 3 timed steps: a smoke test')
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.steps = 'mlp', 3
  names = [n.strip() for n in args.models.split(',') if n.strip()]

  results: dict[str, Any] = {
      'device': common.device_description(),
      'config': {k: v for k, v in vars(args).items() if k != 'out'},
      'models': {},
  }
  bar = common.progress(len(names) * (len(VARIANTS) + 1), 'fused_forward')
  for name in names:
    results['models'][name] = benchmark_model(name, args, bar)
    bar.set_postfix_str(name)
  bar.close()

  common.write_json(args.out / 'fused_forward.json', results)
  plot(results, args.out / 'fused_forward.png')
  for name, model_result in results['models'].items():
    print(f'{name} ({model_result["num_params"]} params, input {model_result["input_shape"]}):')
    for variant, r in model_result['variants'].items():
      print(
          f'  {variant:9s} lowered {r["lowered_ops"]} compiled {r["compiled_ops"]} '
          f'GFLOP {(r["flops"] or 0) / 1e9:.3f} compile {r["compile_seconds"]:.1f}s '
          f'step {1e3 * r["median_step_seconds"]:.2f} ms ({r["ratio_to_sgd"]:.2f}x SGD)'
          + (f' rel.diff {r["relative_difference_to_two_pass"]:.1e}'
             if 'relative_difference_to_two_pass' in r else '')
      )
  print(f'wrote {args.out}/fused_forward.json and .png')
  return results


if __name__ == '__main__':
  main()
