"""The ready-made KWNG optimizer of the published experiments."""

from __future__ import annotations

from typing import Any

import optax

from kwng_jax import damping as damping_lib
from kwng_jax import kernels as kernels_lib
from kwng_jax import transform


def kwng(
    learning_rate: optax.ScalarOrSchedule,
    num_basis: int = 5,
    epsilon: float = 1e-5,
    *,
    max_norm: float | None = 1.0,
    adaptive: bool = True,
    kernel: kernels_lib.KernelLike = 'gaussian',
    bandwidth: kernels_lib.BandwidthLike = 'mean_distance',
    log_bandwidth: float = 0.0,
    damping: str = 'reference',
    ridge: float = 0.0,
    rcond: float | None = None,
    seed: int = 0,
    update_every: int | None = None,
    jacobian_samples: int | None = None,
    jacobian_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The published KWNG optimizer, as an Optax chain.

  ``scale_by_kwng`` (with its fallback to g), clipping of the direction to
  global norm ``max_norm``, the learning rate (a float or an Optax schedule),
  and, with ``adaptive=True``, the Levenberg–Marquardt adaptation of
  :math:`\epsilon` of :func:`kwng_jax.adaptive_damping` wrapped around it.
  The update takes ``outputs_fn=`` and, when adaptive, ``value=`` (the loss).

  Args:
    learning_rate: a float or a schedule ``step -> lr``.
    num_basis: M, the number of basis functions (published: 5).
    epsilon: initial damping strength (published: 1e-5).
    max_norm: clip the direction to this global norm (published: 1);
      ``None`` disables clipping.
    adaptive: adapt :math:`\epsilon` from the loss (published: on).
    kernel: see :func:`kwng_jax.scale_by_kwng`.
    bandwidth: see :func:`kwng_jax.scale_by_kwng`.
    log_bandwidth: see :func:`kwng_jax.scale_by_kwng`.
    damping: see :func:`kwng_jax.scale_by_kwng` (published: 'reference').
    ridge: see :func:`kwng_jax.scale_by_kwng`.
    rcond: see :func:`kwng_jax.scale_by_kwng`.
    seed: see :func:`kwng_jax.scale_by_kwng`.
    update_every: rebuild the factors every this many steps (None: every
      step); see :func:`kwng_jax.scale_by_kwng`.
    jacobian_samples: compute T on this many samples; see
      :func:`kwng_jax.scale_by_kwng`.
    jacobian_dtype: dtype of the vector–Jacobian products; see
      :func:`kwng_jax.scale_by_kwng`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import kwng_jax
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> outputs_fn = lambda p: x @ p
    >>> loss_fn = lambda p: jnp.mean((outputs_fn(p) - 1.0) ** 2)
    >>> params = jnp.zeros((3, 2))
    >>> opt = kwng_jax.kwng(learning_rate=0.5)
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   loss, grads = jax.value_and_grad(loss_fn)(params)
    ...   updates, state = opt.update(grads, state, params,
    ...                               outputs_fn=outputs_fn, value=loss)
    ...   params = params + updates
    >>> bool(jnp.all(jnp.isfinite(params)))
    True

  References:
    Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
    ICLR 2020 (arXiv 1910.09652).
  """
  steps = [
      transform.scale_by_kwng(
          num_basis,
          epsilon,
          kernel=kernel,
          bandwidth=bandwidth,
          log_bandwidth=log_bandwidth,
          damping=damping,
          ridge=ridge,
          rcond=rcond,
          seed=seed,
          update_every=update_every,
          jacobian_samples=jacobian_samples,
          jacobian_dtype=jacobian_dtype,
      )
  ]
  if max_norm is not None:
    steps.append(optax.clip_by_global_norm(max_norm))
  steps.append(optax.scale_by_learning_rate(learning_rate))
  chain = optax.chain(*steps)
  return damping_lib.adaptive_damping(chain) if adaptive else chain
