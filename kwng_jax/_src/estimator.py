r"""The KWNG estimator as pure functions.

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
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from kwng_jax import factors
from kwng_jax import kernels as kernels_lib
from kwng_jax._src import options
from kwng_jax._src import outputs as outputs_lib
from kwng_jax._src import sharding
from kwng_jax import solve

PyTree = Any
OutputsFn = Callable[[PyTree], jax.Array]

#: Matmul precision of the algebra after the VJPs (whitening, damping, the
#: Woodbury solve). GPUs otherwise round float32 products to TF32, which the
#: whitening by :math:`Q^{-1/2}` amplifies: on an H200, default precision gave
#: a relative error of 80 against the exact Wasserstein natural gradient of
#: the Cholesky Gaussian, 'highest' 0.05 (the CPU value). The VJPs themselves
#: keep the precision the caller chose.
FULL_PRECISION = 'highest'


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
    finite_inputs: False when the gradient or the samples hold NaN or Inf;
      the update of :func:`kwng_jax.scale_by_kwng` is then zero.
    depends_on_params: False when the samples do not depend on the params
      (T is zero): the direction is then the damped gradient, and
      ``outputs_fn`` is likely wrong (it closes over the model instead of
      using its argument).
    valid_hyperparameters: False when a hyperparameter given as a traced
      value (:math:`\\epsilon`, ridge, bandwidth, rcond, a pinned basis;
      e.g. through ``optax.inject_hyperparams``) was out of range; the
      update of :func:`kwng_jax.scale_by_kwng` is then zero.
  """

  bandwidth: jax.Array
  effective_rank: jax.Array
  alignment: jax.Array
  fallback: jax.Array
  finite_inputs: jax.Array
  depends_on_params: jax.Array
  valid_hyperparameters: jax.Array

  @classmethod
  def empty(cls) -> 'KWNGInfo':
    """Placeholder diagnostics, for an optimizer state before any step."""
    return cls(
        bandwidth=jnp.zeros((), jnp.float32),
        effective_rank=jnp.zeros((), jnp.int32),
        alignment=jnp.zeros((), jnp.float32),
        fallback=jnp.zeros((), jnp.bool_),
        finite_inputs=jnp.ones((), jnp.bool_),
        depends_on_params=jnp.ones((), jnp.bool_),
        valid_hyperparameters=jnp.ones((), jnp.bool_),
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
    depends_on_params: whether T is nonzero, i.e. the samples depend on the
      params (False: every step is the damped gradient).
    valid_hyperparameters: whether the options given as traced values
      (ridge, bandwidth, rcond, a pinned basis) were in range.
    unseen: with ``damping='safe'``, the curvature given to the parameters
      the samples do not see (:func:`kwng_jax.solve.safe_damping`);
      None otherwise.
  """

  whitened: PyTree
  damping: PyTree
  gram: jax.Array
  bandwidth: jax.Array
  effective_rank: jax.Array
  finite_samples: jax.Array
  depends_on_params: jax.Array
  valid_hyperparameters: jax.Array
  unseen: PyTree | None = None

  @classmethod
  def empty(
      cls, params: PyTree, num_basis: int, damping: str = 'reference'
  ) -> 'Preconditioner':
    r"""Zeros shaped, typed and sharded like a built preconditioner.

    A placeholder for an optimizer state that stores the factors
    (``update_every > 1``): it needs only the shapes and dtypes of
    ``params`` (arrays or ``jax.ShapeDtypeStruct``), never the samples.
    ``finite_samples`` is False, which marks it as not built yet.

    Args:
      params: the parameters (or their shape-dtype structs).
      num_basis: M.
      damping: the damping it will hold (``'safe'`` stores one more
        params-shaped pytree).

    Returns:
      A :class:`Preconditioner` with :math:`\tilde T` of shape
      ``(M, *p.shape)`` per leaf ``p``, D shaped like ``params``, and an
      M×M Gram.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import kwng_jax
      >>> params = {'w': jax.ShapeDtypeStruct((3, 4), jnp.float32)}
      >>> empty = kwng_jax.Preconditioner.empty(params, num_basis=5)
      >>> empty.whitened['w'].shape, empty.gram.shape
      ((5, 3, 4), (5, 5))
    """
    if num_basis < 1:
      raise ValueError(f'num_basis={num_basis!r} must be at least 1.')
    dtype = solve.at_least_float32(*(p.dtype for p in jax.tree.leaves(params)))

    def leading(p):
      # zeros_like keeps the sharding of p (and accepts ShapeDtypeStruct).
      zeros = jnp.zeros_like(p, dtype=dtype)
      return jnp.broadcast_to(zeros[None], (num_basis,) + tuple(p.shape))

    matrix_dtype = solve.small_matrix_dtype()
    solve.check_damping(damping)
    zeros = lambda p: jnp.zeros_like(p, dtype=dtype)  # noqa: E731
    return cls(
        whitened=jax.tree.map(leading, params),
        damping=jax.tree.map(zeros, params),
        gram=jnp.zeros((num_basis, num_basis), matrix_dtype),
        bandwidth=jnp.zeros((), jnp.float32),
        effective_rank=jnp.zeros((), jnp.int32),
        finite_samples=jnp.zeros((), jnp.bool_),
        depends_on_params=jnp.zeros((), jnp.bool_),
        valid_hyperparameters=jnp.ones((), jnp.bool_),
        unseen=jax.tree.map(zeros, params) if damping == 'safe' else None,
    )


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
    jacobian_samples: int | None = None,
    jacobian_dtype: Any = None,
    jacobian_outputs_fn: OutputsFn | None = None,
) -> Preconditioner:
  r"""Builds the whitened factor, the damping and the M×M Gram of one step.

  Runs ``outputs_fn`` once under ``jax.vjp``, draws (or takes) the basis,
  computes W, Q (and K if ``ridge > 0``) and T, whitens T by
  :math:`(Q + \lambda K)^{-1/2}` and forms D. Arguments are those of
  :func:`natural_gradient`.

  Returns:
    A :class:`Preconditioner`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import kwng_jax
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> params = {'w': jnp.ones((3, 4))}
    >>> outputs_fn = lambda p: jnp.tanh(x @ p['w'])
    >>> pre = kwng_jax.build_preconditioner(
    ...     outputs_fn, params, key=jax.random.key(1), num_basis=5)
    >>> grads = {'w': jnp.ones((3, 4))}
    >>> direction, info = kwng_jax.apply_preconditioner(pre, grads, 1e-5)
    >>> pre.whitened['w'].shape, direction['w'].shape
    ((5, 3, 4), (3, 4))
  """
  if outputs_fn is None or not callable(outputs_fn):
    raise ValueError(
        'KWNG needs outputs_fn, a function params -> samples of shape (N, ...) '
        '(for a classifier: the logits of the batch). Pass it as the keyword '
        'outputs_fn=...'
    )
  if jacobian_outputs_fn is not None and not callable(jacobian_outputs_fn):
    raise ValueError(
        'jacobian_outputs_fn must be a function params -> samples of the '
        'first jacobian_samples rows of the batch.'
    )
  outputs_lib.check_params(params)
  options.check_estimator_options(
      num_basis=num_basis, kernel=kernel, bandwidth=bandwidth,
      log_bandwidth=log_bandwidth, damping=damping, ridge=ridge, rcond=rcond,
      jacobian_samples=jacobian_samples, jacobian_dtype=jacobian_dtype,
  )
  kernel_fn = kernels_lib.resolve_kernel(kernel)

  jacobian_params = params
  if jacobian_dtype is not None:
    jacobian_params = jax.tree.map(lambda p: p.astype(jacobian_dtype), params)
  jacobian_fn = outputs_fn if jacobian_outputs_fn is None else jacobian_outputs_fn
  with outputs_lib.explained_errors():
    jacobian_outputs, vjp_fn = jax.vjp(jacobian_fn, jacobian_params)
  jacobian_outputs = outputs_lib.as_samples(jacobian_outputs)
  _warn_if_independent_of_params(vjp_fn, jacobian_outputs)
  if jacobian_outputs_fn is None and jacobian_dtype is None:
    # One forward pass gives the samples and the VJP.
    raw_samples = jacobian_outputs
  else:
    # The samples the kernel sees stay in the params' precision, on the
    # whole batch; under jit this forward pass is shared with the loss's.
    with outputs_lib.explained_errors():
      raw_samples = outputs_lib.as_samples(outputs_fn(params))
  samples = factors.as_sample_matrix(raw_samples)
  num_samples, dim = samples.shape
  num_rows = _jacobian_rows(
      jacobian_samples, jacobian_outputs_fn, jacobian_outputs, raw_samples
  )

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
    valid_basis = jnp.ones((), jnp.bool_)
  else:
    basis_indices, basis_coords, valid_basis = factors.check_pinned_basis(
        basis_indices, basis_coords, num_samples, dim
    )
  valid_hyperparameters = valid_basis & options.traced_options_valid(
      bandwidth=bandwidth, log_bandwidth=log_bandwidth, ridge=ridge, rcond=rcond
  )

  # Kernel algebra in at least float32 even for bf16 samples.
  kernel_dtype = solve.at_least_float32(samples.dtype)
  points = samples.astype(kernel_dtype)
  kernels_lib.check_scalar_kernel(kernel_fn, dim, kernel_dtype)
  finite_samples = jnp.all(jnp.isfinite(points))
  # The basis is gathered out of a (possibly sharded) batch onto every device.
  basis = points.at[basis_indices].get(out_sharding=sharding.replicated())
  log_multiplier = jnp.asarray(log_bandwidth).astype(kernel_dtype)
  sigma = sharding.in_auto_mode(
      lambda b, x: kernels_lib.select_bandwidth(bandwidth, b, x, log_multiplier),
      out_sharding=PartitionSpec(),
  )(basis, points)
  rows = points if num_rows == num_samples else points[:num_rows]
  cross = factors.cross_derivatives(kernel_fn, basis, basis_coords, rows, sigma)
  gram = factors.basis_gradient_gram(cross)
  if not (isinstance(ridge, (int, float)) and ridge == 0):
    rkhs = factors.basis_rkhs_gram(kernel_fn, basis, basis_coords, sigma)
    gram = gram + jnp.asarray(ridge).astype(kernel_dtype) * rkhs
  jacobian = factors.jacobian_factor(
      vjp_fn, cross, jacobian_outputs.shape, jacobian_outputs.dtype
  )
  depends_on_params = _tree_any_nonzero(jacobian)
  if jacobian_dtype is not None:
    # Back to the params' dtypes: everything after the VJP (whitening,
    # damping, the M×M solve) runs in the precision of the default path.
    jacobian = jax.tree.map(lambda t, p: t.astype(p.dtype), jacobian, params)
  with jax.default_matmul_precision(FULL_PRECISION):
    whitened, rank = solve.whitened_jacobian(jacobian, gram, rcond)
    if damping == 'safe':
      damping_diag, unseen = solve.safe_damping(whitened)
    else:
      damping_diag, unseen = solve.damping_diagonal(whitened, damping), None
    # The contraction over the parameters runs over FSDP-sharded axes.
    damped_gram = sharding.in_auto_mode(
        solve.damped_gram, out_sharding=PartitionSpec()
    )(whitened, damping_diag)
  return Preconditioner(
      whitened=whitened,
      damping=damping_diag,
      gram=damped_gram,
      bandwidth=sigma.astype(jnp.float32),
      effective_rank=rank,
      finite_samples=finite_samples,
      depends_on_params=depends_on_params,
      valid_hyperparameters=valid_hyperparameters,
      unseen=unseen,
  )


def apply_preconditioner(
    preconditioner: Preconditioner, grads: PyTree, epsilon: jax.Array
) -> tuple[PyTree, KWNGInfo]:
  r"""Returns :math:`\hat g = (\tilde T^\top\tilde T + \epsilon D^{-1})^{-1} g` and diagnostics."""
  options.check_positive('epsilon', epsilon)
  if jax.tree.structure(grads) != jax.tree.structure(preconditioner.damping):
    raise ValueError(
        'grads must be shaped like params (one gradient leaf per parameter); '
        f'got the structure {jax.tree.structure(grads)} for params of '
        f'structure {jax.tree.structure(preconditioner.damping)}.'
    )
  solve_fn = sharding.in_auto_mode(
      solve.damped_natural_gradient,
      out_sharding=jax.tree.map(sharding.spec_of, grads),
  )
  with jax.default_matmul_precision(FULL_PRECISION):
    direction = solve_fn(
        grads,
        preconditioner.whitened,
        preconditioner.damping,
        preconditioner.gram,
        jnp.asarray(epsilon),
        preconditioner.unseen,
    )
  alignment = sharding.tree_vdot(grads, direction)
  finite_grads = _tree_all_finite(grads)
  finite_direction = _tree_all_finite(direction)
  info = KWNGInfo(
      bandwidth=preconditioner.bandwidth,
      effective_rank=preconditioner.effective_rank,
      alignment=alignment,
      fallback=~(finite_direction & (alignment > 0)),
      finite_inputs=finite_grads & preconditioner.finite_samples,
      depends_on_params=preconditioner.depends_on_params,
      valid_hyperparameters=preconditioner.valid_hyperparameters
      & options.traced_options_valid(epsilon=epsilon),
  )
  return direction, info


def _jacobian_rows(
    jacobian_samples: int | None,
    jacobian_outputs_fn: OutputsFn | None,
    jacobian_outputs: jax.Array,
    raw_samples: jax.Array,
) -> int:
  """n, the number of leading samples W, Q and T are computed from."""
  num_samples = raw_samples.shape[0]
  if jacobian_outputs_fn is not None:
    num_rows = jacobian_outputs.shape[0] if jacobian_outputs.ndim else 0
    if jacobian_outputs.shape[1:] != raw_samples.shape[1:] or (
        jacobian_samples is not None and num_rows != jacobian_samples
    ):
      raise ValueError(
          'jacobian_outputs_fn must return the first jacobian_samples='
          f'{jacobian_samples} rows of what outputs_fn returns '
          f'{raw_samples.shape}; it returned shape {jacobian_outputs.shape}.'
      )
  else:
    num_rows = num_samples if jacobian_samples is None else jacobian_samples
  if not 1 <= num_rows <= num_samples:
    raise ValueError(
        f'jacobian_samples={num_rows} must be between 1 and the batch size '
        f'N={num_samples} (the leading axis of what outputs_fn returns).'
    )
  return num_rows


def _warn_if_independent_of_params(vjp_fn: Callable[..., Any], samples: jax.Array) -> None:
  """Warns at trace time when the samples provably do not depend on the params.

  Then T is zero and every step is the damped gradient (flagged at run time
  by ``KWNGInfo.depends_on_params``). The VJP is traced once more for the
  check; its jaxpr is not run.
  """
  if not outputs_lib.depends_on_input(jax.make_jaxpr(vjp_fn)(samples)):
    warnings.warn(
        'The samples of outputs_fn do not depend on params, so KWNG reduces '
        'to a damped gradient step. outputs_fn must compute the samples from '
        'the params it is given: lambda p: model.apply(p, x), or for NNX '
        'kwng_jax.flax_utils.nnx_outputs_fn(model, x), not a closure over '
        'the model.',
        RuntimeWarning,
        stacklevel=4,
    )


def _tree_any_nonzero(tree: PyTree) -> jax.Array:
  leaves = [jnp.any(x != 0) for x in jax.tree.leaves(tree)]
  return jnp.any(jnp.stack(leaves))


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
    jacobian_samples: int | None = None,
    jacobian_dtype: Any = None,
    jacobian_outputs_fn: OutputsFn | None = None,
) -> tuple[PyTree, KWNGInfo]:
  r"""The kernelized Wasserstein natural gradient :math:`\hat g` of ``grads``.

  With the samples :math:`X = ` ``outputs_fn(params)`` (shape ``(N, ...)``,
  flattened to ``(N, d)``), M basis functions and the factors T, Q (and K)
  of :mod:`kwng_jax.factors`, returns

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
    damping: ``'reference'`` (published), ``'safe'``, ``'squared'`` or
      ``'identity'`` (see :func:`kwng_jax.solve.damping_diagonal`).
    ridge: :math:`\lambda \ge 0`.
    rcond: relative eigenvalue threshold of the whitening.
    basis_indices: M distinct sample indices, pins the basis (with
      ``basis_coords``).
    basis_coords: M coordinates in ``[0, d)``.
    jacobian_samples: n; W, Q and T are computed from the first n samples
      only (the basis and the bandwidth still from all N). It is the KWNG
      estimate of the sub-batch, with the basis of the whole batch. The M
      vector–Jacobian products cost n/N of the full ones only when
      ``jacobian_outputs_fn`` computes those n samples alone; without it,
      the numbers are the same and the cost that of the whole batch.
    jacobian_dtype: e.g. ``jnp.bfloat16``: the params are cast to it for
      the VJPs that give T (``outputs_fn`` must then compute in the dtype of
      the params it is given). The samples, W, Q, the whitening and the M×M
      solve stay in the params' precision (at least float32).
    jacobian_outputs_fn: ``params -> samples`` of the first n rows of the
      batch alone (e.g. ``lambda p: model(p, x[:n])``), differentiated for T
      instead of ``outputs_fn``; n is read from its output.

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
      jacobian_samples=jacobian_samples,
      jacobian_dtype=jacobian_dtype,
      jacobian_outputs_fn=jacobian_outputs_fn,
  )
  return apply_preconditioner(preconditioner, grads, epsilon)
