r"""Kernels and bandwidth rules for the KWNG estimator.

A kernel is a scalar function of two points. The built-in ones take the
bandwidth as a third argument, ``k(x, y, bandwidth)``, so the estimator can
choose it from the samples at every step; a user kernel may be written either
way, ``k(x, y)`` or ``k(x, y, bandwidth)``. Every derivative the estimator
needs is taken from this scalar function by JAX autodiff, never written by
hand, so any differentiable kernel works.

The bandwidth has the units of a squared distance: the Gaussian kernel is
:math:`k(x, y) = \exp(-\|x - y\|^2 / (2 \sigma))`. Every built-in kernel
takes two points ``x`` and ``y`` of shape ``(d,)`` and the bandwidth
:math:`\sigma > 0`, and returns the scalar kernel value.

References:
  Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
  ICLR 2020 (arXiv 1910.09652).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp

Kernel = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
KernelLike = Union[str, Callable[..., jax.Array]]
BandwidthLike = Union[str, float]

#: Smallest bandwidth any rule returns: identical samples give a zero mean
#: distance, and a zero bandwidth would turn the kernel into 0/0.
MIN_BANDWIDTH = 1e-12


def gaussian(x: jax.Array, y: jax.Array, bandwidth: jax.Array) -> jax.Array:
  r"""Gaussian kernel in the published form.

  .. math:: k(x, y) = \exp\left(-\frac{\|x - y\|^2}{2\sigma}\right)

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import kernels
    >>> float(kernels.gaussian(jnp.zeros(2), jnp.ones(2), 1.0))  # exp(-1)
    0.36787...
  """
  return jnp.exp(-0.5 * jnp.sum(jnp.square(x - y)) / bandwidth)


def rational_quadratic(
    x: jax.Array, y: jax.Array, bandwidth: jax.Array, alpha: float = 1.0
) -> jax.Array:
  r"""Rational quadratic kernel (the paper's kernel ablation).

  .. math:: k(x, y) = \left(1 + \frac{\|x - y\|^2}{2\alpha\sigma}\right)^{-\alpha}

  It tends to the Gaussian kernel as :math:`\alpha \to \infty`. Its extra
  argument, ``alpha``, is fixed with ``functools.partial`` to pass the kernel
  to the estimator.

  Args:
    x: a point of shape ``(d,)``.
    y: a point of shape ``(d,)``.
    bandwidth: :math:`\sigma > 0`.
    alpha: the shape parameter :math:`\alpha > 0`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import kernels
    >>> float(kernels.rational_quadratic(jnp.zeros(2), jnp.ones(2), 1.0))
    0.5
  """
  sq = jnp.sum(jnp.square(x - y))
  return (1.0 + 0.5 * sq / (alpha * bandwidth)) ** (-alpha)


def inverse_multiquadric(
    x: jax.Array, y: jax.Array, bandwidth: jax.Array
) -> jax.Array:
  r"""Inverse multiquadric kernel.

  .. math:: k(x, y) = \left(1 + \frac{\|x - y\|^2}{\sigma}\right)^{-1/2}

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import kernels
    >>> float(kernels.inverse_multiquadric(jnp.zeros(2), jnp.ones(2), 2.0))
    0.7071...
  """
  return jax.lax.rsqrt(1.0 + jnp.sum(jnp.square(x - y)) / bandwidth)


KERNELS: dict[str, Kernel] = {
    'gaussian': gaussian,
    'rational_quadratic': rational_quadratic,
    'inverse_multiquadric': inverse_multiquadric,
}


def resolve_kernel(kernel: KernelLike) -> Kernel:
  """Returns ``kernel`` as a function ``k(x, y, bandwidth)``.

  Args:
    kernel: a name from :data:`KERNELS`, a function ``k(x, y, bandwidth)``,
      or a function ``k(x, y)`` (its bandwidth, if any, is its own business;
      the estimator's bandwidth is then ignored).

  Returns:
    A scalar function of ``(x, y, bandwidth)``.

  Raises:
    ValueError: for an unknown name or a callable that takes neither two nor
      three positional arguments.
  """
  if isinstance(kernel, str):
    try:
      return KERNELS[kernel]
    except KeyError:
      raise ValueError(
          f'Unknown kernel={kernel!r}; valid names are {sorted(KERNELS)}, or '
          'pass a scalar function k(x, y) or k(x, y, bandwidth).'
      ) from None
  if not callable(kernel):
    raise ValueError(
        f'kernel must be a name from {sorted(KERNELS)} or a callable, got '
        f'{type(kernel).__name__}.'
    )
  num_args = _num_positional_args(kernel)
  if num_args == 2:
    return lambda x, y, bandwidth: kernel(x, y)
  if num_args == 3 or num_args is None:
    return kernel
  raise ValueError(
      'A user kernel must take two positional arguments k(x, y) or three '
      f'k(x, y, bandwidth); {kernel!r} takes {num_args}.'
  )


def check_scalar_kernel(kernel: Kernel, dim: int, dtype: Any) -> None:
  """Raises a ValueError unless ``kernel(x, y, bandwidth)`` returns a scalar.

  Checked on shapes only (``jax.eval_shape``), at trace time, for samples
  of ``dim`` coordinates.
  """
  point = jax.ShapeDtypeStruct((dim,), dtype)
  shape = jax.eval_shape(
      kernel, point, point, jax.ShapeDtypeStruct((), dtype)
  ).shape
  if shape != ():
    raise ValueError(
        'kernel must return a scalar k(x, y) for two samples x and y; it '
        f'returned shape {shape}. Reduce over the sample\'s coordinates, e.g. '
        'jnp.exp(-jnp.sum((x - y) ** 2)).'
    )


def _num_positional_args(fn: Callable[..., jax.Array]) -> int | None:
  """Number of required positional parameters, None if it cannot be told."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return None
  if any(p.kind is p.VAR_POSITIONAL for p in params):
    return None
  return sum(
      1
      for p in params
      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
      and p.default is p.empty
  )


def squared_distances(basis: jax.Array, samples: jax.Array) -> jax.Array:
  """All squared distances ``‖basis[m] - samples[n]‖²``, shape ``(M, N)``."""
  diff = basis[:, None, :] - samples[None, :, :]
  return jnp.sum(jnp.square(diff), axis=-1)


def mean_distance_bandwidth(
    basis: jax.Array, samples: jax.Array, log_bandwidth: float | jax.Array = 0.0
) -> jax.Array:
  r"""The published bandwidth rule.

  .. math:: \sigma = 10^{\ell} \cdot \frac{1}{MN}\sum_{m,n}\|Y_m - X_n\|^2

  Args:
    basis: basis points, shape ``(M, d)``.
    samples: samples, shape ``(N, d)``.
    log_bandwidth: :math:`\ell`, the base-10 log of the multiplier.

  Returns:
    The scalar bandwidth, floored at :data:`MIN_BANDWIDTH`.
  """
  return _scaled(jnp.mean(squared_distances(basis, samples)), log_bandwidth)


def median_bandwidth(
    basis: jax.Array, samples: jax.Array, log_bandwidth: float | jax.Array = 0.0
) -> jax.Array:
  r"""The median heuristic: :math:`10^{\ell}\,\mathrm{median}_{m,n}\|Y_m - X_n\|^2`.

  Its arguments and its floor are those of :func:`mean_distance_bandwidth`.
  """
  return _scaled(jnp.median(squared_distances(basis, samples)), log_bandwidth)


def _scaled(sigma: jax.Array, log_bandwidth: float | jax.Array) -> jax.Array:
  r""":math:`10^{\ell}\sigma`, floored at :data:`MIN_BANDWIDTH`."""
  return jnp.maximum(sigma * 10.0**log_bandwidth, MIN_BANDWIDTH)


BANDWIDTH_RULES = {
    'mean_distance': mean_distance_bandwidth,
    'median': median_bandwidth,
}


def select_bandwidth(
    bandwidth: BandwidthLike,
    basis: jax.Array,
    samples: jax.Array,
    log_bandwidth: float | jax.Array = 0.0,
) -> jax.Array:
  """Applies a bandwidth rule by name, or returns a fixed value.

  Args:
    bandwidth: ``'mean_distance'`` (the published rule), ``'median'``, or a
      positive number used as is (``log_bandwidth`` is then ignored).
    basis: basis points, shape ``(M, d)``.
    samples: samples, shape ``(N, d)``.
    log_bandwidth: base-10 log of the multiplier applied by the rules.

  Returns:
    A scalar bandwidth in the dtype of ``samples``, at least
    :data:`MIN_BANDWIDTH`.

  Raises:
    ValueError: for an unknown rule name.
  """
  if isinstance(bandwidth, str):
    try:
      rule = BANDWIDTH_RULES[bandwidth]
    except KeyError:
      raise ValueError(
          f'Unknown bandwidth={bandwidth!r}; valid rules are '
          f'{sorted(BANDWIDTH_RULES)}, or pass a positive number.'
      ) from None
    return rule(basis, samples, log_bandwidth).astype(samples.dtype)
  if isinstance(bandwidth, (int, float)) and not bandwidth > 0:
    raise ValueError(
        f'bandwidth={bandwidth!r} must be positive; pass a positive number or '
        f'one of the rules {sorted(BANDWIDTH_RULES)}.'
    )
  value = jnp.asarray(bandwidth, dtype=samples.dtype)
  return jnp.maximum(value, MIN_BANDWIDTH)
