r"""The KWNG estimator as pure functions (SPEC §1).

:func:`natural_gradient` is the optax-free entry point. It is the
composition of :func:`build_preconditioner` (samples, basis, kernel factors,
whitening and damping: everything independent of the gradient and of
:math:`\epsilon`) and :func:`apply_preconditioner` (the M×M Woodbury solve).

References:
  Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
  ICLR 2020 (arXiv 1910.09652).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from kwng_jax import factors
from kwng_jax import kernels as kernels_lib
from kwng_jax import solve

PyTree = Any
OutputsFn = Callable[[PyTree], jax.Array]


class KWNGInfo(NamedTuple):
  """Diagnostics of one KWNG direction; all device scalars, no host sync.

  Attributes:
    bandwidth: the kernel bandwidth used.
    effective_rank: the number of eigenvalues of the Gram Q (Q + λK with a
      ridge) kept by the whitening; at most M.
    alignment: :math:`\\langle g, \\hat g\\rangle`; positive for a descent
      direction.
    fallback: True when :math:`\\hat g` is not finite or
      :math:`\\langle g, \\hat g\\rangle \\le 0`; :func:`kwng_jax.scale_by_kwng`
      then uses g instead.
    finite_inputs: False when the gradient or the samples hold NaN or Inf.
  """

  bandwidth: jax.Array
  effective_rank: jax.Array
  alignment: jax.Array
  fallback: jax.Array
  finite_inputs: jax.Array

  @classmethod
  def empty(cls) -> 'KWNGInfo':
    """Placeholder diagnostics, for an optimizer state before any step."""
    return cls(
        bandwidth=jnp.zeros((), jnp.float32),
        effective_rank=jnp.zeros((), jnp.int32),
        alignment=jnp.zeros((), jnp.float32),
        fallback=jnp.zeros((), jnp.bool_),
        finite_inputs=jnp.ones((), jnp.bool_),
    )


class Preconditioner(NamedTuple):
  r"""What one step of KWNG builds before it sees g or :math:`\epsilon`.

  Attributes:
    whitened: :math:`\tilde T`, a params-shaped pytree with a leading axis M.
    damping: D, a params-shaped pytree.
    gram: :math:`\tilde T D \tilde T^\top`, shape (M, M).
    bandwidth: the kernel bandwidth used.
    effective_rank: the number of kept eigenvalues of the Gram matrix.
    finite_samples: whether the samples were all finite.
  """

  whitened: PyTree
  damping: PyTree
  gram: jax.Array
  bandwidth: jax.Array
  effective_rank: jax.Array
  finite_samples: jax.Array


def _check_positive(name: str, value: Any) -> None:
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f'{name}={value!r} must be positive.')


def build_preconditioner(
    outputs_fn: OutputsFn,
    params: PyTree,
    *,
    key: jax.Array | None = None,
    num_basis: int = 5,
    kernel: kernels_lib.KernelLike = 'gaussian',
    bandwidth: kernels_lib.BandwidthLike = 'mean_distance',
    log_bandwidth: float = 0.0,
    damping: str = 'reference',
    ridge: float = 0.0,
    rcond: float | None = None,
    basis_indices: jax.Array | None = None,
    basis_coords: jax.Array | None = None,
) -> Preconditioner:
  r"""Builds the whitened factor, the damping and the M×M Gram of one step.

  Runs ``outputs_fn`` once under ``jax.vjp``, draws (or takes) the basis,
  computes W, Q (and K if ``ridge > 0``) and T, whitens T by
  :math:`(Q + \lambda K)^{-1/2}` and forms D. Arguments are those of
  :func:`natural_gradient`.

  Returns:
    A :class:`Preconditioner`.
  """
  if outputs_fn is None or not callable(outputs_fn):
    raise ValueError(
        'KWNG needs outputs_fn, a function params -> samples of shape (N, ...) '
        '(for a classifier: the logits of the batch). Pass it as the keyword '
        'outputs_fn=...'
    )
  if params is None:
    raise ValueError(
        'KWNG needs the current params to differentiate outputs_fn: pass '
        'params to the update.'
    )
  solve.check_damping(damping)
  kernel_fn = kernels_lib.resolve_kernel(kernel)
  if isinstance(ridge, (int, float)) and ridge < 0:
    raise ValueError(f'ridge={ridge!r} must be >= 0 (0 gives the ridgeless estimator).')

  raw_samples, vjp_fn = jax.vjp(outputs_fn, params)
  raw_samples = jnp.asarray(raw_samples)
  samples = factors.as_sample_matrix(raw_samples)
  num_samples, dim = samples.shape

  if (basis_indices is None) != (basis_coords is None):
    raise ValueError(
        'Pass both basis_indices and basis_coords to pin the basis, or neither.'
    )
  if basis_indices is None:
    if key is None:
      raise ValueError(
          'KWNG draws a random basis: pass key=jax.random.key(...), or pin the '
          'basis with basis_indices and basis_coords.'
      )
    basis_indices, basis_coords = factors.select_basis(
        num_samples, dim, num_basis, key=key
    )
  else:
    basis_indices = jnp.asarray(basis_indices, jnp.int32)
    basis_coords = jnp.asarray(basis_coords, jnp.int32)
    if basis_indices.shape != basis_coords.shape or basis_indices.ndim != 1:
      raise ValueError(
          'basis_indices and basis_coords must both have shape (M,); got '
          f'{basis_indices.shape} and {basis_coords.shape}.'
      )
    factors.check_num_basis(basis_indices.shape[0], num_samples)

  # Kernel algebra in at least float32 even for bf16 samples.
  kernel_dtype = solve.at_least_float32(samples.dtype)
  points = samples.astype(kernel_dtype)
  finite_samples = jnp.all(jnp.isfinite(points))
  basis = points[basis_indices]
  sigma = kernels_lib.select_bandwidth(
      bandwidth,
      basis,
      points,
      jnp.asarray(log_bandwidth).astype(kernel_dtype),
  )
  cross = factors.cross_derivatives(kernel_fn, basis, basis_coords, points, sigma)
  gram = factors.basis_gradient_gram(cross)
  if not (isinstance(ridge, (int, float)) and ridge == 0):
    rkhs = factors.basis_rkhs_gram(kernel_fn, basis, basis_coords, sigma)
    gram = gram + jnp.asarray(ridge).astype(kernel_dtype) * rkhs
  jacobian = factors.jacobian_factor(
      vjp_fn, cross, raw_samples.shape, raw_samples.dtype
  )
  whitened, rank = solve.whitened_jacobian(jacobian, gram, rcond)
  damping_diag = solve.damping_diagonal(whitened, damping)
  return Preconditioner(
      whitened=whitened,
      damping=damping_diag,
      gram=solve.damped_gram(whitened, damping_diag),
      bandwidth=sigma.astype(jnp.float32),
      effective_rank=rank,
      finite_samples=finite_samples,
  )


def apply_preconditioner(
    preconditioner: Preconditioner, grads: PyTree, epsilon: jax.Array
) -> tuple[PyTree, KWNGInfo]:
  r"""Returns :math:`\hat g = (\tilde T^\top\tilde T + \epsilon D^{-1})^{-1} g` and diagnostics."""
  _check_positive('epsilon', epsilon)
  direction = solve.damped_natural_gradient(
      grads,
      preconditioner.whitened,
      preconditioner.damping,
      preconditioner.gram,
      epsilon,
  )
  alignment = otu.tree_vdot(
      otu.tree_cast(grads, jnp.float32), otu.tree_cast(direction, jnp.float32)
  )
  finite_grads = _tree_all_finite(grads)
  finite_direction = _tree_all_finite(direction)
  info = KWNGInfo(
      bandwidth=preconditioner.bandwidth,
      effective_rank=preconditioner.effective_rank,
      alignment=alignment,
      fallback=~(finite_direction & (alignment > 0)),
      finite_inputs=finite_grads & preconditioner.finite_samples,
  )
  return direction, info


def _tree_all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def natural_gradient(
    grads: PyTree,
    outputs_fn: OutputsFn,
    params: PyTree,
    *,
    key: jax.Array | None = None,
    num_basis: int = 5,
    epsilon: float | jax.Array = 1e-5,
    kernel: kernels_lib.KernelLike = 'gaussian',
    bandwidth: kernels_lib.BandwidthLike = 'mean_distance',
    log_bandwidth: float = 0.0,
    damping: str = 'reference',
    ridge: float = 0.0,
    rcond: float | None = None,
    basis_indices: jax.Array | None = None,
    basis_coords: jax.Array | None = None,
) -> tuple[PyTree, KWNGInfo]:
  r"""The kernelized Wasserstein natural gradient :math:`\hat g` of ``grads``.

  With the samples :math:`X = ` ``outputs_fn(params)`` (shape ``(N, ...)``,
  flattened to ``(N, d)``), M basis functions and the factors T, Q (and K)
  of SPEC §1.1, returns

  .. math::
     \hat g = (T^\top (Q + \lambda K)^{+} T + \epsilon D^{-1})^{-1} g,

  computed through an M×M system only. ``ridge`` is :math:`\lambda`
  (0: the ridgeless estimator of the paper's experiments). This is
  :math:`\hat g` itself: no fallback, no clipping (see
  :func:`kwng_jax.scale_by_kwng` for those).

  Args:
    grads: g, the Euclidean gradient, a pytree shaped like ``params``.
    outputs_fn: ``params -> samples`` with a leading batch axis N.
    params: the point where the samples are differentiated.
    key: PRNG key for the basis; not needed when the basis is pinned.
    num_basis: M, the number of basis functions (at most N).
    epsilon: the damping strength :math:`\epsilon > 0`.
    kernel: a name in :data:`kwng_jax.kernels.KERNELS`, or a scalar function
      ``k(x, y)`` or ``k(x, y, bandwidth)``.
    bandwidth: ``'mean_distance'`` (published), ``'median'``, or a number.
    log_bandwidth: base-10 log of the multiplier of the bandwidth rule.
    damping: ``'reference'``, ``'squared'`` or ``'identity'`` (SPEC §1.2).
    ridge: :math:`\lambda \ge 0`.
    rcond: relative eigenvalue threshold of the whitening.
    basis_indices: M distinct sample indices, pins the basis (with
      ``basis_coords``).
    basis_coords: M coordinates in ``[0, d)``.

  Returns:
    ``(direction, info)``: :math:`\hat g` shaped and typed like ``grads``,
    and :class:`KWNGInfo` diagnostics.

  Raises:
    ValueError: at trace time, for ``num_basis`` larger than the batch, a
      missing ``outputs_fn`` or ``key``, or an unknown kernel or damping.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import kwng_jax
    >>> z = jax.random.normal(jax.random.key(0), (256, 2))
    >>> params = {'mu': jnp.zeros(2), 'a': jnp.eye(2)}
    >>> outputs_fn = lambda p: p['mu'][None, :] + z @ p['a'].T
    >>> grads = {'mu': jnp.ones(2), 'a': jnp.eye(2)}
    >>> direction, info = kwng_jax.natural_gradient(
    ...     grads, outputs_fn, params, key=jax.random.key(1), num_basis=16)
    >>> bool(info.alignment > 0)
    True

  References:
    Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
    ICLR 2020 (arXiv 1910.09652).
  """
  preconditioner = build_preconditioner(
      outputs_fn,
      params,
      key=key,
      num_basis=num_basis,
      kernel=kernel,
      bandwidth=bandwidth,
      log_bandwidth=log_bandwidth,
      damping=damping,
      ridge=ridge,
      rcond=rcond,
      basis_indices=basis_indices,
      basis_coords=basis_coords,
  )
  return apply_preconditioner(preconditioner, grads, epsilon)
