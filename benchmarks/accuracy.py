r"""Accuracy of the KWNG estimator against exact Wasserstein natural gradients.

Reproduces the synthetic Gaussian study of Arbel et al. (ICLR 2020) in
float64 with the ridgeless estimator. For a model with an exact Wasserstein metric
:math:`G_W` (``kwng_jax.exact``), each seed draws N samples, a random basis
and a gradient :math:`g \sim \mathcal N(0, I_P)`, and measures

.. math::
   \mathrm{err} = \frac{\|\hat g - g^\star\|}{\|g^\star\|}, \qquad
   g^\star = (G_W + \epsilon I)^{-1} g, \quad \epsilon = 10^{-5},

for the KWNG direction :math:`\hat g` (``kwng_jax.natural_gradient``) and for
the naive metric :math:`\frac1N\sum_n J_n^\top J_n` of the same samples
(``kwng_jax.exact.naive_metric``), the baseline KWNG is meant to beat.

Models:

* the Cholesky Gaussian :math:`X = \mu + AZ` at :math:`d \in \{1, 2, 5, 10\}`
  (:func:`cholesky_theta`: :math:`\mu = 0`, :math:`A` lower-triangular with
  off-diagonal entries, so that :math:`G_W` differs from the naive metric);
* the log-normal :math:`X = e^{m + sZ}`, :math:`\theta = (m, \log s) = (0,
  \log \tfrac12)`, a one-dimensional non-Gaussian model whose reference is the
  quantile metric :math:`\int_0^1 \partial_\theta Q\,\partial_\theta Q^\top du`.

Studies: error against N (M = ⌈d√N⌉, median and quartiles over the seeds,
log–log slope), against M at fixed N, against the bandwidth multiplier
:math:`10^{-2} \ldots 10^{2}` for the Gaussian and rational-quadratic kernels,
a table of estimator variants (kernel, ridge, damping, naive), and the
log-normal. The accuracy targets are checked and reported (not asserted:
this is a measurement).

Run ``python benchmarks/accuracy.py`` (about 13 minutes of CPU time, most of
it d = 10 at N = 4096 and d = 5 at N = 8192; 27 minutes of wall time on a
shared two-core machine) or ``--quick`` (about a minute, mostly compilation;
for CI). Results: ``accuracy.json`` and PNG plots under
``--out`` (default ``benchmarks/results/accuracy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kwng_jax
from kwng_jax import exact

import common

EPSILON = 1e-5
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / 'results' / 'accuracy'
#: Median relative error targets: (d, N, M) -> threshold.
ERROR_TARGETS = {(2, 4096, 128): 0.03, (5, 4096, 320): 0.05}
SLOPE_TARGET = -0.25
SLOPE_TARGET_DIMS = (1, 2, 5)
NAIVE_RATIO_TARGET = 10.0
NAIVE_RATIO_CONFIG = (2, 4096)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """The grids of one run (full or quick)."""

  seeds: int
  # Error against N.
  sweep_dims: tuple[int, ...]
  sweep_samples: tuple[int, ...]
  max_samples: dict[int, int]  # per d, a cap on N (cost grows like d³N²).
  # Error against M at fixed N.
  basis_dims: tuple[int, ...]
  basis_samples: int
  basis_sizes: tuple[int, ...]
  # Error against the bandwidth multiplier.
  bandwidth_dims: tuple[int, ...]
  bandwidth_samples: int
  log_bandwidths: tuple[float, ...]
  # Variants table, at (d, N) with M = ⌈d√N⌉.
  variant_configs: tuple[tuple[int, int], ...]
  # The log-normal.
  lognormal_samples: tuple[int, ...]


FULL = StudyConfig(
    seeds=20,
    sweep_dims=(1, 2, 5, 10),
    sweep_samples=(64, 128, 256, 512, 1024, 2048, 4096, 8192),
    max_samples={10: 4096},
    basis_dims=(2, 5),
    basis_samples=1024,
    basis_sizes=(4, 8, 16, 32, 64, 128, 256, 512),
    bandwidth_dims=(2, 5),
    bandwidth_samples=1024,
    log_bandwidths=(-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0),
    variant_configs=((2, 4096), (5, 1024)),
    lognormal_samples=(64, 128, 256, 512, 1024, 2048, 4096, 8192),
)

QUICK = StudyConfig(
    seeds=3,
    sweep_dims=(1, 2),
    sweep_samples=(256, 4096),
    max_samples={},
    # The quick grids reuse the N sweep's (N, M) pairs: compiling, not
    # computing, is what takes time at these sizes.
    basis_dims=(2,),
    basis_samples=256,
    basis_sizes=(32,),
    bandwidth_dims=(2,),
    bandwidth_samples=256,
    log_bandwidths=(-1.0, 0.0, 1.0),
    variant_configs=((2, 256),),
    lognormal_samples=(256,),
)

#: Rows of the variants table: (label, method, kernel, damping, ridge).
VARIANTS = (
    ('gaussian, ridgeless, identity', 'kwng', 'gaussian', 'identity', 0.0),
    ('rational quadratic, ridgeless, identity', 'kwng', 'rational_quadratic',
     'identity', 0.0),
    ('gaussian, ridge 1e-6, identity', 'kwng', 'gaussian', 'identity', 1e-6),
    ('gaussian, ridge 1e-3, identity', 'kwng', 'gaussian', 'identity', 1e-3),
    ('gaussian, ridgeless, reference damping', 'kwng', 'gaussian', 'reference',
     0.0),
    ('gaussian, ridgeless, squared damping', 'kwng', 'gaussian', 'squared', 0.0),
    ('naive metric E[JᵀJ]', 'naive', 'gaussian', 'identity', 0.0),
)


# ---------------------------------------------------------------------------
# Models with an exact metric.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  """A sample map with its exact Wasserstein metric at ``theta``.

  Attributes:
    name: a label (also the key in the JSON).
    dim: d, the dimension of one sample.
    theta: the flat float64 parameter vector.
    metric: the exact :math:`G_W(\\theta)`, shape (P, P).
    sample_fn: ``(theta, z) -> samples`` of shape (N, d) for noise z (N, d).
  """

  name: str
  dim: int
  theta: jax.Array
  metric: jax.Array
  sample_fn: Callable[[jax.Array, jax.Array], jax.Array]

  @property
  def num_params(self) -> int:
    return int(self.theta.shape[0])


def cholesky_factor(dim: int) -> np.ndarray:
  r"""The factor :math:`A` of the study: lower-triangular with off-diagonals.

  :math:`A_{ii}` = ``linspace(1, 0.8, d)``, :math:`A_{ij} = 0.5/\sqrt{i}` for
  :math:`j < i` (0-based), so each row's off-diagonal part has norm 1/2; at
  d = 2 this is ``[[1, 0], [0.5, 0.8]]``.
  """
  factor = np.diag(np.linspace(1.0, 0.8, dim))
  for row in range(1, dim):
    factor[row, :row] = 0.5 / math.sqrt(row)
  return factor


def cholesky_theta(dim: int) -> jax.Array:
  """The flat Cholesky parameters (μ = 0, A = :func:`cholesky_factor`)."""
  return exact.gaussian_pack(
      jnp.zeros(dim, jnp.float64), jnp.asarray(cholesky_factor(dim)), 'cholesky'
  )


def gaussian_problem(dim: int) -> Problem:
  theta = cholesky_theta(dim)
  return Problem(
      name=f'gaussian_d{dim}',
      dim=dim,
      theta=theta,
      metric=exact.gaussian_metric(theta, 'cholesky'),
      sample_fn=lambda t, z: exact.gaussian_sample(t, z, 'cholesky'),
  )


#: The log-normal of the study: m = 0, s = 1/2.
LOGNORMAL_THETA = (0.0, math.log(0.5))
QUADRATURE_NODES = 128


def lognormal_samples(theta: jax.Array, z: jax.Array) -> jax.Array:
  """X = exp(m + e^{log s} Z), shape (N, 1) for noise of shape (N, 1)."""
  return jnp.exp(theta[0] + jnp.exp(theta[1]) * z)


def lognormal_problem() -> Problem:
  theta = jnp.asarray(LOGNORMAL_THETA, jnp.float64)
  return Problem(
      name='lognormal',
      dim=1,
      theta=theta,
      metric=exact.quantile_metric(
          exact.lognormal_quantile, theta, num_nodes=QUADRATURE_NODES
      ),
      sample_fn=lognormal_samples,
  )


# ---------------------------------------------------------------------------
# Relative errors over seeds.
# ---------------------------------------------------------------------------


def num_basis_for(dim: int, num_samples: int) -> int:
  """M = ⌈d√N⌉, at most N (the basis points are distinct samples)."""
  return min(num_samples, math.ceil(dim * math.sqrt(num_samples)))


@dataclasses.dataclass(frozen=True)
class Estimator:
  """What estimates the natural gradient: KWNG with its options, or naive."""

  method: str = 'kwng'  # 'kwng' or 'naive'
  kernel: str = 'gaussian'
  damping: str = 'identity'
  ridge: float = 0.0


def draw_gradients(problem: Problem, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""Per seed: :math:`g \sim \mathcal N(0, I_P)` and its target :math:`(G_W + \epsilon I)^{-1} g`."""

  def one_seed(key):
    grads = jax.random.normal(
        jax.random.fold_in(key, 2), (problem.num_params,), jnp.float64
    )
    return grads, exact.wasserstein_natural_gradient(problem.metric, grads, EPSILON)

  return jax.jit(jax.vmap(one_seed))(keys)


def make_error_fn(
    problem: Problem,
    num_samples: int,
    num_basis: int,
    estimator: Estimator,
) -> Callable[..., jax.Array]:
  """A jitted ``(key, grads, target, log_bandwidth, ridge) -> relative error``.

  The key gives the noise Z and the basis (g and its target come from
  :func:`draw_gradients` of the same key), so every estimator sees the same Z
  and g and the rows of a table are paired. ``log_bandwidth`` and ``ridge``
  are traced: one compilation serves a whole bandwidth sweep, or both ridge
  values (``ridge`` is ignored, and the ridgeless code path is compiled,
  when ``estimator.ridge == 0``). Seeds are looped over in Python: a vmap
  over them would not run faster on the CPU and compiles slower.
  """

  def error(key, grads, target, log_bandwidth, ridge):
    noise = jax.random.normal(
        jax.random.fold_in(key, 0), (num_samples, problem.dim), jnp.float64
    )

    def outputs_fn(theta):
      return problem.sample_fn(theta, noise)

    if estimator.method == 'naive':
      naive = exact.naive_metric(outputs_fn, problem.theta)
      estimate = exact.wasserstein_natural_gradient(naive, grads, EPSILON)
    else:
      estimate, _ = kwng_jax.natural_gradient(
          grads,
          outputs_fn,
          problem.theta,
          key=jax.random.fold_in(key, 1),
          num_basis=num_basis,
          epsilon=EPSILON,
          kernel=estimator.kernel,
          log_bandwidth=log_bandwidth,
          damping=estimator.damping,
          ridge=ridge if estimator.ridge > 0 else 0.0,
      )
    return jnp.linalg.norm(estimate - target) / jnp.linalg.norm(target)

  return jax.jit(error)


class ErrorStudy:
  """Computes (and caches) per-seed relative errors of one configuration.

  Compiled functions are cached per (problem, N, M, estimator) and results
  per (..., log_bandwidth), so configurations shared between studies (the
  reference rows of the table are points of the N sweep) run once.
  """

  def __init__(self, num_seeds: int):
    root = jax.random.key(0)
    self.keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(
        jnp.arange(num_seeds)
    )
    self._gradients: dict[str, tuple[jax.Array, jax.Array]] = {}
    self._functions: dict[Any, Callable] = {}
    self._results: dict[Any, np.ndarray] = {}
    self.seconds: dict[str, float] = {}

  def errors(
      self,
      problem: Problem,
      num_samples: int,
      num_basis: int,
      estimator: Estimator = Estimator(),
      log_bandwidth: float = 0.0,
  ) -> np.ndarray:
    """Relative errors, one per seed, as a float64 NumPy array."""
    if estimator.method == 'naive':
      num_basis, log_bandwidth = 0, 0.0  # unused by the naive metric
    fn_key = (problem.name, num_samples, num_basis,
              dataclasses.replace(estimator, ridge=float(estimator.ridge > 0)))
    result_key = (problem.name, num_samples, num_basis, estimator, log_bandwidth)
    if result_key in self._results:
      return self._results[result_key]
    start = time.perf_counter()
    if fn_key not in self._functions:
      self._functions[fn_key] = make_error_fn(
          problem, num_samples, num_basis, estimator
      )
    error_fn = self._functions[fn_key]
    if problem.name not in self._gradients:
      self._gradients[problem.name] = draw_gradients(problem, self.keys)
    grads, targets = self._gradients[problem.name]
    log_bandwidth_value = jnp.asarray(log_bandwidth, jnp.float64)
    ridge_value = jnp.asarray(estimator.ridge, jnp.float64)
    errors = [
        error_fn(key, g, target, log_bandwidth_value, ridge_value)
        for key, g, target in zip(self.keys, grads, targets)
    ]
    errors = np.asarray(jax.block_until_ready(errors), dtype=np.float64)
    label = f'{problem.name} N={num_samples} M={num_basis} {estimator} log_bw={log_bandwidth}'
    self.seconds[label] = time.perf_counter() - start
    self._results[result_key] = errors
    return errors


def summarize(errors: np.ndarray) -> dict[str, Any]:
  """Median, quartiles and the per-seed values (4 significant digits)."""
  q25, median, q75 = np.percentile(errors, [25, 50, 75])
  return {
      'median': float(median),
      'q25': float(q25),
      'q75': float(q75),
      'errors': [float(f'{e:.4g}') for e in errors],
  }


def loglog_slope(num_samples: list[int], medians: list[float]) -> float:
  """Least-squares slope of log(median error) against log(N)."""
  slope, _ = np.polyfit(np.log(num_samples), np.log(medians), 1)
  return float(slope)


# ---------------------------------------------------------------------------
# The studies.
# ---------------------------------------------------------------------------


def plan_jobs(config: StudyConfig) -> list[tuple[str, Any]]:
  """All (study, arguments) pairs, in order, so progress can be shown."""
  jobs = []
  for dim in config.sweep_dims:
    cap = config.max_samples.get(dim, max(config.sweep_samples))
    for n in (n for n in config.sweep_samples if n <= cap):
      jobs.append(('n_sweep', (dim, n, 'kwng')))
      jobs.append(('n_sweep', (dim, n, 'naive')))
  for dim in config.basis_dims:
    for m in (m for m in config.basis_sizes if m <= config.basis_samples):
      jobs.append(('m_sweep', (dim, m)))
  for dim in config.bandwidth_dims:
    for kernel in ('gaussian', 'rational_quadratic'):
      for log_bw in config.log_bandwidths:
        jobs.append(('bandwidth_sweep', (dim, kernel, log_bw)))
  for dim, n in config.variant_configs:
    for variant in VARIANTS:
      jobs.append(('variants', (dim, n, variant)))
  for n in config.lognormal_samples:
    jobs.append(('lognormal', (n, 'kwng')))
    jobs.append(('lognormal', (n, 'naive')))
  return jobs


def run_studies(config: StudyConfig, progress: bool = True) -> dict[str, Any]:
  """Runs every job of ``config``; returns the results (JSON-ready)."""
  from tqdm import tqdm

  problems: dict[Any, Problem] = {}

  def problem_for(dim):
    if dim not in problems:
      problems[dim] = gaussian_problem(dim) if dim != 'lognormal' else lognormal_problem()
    return problems[dim]

  study = ErrorStudy(config.seeds)
  n_sweep: dict[str, dict[str, list]] = {}
  m_sweep: dict[str, dict[str, list]] = {}
  bandwidth_sweep: dict[str, dict[str, dict[str, list]]] = {}
  variants: dict[str, list] = {}
  lognormal: dict[str, list] = {}

  def append(table, summary, **fields):
    for name, value in fields.items():
      table.setdefault(name, []).append(value)
    for name in ('median', 'q25', 'q75', 'errors'):
      table.setdefault(name, []).append(summary[name])

  jobs = plan_jobs(config)
  for study_name, args in tqdm(jobs, desc='accuracy', disable=not progress):
    if study_name == 'n_sweep':
      dim, n, method = args
      m = num_basis_for(dim, n)
      errors = study.errors(problem_for(dim), n, m, Estimator(method=method))
      table = n_sweep.setdefault(f'd={dim}', {}).setdefault(method, {})
      append(table, summarize(errors), num_samples=n, num_basis=m)
    elif study_name == 'm_sweep':
      dim, m = args
      errors = study.errors(problem_for(dim), config.basis_samples, m)
      append(m_sweep.setdefault(f'd={dim}', {}), summarize(errors), num_basis=m)
    elif study_name == 'bandwidth_sweep':
      dim, kernel, log_bw = args
      n = config.bandwidth_samples
      errors = study.errors(
          problem_for(dim), n, num_basis_for(dim, n), Estimator(kernel=kernel),
          log_bandwidth=log_bw,
      )
      table = bandwidth_sweep.setdefault(f'd={dim}', {}).setdefault(kernel, {})
      append(table, summarize(errors), bandwidth_factor=10.0**log_bw)
    elif study_name == 'variants':
      dim, n, (label, method, kernel, damping, ridge) = args
      estimator = Estimator(method=method, kernel=kernel, damping=damping, ridge=ridge)
      errors = study.errors(problem_for(dim), n, num_basis_for(dim, n), estimator)
      rows = variants.setdefault(f'd={dim}, N={n}, M={num_basis_for(dim, n)}', [])
      rows.append({'variant': label, **summarize(errors)})
    else:
      n, method = args
      m = num_basis_for(1, n)
      errors = study.errors(problem_for('lognormal'), n, m, Estimator(method=method))
      append(lognormal.setdefault(method, {}), summarize(errors), num_samples=n, num_basis=m)

  for dim_key, tables in n_sweep.items():
    dim = int(dim_key[2:])
    table = tables['kwng']
    num_params = exact.gaussian_num_params(dim, 'cholesky')
    fit = [i for i, m in enumerate(table['num_basis']) if m >= num_params]
    table['slope_fit_samples'] = [table['num_samples'][i] for i in fit]
    table['slope'] = (
        loglog_slope(table['slope_fit_samples'], [table['median'][i] for i in fit])
        if len(fit) >= 2 else None
    )
  for table in lognormal.values():
    table['slope'] = (
        loglog_slope(table['num_samples'], table['median'])
        if len(table['num_samples']) >= 2 else None
    )

  lognormal_theta = jnp.asarray(LOGNORMAL_THETA, jnp.float64)
  quadrature = problem_for('lognormal').metric
  closed_form = exact.lognormal_metric(lognormal_theta)
  reference_gap = float(
      jnp.linalg.norm(quadrature - closed_form) / jnp.linalg.norm(closed_form)
  )
  problem_info = {
      f'gaussian_d{dim}': {
          'theta': np.asarray(problems[dim].theta).tolist(),
          'metric_eigenvalues': np.linalg.eigvalsh(np.asarray(problems[dim].metric)).tolist(),
      }
      for dim in problems if dim != 'lognormal'
  }
  problem_info['lognormal'] = {
      'theta': list(LOGNORMAL_THETA),
      'quadrature_vs_closed_form_relative_gap': reference_gap,
  }
  return {
      'n_sweep': n_sweep,
      'm_sweep': {'num_samples': config.basis_samples, **m_sweep},
      'bandwidth_sweep': {'num_samples': config.bandwidth_samples, **bandwidth_sweep},
      'variants': variants,
      'lognormal': lognormal,
      'problems': problem_info,
      'seconds_per_job': {k: round(v, 3) for k, v in study.seconds.items()},
  }


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """The accuracy targets, measured (the ones the run's grids cover)."""
  checks = []
  for (dim, n, m), threshold in ERROR_TARGETS.items():
    table = results['n_sweep'].get(f'd={dim}', {}).get('kwng')
    if table and n in table['num_samples']:
      i = table['num_samples'].index(n)
      if table['num_basis'][i] == m:
        median = table['median'][i]
        checks.append({
            'target': f'median error, d={dim}, N={n}, M={m}',
            'threshold': f'<= {threshold}',
            'measured': median,
            'met': bool(median <= threshold),
        })
  for dim in SLOPE_TARGET_DIMS:
    table = results['n_sweep'].get(f'd={dim}', {}).get('kwng')
    if table and table['slope'] is not None:
      checks.append({
          'target': f'log-log slope of the error against N, d={dim}',
          'threshold': f'<= {SLOPE_TARGET}',
          'measured': table['slope'],
          'met': bool(table['slope'] <= SLOPE_TARGET),
      })
  dim, n = NAIVE_RATIO_CONFIG
  tables = results['n_sweep'].get(f'd={dim}', {})
  if 'kwng' in tables and n in tables['kwng']['num_samples']:
    i = tables['kwng']['num_samples'].index(n)
    ratio = tables['naive']['median'][i] / tables['kwng']['median'][i]
    checks.append({
        'target': f'naive / KWNG median error, d={dim}, N={n}',
        'threshold': f'>= {NAIVE_RATIO_TARGET}',
        'measured': ratio,
        'met': bool(ratio >= NAIVE_RATIO_TARGET),
    })
  return checks


# ---------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------


def plot(results: dict[str, Any], out: pathlib.Path) -> list[str]:
  """Writes the PNGs; returns their file names."""
  import matplotlib.ticker

  plt = common.pyplot()

  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  names = []

  def save(fig, name):
    for ax in fig.axes:
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    common.save_png(fig, out / name, dpi=90)
    plt.close(fig)
    names.append(name)

  def band(ax, x, table, color, label, style='-'):
    ax.plot(x, table['median'], style, marker='o', ms=3, color=color, label=label)
    ax.fill_between(x, table['q25'], table['q75'], color=color, alpha=0.2)

  fig, ax = plt.subplots(figsize=(6, 4.2))
  for color, (dim_key, tables) in zip(colors, results['n_sweep'].items()):
    # Points with M < P (a rank-deficient estimate, error ~ 1/ε) are left out.
    num_params = exact.gaussian_num_params(int(dim_key[2:]))
    keep = [i for i, m in enumerate(tables['kwng']['num_basis']) if m >= num_params]
    kwng_table = {k: [tables['kwng'][k][i] for i in keep]
                  for k in ('num_samples', 'median', 'q25', 'q75')}
    slope = tables['kwng']['slope']
    slope_text = f', slope {slope:.2f}' if slope is not None else ''
    band(ax, kwng_table['num_samples'], kwng_table, color, f'KWNG {dim_key}{slope_text}')
    naive = tables['naive']
    ax.plot(naive['num_samples'], naive['median'], ':', color=color, lw=1,
            label=f'naive {dim_key}')
  ax.set(xscale='log', yscale='log', xlabel='N (samples), M = ⌈d√N⌉',
         ylabel='relative error',
         title='Cholesky Gaussian: error against N (dotted: naive metric)')
  ax.legend(fontsize=7, ncol=2)
  save(fig, 'error_vs_n.png')

  fig, ax = plt.subplots(figsize=(6, 4.2))
  sweep = results['m_sweep']
  for color, dim_key in zip(colors, [k for k in sweep if k.startswith('d=')]):
    dim = int(dim_key[2:])
    band(ax, sweep[dim_key]['num_basis'], sweep[dim_key], color,
         f'{dim_key} (P = {exact.gaussian_num_params(dim)})')
    ax.axvline(exact.gaussian_num_params(dim), color=color, lw=0.8, ls='--')
  ax.set(xscale='log', yscale='log', xlabel='M (basis functions)',
         ylabel='relative error',
         title=f'Error against M, N = {sweep["num_samples"]} (dashed: M = P)')
  ax.legend(fontsize=8)
  save(fig, 'error_vs_m.png')

  fig, ax = plt.subplots(figsize=(6, 4.2))
  sweep = results['bandwidth_sweep']
  styles = {'gaussian': '-', 'rational_quadratic': '--'}
  dim_keys = [k for k in sweep if k.startswith('d=')]
  for color, dim_key in zip(colors, dim_keys):
    for kernel, table in sweep[dim_key].items():
      band(ax, table['bandwidth_factor'], table, color, f'{dim_key}, {kernel}',
           style=styles[kernel])
  ax.set(xscale='log', yscale='log', xlabel='bandwidth multiplier 10^log_bandwidth',
         ylabel='relative error',
         title=f'Kernel sensitivity, N = {sweep["num_samples"]}, M = ⌈d√N⌉')
  ax.legend(fontsize=8)
  save(fig, 'error_vs_bandwidth.png')

  fig, ax = plt.subplots(figsize=(6, 4.2))
  lognormal = results['lognormal']
  slope = lognormal['kwng']['slope']
  slope_text = f', slope {slope:.2f}' if slope is not None else ''
  band(ax, lognormal['kwng']['num_samples'], lognormal['kwng'], colors[0],
       f'KWNG{slope_text}')
  band(ax, lognormal['naive']['num_samples'], lognormal['naive'], colors[1],
       'naive (= G_W in 1-D)', style=':')
  ax.set(xscale='log', yscale='log', xlabel='N (samples), M = ⌈√N⌉',
         ylabel='relative error',
         title='Log-normal (m, log s) = (0, log 1/2), quantile reference')
  ax.legend(fontsize=8)
  save(fig, 'lognormal.png')
  return names


# ---------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------


def run(config: StudyConfig, out: pathlib.Path, progress: bool = True) -> dict[str, Any]:
  """Runs the studies in float64, writes ``accuracy.json`` and the PNGs."""
  previous_x64 = jax.config.read('jax_enable_x64')
  jax.config.update('jax_enable_x64', True)
  try:
    start = time.perf_counter()
    results = run_studies(config, progress=progress)
    results['targets'] = check_targets(results)
    results['config'] = {
        'epsilon': EPSILON,
        'dtype': 'float64',
        'estimator': 'ridgeless, damping identity, gaussian kernel, '
                     "bandwidth 'mean_distance' (unless a row says otherwise)",
        'target': '(G_W + epsilon I)^{-1} g',
        'gradient': 'g ~ N(0, I_P), one per seed',
        'basis': 'M = ceil(d sqrt(N)), at most N, drawn at random per seed',
        'gaussian_theta': 'mu = 0, A lower-triangular: diag linspace(1, 0.8, d), '
                          'A[i, j] = 0.5 / sqrt(i) for j < i',
        'slope_fit': 'least squares of log median error on log N, over the N '
                     'with M >= P',
        **{k: (list(v) if isinstance(v, tuple) else v)
           for k, v in dataclasses.asdict(config).items()
           if k != 'max_samples'},
        'max_samples': {str(k): v for k, v in config.max_samples.items()},
    }
    results['environment'] = {
        'jax': jax.__version__,
        'kwng_jax': kwng_jax.__version__,
        'device': str(jax.devices()[0]),
        'cpu_count': os.cpu_count(),
        'platform': platform.platform(),
    }
    results['total_seconds'] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    results['plots'] = plot(results, out)
    with open(out / 'accuracy.json', 'w') as f:
      json.dump(results, f, indent=1)
    return results
  finally:
    jax.config.update('jax_enable_x64', previous_x64)


def print_summary(results: dict[str, Any]) -> None:
  for dim_key, tables in results['n_sweep'].items():
    table = tables['kwng']
    medians = ', '.join(
        f'N={n}: {e:.3g}' for n, e in zip(table['num_samples'], table['median'])
    )
    slope = table['slope']
    print(f'{dim_key}: {medians}; slope {slope if slope is None else round(slope, 3)}')
  for check in results['targets']:
    status = 'met' if check['met'] else 'MISSED'
    print(f"{check['target']}: {check['measured']:.4g} ({check['threshold']}) {status}")
  print(f"total {results['total_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='tiny grids and 3 seeds (seconds; for CI)')
  parser.add_argument('--seeds', type=int, default=None,
                      help='number of seeds (default: 20, or 3 with --quick)')
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT,
                      help='folder for accuracy.json and the PNGs')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  config = QUICK if args.quick else FULL
  if args.seeds is not None:
    if args.seeds < 1:
      raise ValueError(f'--seeds={args.seeds} must be at least 1.')
    config = dataclasses.replace(config, seeds=args.seeds)
  results = run(config, args.out, progress=not args.no_progress)
  print_summary(results)
  return results


if __name__ == '__main__':
  main()
