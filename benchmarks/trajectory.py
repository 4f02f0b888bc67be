r"""Optimization trajectories: natural gradients are invariant to reparametrization.

Minimises :math:`L(\theta) = W_2^2(\rho_\theta, \rho_{\theta^\star})` over
Cholesky-parametrized Gaussians :math:`\rho_\theta = \mathcal N(\mu, AA^\top)`
at d = 2 and d = 10 from one start :math:`\theta_0` (:math:`\mu = 0, A = I`)
with

* gradient descent (its learning rate chosen per parametrization, the one
  with the lowest final loss on a grid of decades),
* the exact Wasserstein natural gradient
  :math:`(G_W + \epsilon I)^{-1}\nabla L` (``kwng_jax.exact``),
* KWNG (``kwng_jax.natural_gradient``, ridgeless, damping 'identity',
  :math:`\epsilon = 10^{-5}`, M = ⌈d√N⌉, fresh samples and basis each
  iteration) for several batch sizes N,

then repeats everything in an ill-conditioned parametrization
:math:`\theta = s \odot \varphi` with :math:`s_j = 10^3` for one coordinate
(the entry :math:`A_{11}`) and 1 elsewhere. A natural gradient is a property
of the model, not of its coordinates, so its iterates — and loss curves — do
not move (up to :math:`\epsilon` and round-off); gradient descent must shrink
its step by about :math:`10^6` to stay stable and then stalls. The loss is
the closed-form Bures :math:`W_2^2` (``kwng_jax.exact.gaussian_wasserstein_sq``),
everything runs in float64.

Run ``python benchmarks/trajectory.py`` (a few minutes on two CPU cores) or
``--quick``. Results: ``trajectory.json`` and ``trajectory.png`` under
``--out`` (default ``benchmarks/results/trajectory``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kwng_jax
from kwng_jax import exact

import common

EPSILON = 1e-5
RESCALE = 1e3
NATURAL_LEARNING_RATE = 0.1
#: A loss this far below the initial one counts as converged.
CONVERGED_FRACTION = 1e-6
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / 'results' / 'trajectory'


@dataclasses.dataclass(frozen=True)
class TrajectoryConfig:
  dims: tuple[int, ...]
  iterations: int
  kwng_samples: dict[int, tuple[int, ...]]  # per d: the batch sizes N
  gd_learning_rates: tuple[float, ...]


FULL = TrajectoryConfig(
    dims=(2, 10),
    iterations=40,
    # At d = 10 a KWNG step with N = 2048 (M = 453) takes seconds on 2 CPU
    # cores: the M×M Gram sums over N·d values.
    kwng_samples={2: (128, 512, 2048), 10: (128, 256, 512)},
    gd_learning_rates=tuple(10.0**-k for k in range(0, 10)),
)

QUICK = TrajectoryConfig(
    dims=(2,),
    iterations=6,
    kwng_samples={2: (128,)},
    gd_learning_rates=(1e-1, 1e-4, 1e-7),
)


def target_theta(dim: int) -> jax.Array:
  r"""The target :math:`\theta^\star`: a Gaussian with correlations.

  d = 2: :math:`\mu^\star = (1, -\tfrac12)`,
  :math:`A^\star = [[1.5, 0], [-0.8, 0.5]]`; otherwise drawn once from a
  NumPy generator seeded with 1: :math:`\mu^\star \sim \mathcal N(0,
  \tfrac14 I)`, :math:`A^\star_{ii} \sim U(0.5, 1.5)`,
  :math:`A^\star_{ij} \sim \mathcal N(0, 0.09)` below the diagonal.
  """
  if dim == 2:
    mu, factor = np.array([1.0, -0.5]), np.array([[1.5, 0.0], [-0.8, 0.5]])
  else:
    rng = np.random.default_rng(1)
    mu = 0.5 * rng.normal(size=dim)
    factor = np.diag(rng.uniform(0.5, 1.5, size=dim))
    factor += np.tril(0.3 * rng.normal(size=(dim, dim)), -1)
  return exact.gaussian_pack(jnp.asarray(mu), jnp.asarray(factor), 'cholesky')


def start_theta(dim: int) -> jax.Array:
  """The start :math:`\\theta_0`: :math:`\\mu = 0`, :math:`A = I`."""
  return exact.gaussian_pack(
      jnp.zeros(dim, jnp.float64), jnp.eye(dim, dtype=jnp.float64), 'cholesky'
  )


def coordinate_scales(dim: int, rescale: float) -> jax.Array:
  """:math:`s`: ``rescale`` at the entry :math:`A_{11}` (index d), 1 elsewhere."""
  num_params = exact.gaussian_num_params(dim, 'cholesky')
  return jnp.ones(num_params, jnp.float64).at[dim].set(rescale)


def make_runner(dim: int, iterations: int, method: str, num_samples: int = 0):
  """A jitted ``(phi0, scales, learning_rate) -> losses`` of one method.

  Works in the coordinates :math:`\\varphi` with :math:`\\theta = s \\odot
  \\varphi`; ``losses`` has ``iterations + 1`` entries, the loss before each
  update and after the last.
  """
  theta_star = target_theta(dim)
  num_basis = min(num_samples, math.ceil(dim * math.sqrt(num_samples)))
  noise_root, basis_root = jax.random.split(jax.random.key(0))

  def run(phi0, scales, learning_rate):
    def loss_fn(phi):
      return exact.gaussian_wasserstein_sq(scales * phi, theta_star, 'cholesky')

    def step(phi, t):
      loss, grads = jax.value_and_grad(loss_fn)(phi)
      if method == 'gd':
        direction = grads
      elif method == 'exact':
        # The pullback of G_W to phi: diag(s) G_W(theta) diag(s).
        metric = exact.gaussian_metric(scales * phi, 'cholesky')
        metric = scales[:, None] * metric * scales[None, :]
        direction = exact.wasserstein_natural_gradient(metric, grads, EPSILON)
      else:
        noise = jax.random.normal(
            jax.random.fold_in(noise_root, t), (num_samples, dim), jnp.float64
        )
        direction, _ = kwng_jax.natural_gradient(
            grads,
            lambda p: exact.gaussian_sample(scales * p, noise, 'cholesky'),
            phi,
            key=jax.random.fold_in(basis_root, t),
            num_basis=num_basis,
            epsilon=EPSILON,
            damping='identity',
        )
      return phi - learning_rate * direction, loss

    phi, losses = jax.lax.scan(step, phi0, jnp.arange(iterations))
    return jnp.concatenate([losses, loss_fn(phi)[None]])

  return jax.jit(run)


def iterations_to_converge(losses: np.ndarray) -> int | None:
  """The first iteration whose loss is at most CONVERGED_FRACTION × the first."""
  below = np.flatnonzero(losses <= CONVERGED_FRACTION * losses[0])
  return int(below[0]) if below.size else None


def max_log_gap(losses_a: np.ndarray, losses_b: np.ndarray) -> float | None:
  r""":math:`\max_t |\log_{10} L_a(t) - \log_{10} L_b(t)|` above a floor.

  Losses are floored at :math:`10^{-12} L(0)`: the Bures formula is exact to
  round-off only, and below that the curves are noise. None if a curve is
  not finite.
  """
  floor = 1e-12 * losses_a[0]
  gap = np.abs(
      np.log10(np.maximum(losses_a, floor)) - np.log10(np.maximum(losses_b, floor))
  )
  return float(np.max(gap)) if np.all(np.isfinite(gap)) else None


def run_dimension(config: TrajectoryConfig, dim: int, progress) -> dict[str, Any]:
  """All methods in both parametrizations at one d."""
  theta0 = start_theta(dim)
  parametrizations = {
      'original': coordinate_scales(dim, 1.0),
      'rescaled': coordinate_scales(dim, RESCALE),
  }
  methods = [('gd', 'gd', 0), ('exact', 'exact', 0)] + [
      (f'kwng N={n}', 'kwng', n) for n in config.kwng_samples[dim]
  ]
  curves: dict[str, dict[str, Any]] = {}
  seconds = {}
  full_precision: dict[str, np.ndarray] = {}
  for label, method, num_samples in methods:
    start = time.perf_counter()
    runner = make_runner(dim, config.iterations, method, num_samples)
    curves[label] = {}
    for name, scales in parametrizations.items():
      phi0 = theta0 / scales
      if method == 'gd':
        learning_rates = jnp.asarray(config.gd_learning_rates, jnp.float64)
        all_losses = np.asarray(
            jax.vmap(runner, in_axes=(None, None, 0))(phi0, scales, learning_rates)
        )
        final = np.where(np.isfinite(all_losses[:, -1]), all_losses[:, -1], np.inf)
        best = int(np.argmin(final))
        losses, learning_rate = all_losses[best], config.gd_learning_rates[best]
      else:
        learning_rate = NATURAL_LEARNING_RATE
        losses = np.asarray(runner(phi0, scales, jnp.asarray(learning_rate, jnp.float64)))
      full_precision[name] = losses
      curves[label][name] = {
          'learning_rate': learning_rate,
          'loss': [float(f'{x:.4g}') for x in losses],
          'final_loss': float(losses[-1]),
          'iterations_to_converge': iterations_to_converge(losses),
      }
      progress.update(1)
    seconds[label] = time.perf_counter() - start
    curves[label]['max_log10_gap'] = max_log_gap(
        full_precision['original'], full_precision['rescaled']
    )
  return {
      'num_params': exact.gaussian_num_params(dim, 'cholesky'),
      'theta0': np.asarray(theta0).tolist(),
      'theta_star': np.asarray(target_theta(dim)).tolist(),
      'rescaled_index': dim,
      'curves': curves,
      'seconds': seconds,
  }


def plot(results: dict[str, Any], out: pathlib.Path) -> str:
  plt = common.pyplot()

  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  dims = list(results['dims'])
  fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4.2), squeeze=False)
  for ax, dim_key in zip(axes[0], dims):
    curves = results['dims'][dim_key]['curves']
    for color, (label, by_param) in zip(colors, curves.items()):
      for name, style in (('original', '-'), ('rescaled', '--')):
        losses = np.maximum(np.asarray(by_param[name]['loss']), 1e-16)
        text = f'{label}, {name}'
        if label == 'gd':
          text += f" (lr {by_param[name]['learning_rate']:.0e})"
        ax.plot(losses, style, color=color, lw=1.3, label=text)
    ax.set(yscale='log', xlabel='iteration', ylabel='W₂²(ρ_θ, ρ_θ*)',
           title=f'{dim_key}: solid θ; dashed θ = s ⊙ φ, one s_j = {RESCALE:g}')
    ax.legend(fontsize=6.5, ncol=2)
  fig.tight_layout()
  common.save_png(fig, out / 'trajectory.png', dpi=90)
  plt.close(fig)
  return 'trajectory.png'


def run(config: TrajectoryConfig, out: pathlib.Path, progress: bool = True) -> dict[str, Any]:
  """Runs every dimension in float64; writes ``trajectory.json`` and the PNG."""
  from tqdm import tqdm

  previous_x64 = jax.config.read('jax_enable_x64')
  jax.config.update('jax_enable_x64', True)
  try:
    start = time.perf_counter()
    total = sum(2 * (2 + len(config.kwng_samples[dim])) for dim in config.dims)
    with tqdm(total=total, desc='trajectory', disable=not progress) as bar:
      dims = {f'd={dim}': run_dimension(config, dim, bar) for dim in config.dims}
    results = {
        'dims': dims,
        'config': {
            'dims': list(config.dims),
            'iterations': config.iterations,
            'kwng_samples': {str(d): list(n) for d, n in config.kwng_samples.items()},
            'gd_learning_rates': list(config.gd_learning_rates),
            'epsilon': EPSILON,
            'rescale': RESCALE,
            'natural_learning_rate': NATURAL_LEARNING_RATE,
            'converged_fraction': CONVERGED_FRACTION,
            'kwng': 'ridgeless, damping identity, gaussian kernel, '
                    "bandwidth 'mean_distance', M = ceil(d sqrt(N)), fresh "
                    'samples and basis each iteration, no fallback or clipping',
            'gd_learning_rate': 'per parametrization, the grid value with the '
                                'lowest final loss',
            'dtype': 'float64',
        },
        'environment': {
            'jax': jax.__version__,
            'kwng_jax': kwng_jax.__version__,
            'device': str(jax.devices()[0]),
            'platform': platform.platform(),
        },
        'total_seconds': time.perf_counter() - start,
    }
    out.mkdir(parents=True, exist_ok=True)
    results['plots'] = [plot(results, out)]
    with open(out / 'trajectory.json', 'w') as f:
      json.dump(results, f, indent=1)
    return results
  finally:
    jax.config.update('jax_enable_x64', previous_x64)


def print_summary(results: dict[str, Any]) -> None:
  for dim_key, result in results['dims'].items():
    print(dim_key)
    for label, by_param in result['curves'].items():
      parts = [
          f"{name}: final {by_param[name]['final_loss']:.3g}, "
          f"converged at {by_param[name]['iterations_to_converge']}"
          for name in ('original', 'rescaled')
      ]
      print(f"  {label}: {'; '.join(parts)}; max log10 gap {by_param['max_log10_gap']}")
  print(f"total {results['total_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='d = 2 only, a few iterations (seconds; for CI)')
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT,
                      help='folder for trajectory.json and trajectory.png')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  results = run(QUICK if args.quick else FULL, args.out, progress=not args.no_progress)
  print_summary(results)
  return results


if __name__ == '__main__':
  main()
