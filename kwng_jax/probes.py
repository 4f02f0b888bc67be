r"""Random probes of the diagonal of the samples' metric (damping ``'metric_diagonal'``).

For random sign probes :math:`v` on the samples,
:math:`\mathbb E[(J^\top v)_j^2] = (J^\top J)_{jj}` (Hutchinson's
estimator): the mean square of the probes' vector–Jacobian products
estimates how far, squared and RMS, the samples move per unit of each
parameter, without forming J. The probes ride in the same batched VJP as
the kernel cotangents of T (:mod:`kwng_jax.factors`). A stateless estimate
draws :data:`NUM_PROBES`; an optimizer draws :data:`AVERAGED_PROBES` per
step and keeps a running average (:class:`DiagonalAverage`).
:func:`metric_diagonal_damping` turns the estimate into the damping D.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kwng_jax import solve
from kwng_jax._src import sharding
from kwng_jax._src import threefry

PyTree = Any


#: How many random probes estimate the diagonal of the samples' metric
#: (:func:`probe_cotangents`). Measured on the ill-conditioned digits MLP
#: (3 seeds, momentum 0.9, Gaussian probes): validation accuracy 0.89 with
#: one probe, 0.95 with two, 0.97 with four. With few probes some
#: estimates land near zero, and a damping 1 / estimate then sends those
#: parameters far.
NUM_PROBES = 4

#: The probes per step of an optimizer (:func:`kwng_jax.scale_by_kwng`),
#: whose state averages the estimates over steps (:class:`DiagonalAverage`)
#: instead of drawing :data:`NUM_PROBES` at every step. Two, not one: the
#: first step has only its own estimate, and from one probe some entries
#: land near zero.
AVERAGED_PROBES = 2

#: The decay of that running average. Measured on the digits benchmarks (3
#: seeds; validation accuracy at the best learning rate; Gaussian probes), two probes per
#: step averaged with decay 0.9 against four per step without averaging:
#: 0.973 / 0.972 on the well-conditioned CNN, 0.970 / 0.956 on the
#: ill-conditioned CNN, 0.973 / 0.967 on the ill-conditioned MLP, at two
#: VJPs less per step (one probe: 0.967, 0.974, 0.973).
DIAGONAL_DECAY = 0.9


#: The floor of ``'metric_diagonal'``'s diagonal, relative to its unit's mean
#: (:func:`metric_diagonal_damping`). Chosen on the digits benchmarks (test
#: accuracy at the learning rate chosen on validation): 1e-1 and 1e-2 give
#: 0.971 and 0.980 on the well-conditioned CNN, 0.945 and 0.966 on the
#: ill-conditioned CNN, 0.970 and 0.975 on the ill-conditioned MLP; 1e-4
#: gives 0.974 on the well-conditioned CNN, and no floor 0.847 +- 0.146,
#: some seeds at chance.
METRIC_DIAGONAL_FLOOR = 1e-2


class DiagonalAverage(NamedTuple):
  r"""A running average of the probe estimates of the metric diagonal.

  Attributes:
    total: :math:`\sum_s \beta^{t-s} (1 - \beta) \hat s_s`, params-shaped,
      in at least float32 (zeros before the first step).
    weight: :math:`1 - \beta^t`, the weight ``total`` carries, t the number
      of estimates so far; ``total / weight`` is the debiased average.
  """

  total: PyTree
  weight: jax.Array

  @classmethod
  def zeros(cls, params: PyTree) -> 'DiagonalAverage':
    """The average before the first step, shaped and sharded like ``params``."""
    return cls(
        total=jax.tree.map(
            lambda p: jnp.zeros_like(p, dtype=_estimate_dtype(p.dtype)), params),
        weight=jnp.zeros((), jnp.float32),
    )


def sharded_like(average: DiagonalAverage | None, params: PyTree) -> DiagonalAverage | None:
  """``average`` with the sharding of ``params`` (explicit meshes); None stays None."""
  if average is None:
    return None
  return average._replace(total=sharding.like(average.total, params))


def averaged_diagonal(
    average: DiagonalAverage, estimate: PyTree, decay: float = DIAGONAL_DECAY
) -> tuple[DiagonalAverage, PyTree]:
  r"""Adds ``estimate`` to the running average; returns it and the debiased average.

  Args:
    average: the average so far.
    estimate: this step's :func:`metric_diagonal`, params-shaped.
    decay: :math:`\beta \in [0, 1)`.

  Returns:
    ``(new_average, diagonal)``, ``diagonal`` the debiased average, in the
    dtype of ``average.total``.
  """
  weight = decay * average.weight + (1.0 - decay)
  total = jax.tree.map(lambda a, e: decay * a + (1.0 - decay) * e.astype(a.dtype),
                       average.total, estimate)
  diagonal = jax.tree.map(lambda a: a / weight.astype(a.dtype), total)
  return DiagonalAverage(total, weight), diagonal


def probe_cotangents(
    key: jax.Array, num_probes: int, num_rows: int, samples_shape: tuple[int, ...],
    samples_dtype: jnp.dtype,
) -> jax.Array:
  r"""Random sign probes :math:`v / \sqrt n`, zero beyond the first n samples.

  For :math:`v` with independent entries :math:`\pm 1` (Rademacher) on the
  first n samples, :math:`\mathbb E[(J^\top v)_j^2] / n = (J^\top J)_{jj} / n`:
  the mean square of the probes' VJPs (:func:`metric_diagonal`) estimates
  the diagonal of the samples' metric without forming J (Hutchinson's
  estimator). Signs rather than Gaussian entries: the estimate's variance
  is smaller (no fourth moment of the probe adds to it), and each random
  32-bit word gives 32 of them (on CPU, the random bits of 2 Gaussian probes
  of a batch of 128 logits cost more than an SGD step of the digits MLP).

  Args:
    key: PRNG key of the probes.
    num_probes: K.
    num_rows: n, the samples the probes cover (as for T).
    samples_shape: the shape ``(N, ...)`` of the samples, ``N >= n``.
    samples_dtype: the dtype of the samples; the probes are cast to it.

  Returns:
    Shape ``(K, *samples_shape)``.
  """
  words = threefry.random_words(key, probe_words(num_probes, num_rows, samples_shape))
  return probe_cotangents_from_bits(words, num_probes, num_rows, samples_shape, samples_dtype)


def probe_words(num_probes: int, num_rows: int, samples_shape: tuple[int, ...]) -> int:
  """How many random 32-bit words :func:`probe_cotangents` draws: one per 32 signs."""
  return -(-math.prod((num_probes, num_rows) + tuple(samples_shape[1:])) // 32)


def probe_cotangents_from_bits(
    words: jax.Array, num_probes: int, num_rows: int, samples_shape: tuple[int, ...],
    samples_dtype: jnp.dtype,
) -> jax.Array:
  """:func:`probe_cotangents` from :func:`probe_words` random words drawn already.

  An optimizer draws them in the same call as its basis'
  (:func:`kwng_jax.factors.basis_from_bits`): one hash kernel rather than
  two.
  """
  num_samples = samples_shape[0]
  rows_shape = (num_probes, num_rows) + tuple(samples_shape[1:])
  count = math.prod(rows_shape)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & jnp.uint32(1)
  signs = 1.0 - 2.0 * bits.reshape(-1)[:count].astype(jnp.float32)
  probes = signs.reshape(rows_shape) / jnp.sqrt(float(num_rows))
  if num_rows < num_samples:
    pad = [(0, 0), (0, num_samples - num_rows)] + [(0, 0)] * (len(samples_shape) - 1)
    probes = jnp.pad(probes, pad)
  return probes.astype(samples_dtype)


def _estimate_dtype(dtype: Any) -> Any:
  """The dtype of the metric diagonal of VJPs of ``dtype``: at least float32."""
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def metric_diagonal(pulled_probes: PyTree) -> PyTree:
  r"""The diagonal of :math:`J^\top J / n` from the VJPs of :func:`probe_cotangents`.

  Args:
    pulled_probes: a params-shaped pytree with a leading axis of size K,
      the VJPs of the K probes.

  Returns:
    The mean square over the K probes, shaped like the params, in at least
    float32: an unbiased estimate of each parameter's
    :math:`\frac1n \sum_n \|\partial X_n / \partial\theta_j\|^2`, the
    squared distance the samples move (RMS) per unit of :math:`\theta_j`.
  """
  num_probes = jax.tree.leaves(pulled_probes)[0].shape[0]
  return mean_square(
      [jax.tree.map(lambda t, k=k: t[k], pulled_probes) for k in range(num_probes)])


def mean_square(pulled_rows: Sequence[PyTree]) -> PyTree:
  """:func:`metric_diagonal` of the K probes' VJPs given one by one (not stacked)."""

  def mean_square_leaf(*rows):
    # In at least float32: the squares of bf16 entries underflow early.
    squares = [jnp.square(r.astype(_estimate_dtype(r.dtype))) for r in rows]
    return functools.reduce(jnp.add, squares) / len(rows)

  return jax.tree.map(mean_square_leaf, *pulled_rows)


def metric_diagonal_damping(
    metric_diagonal: PyTree, squared_norms: PyTree, *, divisor: jax.Array | None = None
) -> tuple[PyTree, PyTree]:
  r"""D and the curvature :math:`v` of ``damping='metric_diagonal'``.

  With :math:`s_j = (J^\top J)_{jj} / N` the diagonal of the samples'
  metric (:func:`metric_diagonal`), :math:`D_j = 1 / s_j`:
  the damping term :math:`\epsilon D^{-1}` is :math:`\epsilon` times the
  squared RMS distance the samples move per unit of :math:`\theta_j`
  (Marquardt's scaling of the Levenberg–Marquardt damping, with the
  samples' metric in place of the Gauss–Newton matrix). Both
  :math:`\tilde T^\top\tilde T` and :math:`D^{-1}` then transform as a
  metric when a parameter is rescaled (:math:`\theta_j \to a\theta_j`
  multiplies both by :math:`1/a^2`), so the direction is covariant under
  any diagonal reparametrization, on the null space of the rank-M
  estimate too; the ``'reference'`` D (one power of the column norm) is
  not.

  A parameter the batch barely moves (a ReLU unit active on a few samples)
  would get :math:`D_j^{-1}` near zero, so a step that is small only to
  first order and only on this batch. Each :math:`s_j` of an array with two
  or more axes is therefore floored at ``METRIC_DIAGONAL_FLOOR`` (1e-2)
  times the mean of :math:`s` over its unit: the entries that share its
  last index (a Flax ``Dense`` or ``Conv`` kernel's output unit). The
  floor is covariant under rescaling a unit, the way a badly scaled layer
  or head is ill-conditioned; vectors (biases) are not floored.

  A parameter the samples do not see (:math:`s_j = 0`: outside
  ``outputs_fn``, a ReLU unit dead on the batch) is treated as
  :func:`kwng_jax.solve.safe_damping` treats it: :math:`D_j^{-1}` and :math:`v_j` are
  those of a typical seen parameter, the mean of :math:`s` and of the
  squared column norms of :math:`\tilde T` over the seen parameters;
  :math:`v_j` stays 0 where :math:`\tilde T`'s column is not zero (an
  estimate of exactly zero from probes that cancelled).

  Args:
    metric_diagonal: :math:`s`, params-shaped, :math:`\ge 0`.
    squared_norms: q, the squared column norms of :math:`\tilde T`
      (:func:`kwng_jax.solve.column_squared_norms`).
    divisor: a positive scalar w, or None for 1: the result is that of
      ``metric_diagonal / w``, computed as w times the D of
      ``metric_diagonal`` (the floor and the typical value scale with s,
      which entries are zero does not change, and with none seen the
      typical value is w). A
      :class:`DiagonalAverage` passes its ``total`` and ``weight`` so, and
      no pass writes the debiased average (670k-parameter MLP on 2 cores:
      11.3 against 11.9 ms per step).

  Returns:
    ``(D, v)``, each shaped like the params, in the dtype of ``squared_norms``.
  """
  metric_diagonal = jax.tree.map(_floor_by_unit, metric_diagonal)
  # Random signs can cancel to an estimate of exactly zero on a column T̃
  # sees (a logit's bias on 32 samples: both probes, 2% of first steps): the
  # columns in the factor are those where s + q > 0 (both are nonnegative).
  in_factor = jax.tree.map(
      lambda d, t: d.astype(t.dtype) + t, metric_diagonal, squared_norms)
  # With no parameter seen (samples that do not depend on the params) both
  # are 1 (the typical s in the units of s / w): the direction is then
  # g / (1 + eps).
  numerator = 1.0 if divisor is None else jnp.asarray(divisor).astype(
      solve.at_least_float32(*(d.dtype for d in jax.tree.leaves(metric_diagonal))))
  typical_metric = solve.mean_over_support(metric_diagonal, metric_diagonal, default=numerator)
  typical_curvature = solve.mean_over_support(squared_norms, in_factor)
  # T̃ can be zero where J is not (the whitening dropped every mode): the
  # unseen parameters still get a curvature, so their step stays bounded.
  typical_curvature = jnp.where(typical_curvature > 0, typical_curvature, 1.0)
  damping = jax.tree.map(
      lambda d, t: (numerator / jnp.where(d > 0, d, typical_metric)).astype(t.dtype),
      metric_diagonal, squared_norms)
  # The curvature only where T̃'s column is zero too: elsewhere the metric
  # already holds T̃'s part.
  unseen = jax.tree.map(
      lambda f, t: jnp.where(f > 0, 0.0, typical_curvature).astype(t.dtype),
      in_factor, squared_norms)
  return damping, unseen


def _floor_by_unit(diagonal: jax.Array) -> jax.Array:
  """Each entry at least ``METRIC_DIAGONAL_FLOOR`` times its unit's mean; zeros stay."""
  if diagonal.ndim < 2:
    return diagonal
  unit_mean = jnp.mean(diagonal, axis=tuple(range(diagonal.ndim - 1)), keepdims=True)
  return jnp.maximum(diagonal, jnp.where(diagonal > 0, METRIC_DIAGONAL_FLOOR * unit_mean, 0.0))
