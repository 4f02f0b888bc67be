r"""KWNG as an Optax gradient transformation.

:func:`scale_by_kwng` turns the gradient into the KWNG direction of
:func:`kwng_jax.natural_gradient`, with the published safety net: where
:math:`\hat g` is not a descent direction (:math:`\langle g, \hat g\rangle
\le 0`) or not finite, the gradient itself is passed on. Chain it with
clipping, a learning rate, momentum or Adam like any Optax transformation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kwng_jax import estimator
from kwng_jax import kernels as kernels_lib
from kwng_jax import solve

PyTree = Any


class ScaleByKWNGState(NamedTuple):
  """State of :func:`scale_by_kwng`.

  Field names are prefixed with ``kwng_`` so that
  ``optax.tree_utils.tree_get(state, 'kwng_epsilon')`` finds them inside any
  chain.

  Attributes:
    kwng_count: number of updates so far; the basis of step t is drawn with
      ``jax.random.fold_in(jax.random.key(seed), t)``.
    kwng_epsilon: the damping strength :math:`\\epsilon` of the next update
      (changed by :func:`kwng_jax.adaptive_damping`, or by hand with
      ``optax.tree_utils.tree_set``).
    kwng_info: the :class:`kwng_jax.KWNGInfo` diagnostics of the last update.
  """

  kwng_count: jax.Array
  kwng_epsilon: jax.Array
  kwng_info: estimator.KWNGInfo


def scale_by_kwng(
    num_basis: int = 5,
    epsilon: float = 1e-5,
    *,
    kernel: kernels_lib.KernelLike = 'gaussian',
    bandwidth: kernels_lib.BandwidthLike = 'mean_distance',
    log_bandwidth: float = 0.0,
    damping: str = 'reference',
    ridge: float = 0.0,
    rcond: float | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions updates with the kernelized Wasserstein natural gradient.

  Each update draws M basis points from the samples ``outputs_fn(params)``
  and returns

  .. math::
     \hat g = (T^\top (Q + \lambda K)^{+} T + \epsilon D^{-1})^{-1} g

  (see :func:`kwng_jax.natural_gradient`), or g itself when
  :math:`\langle g, \hat g\rangle \le 0` or :math:`\hat g` is not finite.
  When g or the samples are not finite the update is zero and
  ``state.kwng_info.finite_inputs`` is False, so parameters never turn NaN.

  Its ``update(updates, state, params, *, outputs_fn, value=None,
  **extra_args)`` needs ``params`` and the keyword ``outputs_fn``, a function
  ``params -> samples`` of shape ``(N, ...)`` (a classifier's logits for the
  batch); other extra arguments are ignored.

  Args:
    num_basis: M, the number of basis functions; at most the batch size.
    epsilon: initial damping strength :math:`\epsilon > 0`; it is state
      (``kwng_epsilon``) so that :func:`kwng_jax.adaptive_damping` can adapt it.
    kernel: a kernel name or a scalar function ``k(x, y[, bandwidth])``.
    bandwidth: ``'mean_distance'`` (published), ``'median'``, or a number.
    log_bandwidth: base-10 log of the multiplier of the bandwidth rule.
    damping: ``'reference'``, ``'squared'`` or ``'identity'``.
    ridge: :math:`\lambda \ge 0` (0: the ridgeless estimator).
    rcond: relative eigenvalue threshold of the whitening.
    seed: seed of the basis draws; keys are derived from it and the step
      count, so the state holds no key.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kwng_jax
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> params = {'w': jnp.ones((3, 4))}
    >>> outputs_fn = lambda p: x @ p['w']
    >>> opt = optax.chain(kwng_jax.scale_by_kwng(num_basis=5),
    ...                   optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> state = opt.init(params)
    >>> grads = jax.grad(lambda p: jnp.mean(outputs_fn(p) ** 2))(params)
    >>> updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn)
    >>> updates['w'].shape
    (3, 4)

  References:
    Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
    ICLR 2020 (arXiv 1910.09652).
  """
  solve.check_damping(damping)
  kernels_lib.resolve_kernel(kernel)
  if isinstance(epsilon, (int, float)) and not epsilon > 0:
    raise ValueError(f'epsilon={epsilon!r} must be positive.')

  def init_fn(params):
    del params
    return ScaleByKWNGState(
        kwng_count=jnp.zeros((), jnp.int32),
        kwng_epsilon=jnp.asarray(epsilon, jnp.float32),
        kwng_info=estimator.KWNGInfo.empty(),
    )

  def update_fn(updates, state, params=None, *, outputs_fn=None, **extra_args):
    del extra_args
    if outputs_fn is None:
      raise ValueError(
          'scale_by_kwng needs the keyword outputs_fn: '
          'opt.update(grads, state, params, outputs_fn=lambda p: model(p, x)), '
          'a function params -> samples of shape (N, ...).'
      )
    key = jax.random.fold_in(jax.random.key(seed), state.kwng_count)
    direction, info = estimator.natural_gradient(
        updates,
        outputs_fn,
        params,
        key=key,
        num_basis=num_basis,
        epsilon=state.kwng_epsilon,
        kernel=kernel,
        bandwidth=bandwidth,
        log_bandwidth=log_bandwidth,
        damping=damping,
        ridge=ridge,
        rcond=rcond,
    )
    direction = safe_direction(updates, direction, info)
    new_state = ScaleByKWNGState(
        kwng_count=optax.safe_increment(state.kwng_count),
        kwng_epsilon=state.kwng_epsilon,
        kwng_info=info,
    )
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def safe_direction(
    grads: PyTree, direction: PyTree, info: estimator.KWNGInfo
) -> PyTree:
  r"""The published safety net around :math:`\hat g`.

  Returns :math:`\hat g` when it is finite and a descent direction, else g;
  zero where the inputs (g or the samples) are not finite.
  """
  # With finite inputs, g is finite, and so is ĝ unless the fallback fired.
  def select(g, d):
    chosen = jnp.where(info.fallback, g, d)
    return jnp.where(info.finite_inputs, chosen, jnp.zeros_like(chosen))

  return jax.tree.map(select, grads, direction)
