r"""Step lengths measured where the samples move.

An update :math:`u` of the parameters moves each sample
:math:`X_n = h_\theta(Z_n)` by :math:`J_n u` to first order
(:math:`J_n = \partial X_n / \partial\theta`). Its root-mean-square

.. math:: \Delta(u) = \Big(\frac1N \sum_{n=1}^N \|J_n u\|^2\Big)^{1/2}

costs one forward-mode product (``jax.jvp`` of ``outputs_fn``) and bounds,
to first order in :math:`u`, the 2-Wasserstein distance between the laws of
the samples before and after the step: keeping each :math:`Z_n` fixed is
one coupling of the two laws, and :math:`W_2` is the smallest transport
cost over all couplings,

.. math:: W_2(\rho_\theta, \rho_{\theta+u}) \le \Delta(u) + O(\|u\|^2).

:math:`\Delta` does not depend on how the model is parametrized (:math:`u`
transforms with :math:`\theta`), which is what makes it the right length for
a natural-gradient step: a step of fixed Euclidean length in parameter space,
such as the published chain's ``clip_by_global_norm(1)``, is exactly the
geometry that an ill-conditioned parametrization distorts.

References:
  Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
  ICLR 2020 (arXiv 1910.09652), Section 2 (the Wasserstein information
  matrix as the local metric of :math:`W_2`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kwng_jax._src import clipping
from kwng_jax._src import options
from kwng_jax._src import outputs as outputs_lib
from kwng_jax import solve

PyTree = Any

#: How :func:`scale_by_displacement` rescales an update.
DISPLACEMENT_MODES = ('cap', 'normalize')


def sample_displacement(
    outputs_fn: Callable[[PyTree], jax.Array], params: PyTree, updates: PyTree
) -> jax.Array:
  r"""The RMS displacement :math:`\Delta(u)` of the samples along ``updates``.

  Args:
    outputs_fn: ``params -> samples`` with a leading batch axis N.
    params: the point where the samples are differentiated.
    updates: :math:`u`, a pytree shaped like ``params``.

  Returns:
    :math:`\Delta(u) \ge 0`, a float32 scalar (float64 under x64). The
    squares are summed in at least float32, so float16 samples do not
    overflow.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax._src import displacement
    >>> x = jnp.array([[1.0], [2.0]])
    >>> outputs_fn = lambda p: x * p['w']   # samples w * x_n, w a scalar
    >>> float(displacement.sample_displacement(
    ...     outputs_fn, {'w': jnp.ones(())}, {'w': jnp.full((), 2.0)}))
    3.1622...
  """
  def move(tangent: PyTree) -> jax.Array:
    with outputs_lib.explained_errors():
      samples, moved = jax.jvp(outputs_fn, (params,), (tangent,))
    outputs_lib.as_samples(samples)
    return moved

  return displacement_along(move, params, updates)


def displacement_along(
    move: Callable[[PyTree], jax.Array], params: PyTree, updates: PyTree
) -> jax.Array:
  r""":math:`\Delta(u)` given ``move``, the linear map :math:`u \mapsto J u`."""
  # Where the params' dtype has a narrower range than float32 or than the
  # update's (float16), the tangent is u over its largest entry, so that
  # neither u in that dtype nor the product J u can overflow or underflow;
  # the factor is put back in at least float32. In float32's range that
  # pass over u sits on the step's critical path (0.2 ms of the
  # 670k-parameter MLP's): there a J u that overflows (in the samples or
  # inside the JVP) makes Delta infinite or NaN, and scale_by_displacement
  # then scales the step to zero, where the scaled tangent gave a factor
  # below 1e-30.
  if _fits_tangent_dtype(updates, params):
    update_scale = None
    tangent = jax.tree.map(lambda u, p: jnp.asarray(u).astype(jnp.asarray(p).dtype),
                           updates, params)
    dtype = solve.at_least_float32(*(jnp.asarray(u).dtype for u in jax.tree.leaves(updates)))
  else:
    update_scale = clipping.entry_scale(updates)
    dtype = update_scale.dtype
    tangent = jax.tree.map(
        lambda u, p: (jnp.asarray(u).astype(dtype) / update_scale).astype(
            jnp.asarray(p).dtype),
        updates, params,
    )
  moved = jnp.asarray(move(tangent))
  dtype = solve.at_least_float32(moved.dtype, dtype)
  moved = moved.astype(dtype).reshape(moved.shape[0], -1)
  # Scaled by the largest entry first, so that squaring neither overflows
  # nor underflows whatever the units of the samples.
  move_scale = clipping.entry_scale(moved)
  mean_square = jnp.mean(jnp.sum(jnp.square(moved / move_scale), axis=1))
  displacement = move_scale * jnp.sqrt(mean_square)
  if update_scale is not None:
    displacement = update_scale.astype(dtype) * displacement
  return displacement.astype(solve.small_matrix_dtype())


def _fits_tangent_dtype(updates: PyTree, params: PyTree) -> bool:
  """Whether every leaf of u and of the params has float32's exponent range
  or more, and the param's dtype at least the update's."""
  float32_range = jnp.finfo(jnp.float32).maxexp

  def fits(u, p):
    u_dtype, p_dtype = jnp.asarray(u).dtype, jnp.asarray(p).dtype
    if not (jnp.issubdtype(u_dtype, jnp.floating) and jnp.issubdtype(p_dtype, jnp.floating)):
      return False
    p_range = jnp.finfo(p_dtype).maxexp
    return p_range >= float32_range and p_range >= jnp.finfo(u_dtype).maxexp

  return all(jax.tree.leaves(jax.tree.map(fits, updates, params)))


class ScaleByDisplacementState(NamedTuple):
  """State of :func:`scale_by_displacement`.

  Attributes:
    displacement: :math:`\\Delta` of the incoming update at the last step.
    displacement_scale: the factor the last update was multiplied by.
  """

  displacement: jax.Array
  displacement_scale: jax.Array


def scale_by_displacement(
    max_displacement: float = 1.0,
    *,
    mode: Literal['cap', 'normalize'] = 'cap',
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales an update by how far it moves the samples.

  With :math:`\Delta(u)` the RMS displacement of the samples
  ``outputs_fn(params)`` along the incoming update :math:`u` (see
  :func:`sample_displacement`) and :math:`r` = ``max_displacement``:

  * ``mode='cap'``: :math:`u \min(1, r / \Delta(u))`: steps that move the
    samples by more than :math:`r` (RMS) are shortened to :math:`r`, others
    pass unchanged;
  * ``mode='normalize'``: :math:`u \, r / \Delta(u)`: every step moves the
    samples by :math:`r`.

  An update that does not move the samples (:math:`\Delta(u) = 0`) passes
  unchanged; no division by zero happens. An update whose :math:`\Delta`
  is NaN (J u overflowed, or the samples are not finite) becomes zero.
  Chain a learning rate (or a schedule) after it to scale the displacement:
  ``optax.chain(..., scale_by_displacement(1.0), optax.scale_by_learning_rate(lr))``
  moves the samples by at most ``lr``.

  Its update is ``update(updates, state, params, *, outputs_fn, **extra)``
  with ``outputs_fn`` a function ``params -> samples`` of shape ``(N, ...)``
  (as for :func:`kwng_jax.scale_by_kwng`); the cost is one ``jax.jvp``.

  Args:
    max_displacement: :math:`r > 0`, in the units of the samples.
    mode: ``'cap'`` or ``'normalize'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ScaleByDisplacementState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kwng_jax
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> outputs_fn = lambda p: x @ p
    >>> opt = optax.chain(kwng_jax.scale_by_displacement(mode='normalize'),
    ...                   optax.scale_by_learning_rate(0.1))
    >>> params = jnp.zeros((3, 2))
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jnp.ones((3, 2)), state, params,
    ...                             outputs_fn=outputs_fn)
    >>> displacement = kwng_jax.sample_displacement(outputs_fn, params, updates)
    >>> round(float(displacement), 4)
    0.1

  References:
    Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
    ICLR 2020 (arXiv 1910.09652).
  """
  if mode not in DISPLACEMENT_MODES:
    raise ValueError(
        f'Unknown mode={mode!r}; valid values are {list(DISPLACEMENT_MODES)}.'
    )
  options.check_positive('max_displacement', max_displacement)

  def init_fn(params):
    del params
    dtype = solve.small_matrix_dtype()
    return ScaleByDisplacementState(
        displacement=jnp.zeros((), dtype), displacement_scale=jnp.ones((), dtype)
    )

  def update_fn(
      updates, state, params=None, *, outputs_fn=None, full_params=None,
      samples_and_vjp=None, **extra_args,
  ):
    del state, extra_args
    if (outputs_fn is None and samples_and_vjp is None) or params is None:
      raise ValueError(
          'scale_by_displacement needs params and the keyword outputs_fn: '
          'opt.update(grads, state, params, outputs_fn=lambda p: model(p, x)) '
          '(or samples_and_vjp=jax.vjp(outputs_fn, params)).'
      )
    if samples_and_vjp is not None:
      samples, vjp_fn = outputs_lib.check_samples_and_vjp(
          samples_and_vjp, params, 'scale_by_displacement'
      )
      # J u is the transpose of the VJP u* -> J^T u*, which is linear.
      transposed = jax.linear_transpose(vjp_fn, samples)
      displacement = displacement_along(
          lambda tangent: transposed((tangent,))[0], params, updates
      )
    else:
      outputs_fn = outputs_lib.unmasked_outputs_fn(
          outputs_fn, params, full_params, 'scale_by_displacement'
      )
      displacement = sample_displacement(outputs_fn, params, updates)
    radius = jnp.asarray(max_displacement).astype(displacement.dtype)
    moves = displacement > 0
    ratio = radius / jnp.where(moves, displacement, 1.0)
    if mode == 'cap':
      ratio = jnp.minimum(ratio, 1.0)
    scale = jnp.where(moves, ratio, 1.0)
    # A NaN Delta (J u overflowed, or the samples are not finite) measures
    # nothing: no step, rather than the step unscaled.
    scale = jnp.where(jnp.isnan(displacement), 0.0, scale)
    # Scaled in at least float32: a float16 update times a small factor
    # would otherwise flush to zero before the cast.
    updates = jax.tree.map(
        lambda u: _scaled(u, scale),
        updates,
    )
    return updates, ScaleByDisplacementState(
        displacement=displacement, displacement_scale=scale
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scaled(update: jax.Array, scale: jax.Array) -> jax.Array:
  dtype = solve.at_least_float32(update.dtype)
  return (update.astype(dtype) * scale.astype(dtype)).astype(update.dtype)
