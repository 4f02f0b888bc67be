r"""The preconditioner of one KWNG step, from samples and their VJP.

Everything :func:`kwng_jax.build_preconditioner` builds after its forward
pass: the basis, the bandwidth, W and Q from the samples, T from M calls of
the VJP, the whitening and the damping. :func:`preconditioner_from_vjp` is
its public entry point, for a forward pass already run.

References:
  Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
  ICLR 2020 (arXiv 1910.09652).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TYPE_CHECKING
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from kwng_jax import factors
from kwng_jax import kernels as kernels_lib
from kwng_jax import probes
from kwng_jax import solve
from kwng_jax._src import options as options_lib
from kwng_jax._src import outputs as outputs_lib
from kwng_jax._src import sharding
from kwng_jax._src import threefry
from kwng_jax._src.preconditioner import Preconditioner

if TYPE_CHECKING:
  from typing_extensions import Unpack

PyTree = Any
VJPFn = Callable[[jax.Array], tuple[PyTree]]

#: Matmul precision of the algebra after the VJPs (whitening, damping, the
#: Woodbury solve). GPUs otherwise round float32 products to TF32, which the
#: whitening by :math:`Q^{-1/2}` amplifies: on an H200, default precision gave
#: a relative error of 80 against the exact Wasserstein natural gradient of
#: the Cholesky Gaussian, 'highest' 0.05 (the CPU value). The VJPs themselves
#: keep the precision the caller chose.
FULL_PRECISION = 'highest'


def basis_key(seed: int | jax.Array, count: jax.Array) -> jax.Array:
  """The PRNG key of the basis that a transformation draws at step ``count``."""
  return threefry.fold_in(jax.random.key(seed), count)


def probe_key(key: jax.Array | None) -> jax.Array:
  """The PRNG key of the probes of ``damping='metric_diagonal'`` with a pinned basis.

  Derived from ``key``, so that two runs with the same seed use the same
  probes; with no key, a fixed one. A drawn basis and the probes share one
  draw instead.
  """
  if key is None:
    return jax.random.key(0)
  return threefry.fold_in(key, 1)


def preconditioner_from_vjp(
    samples: jax.Array,
    vjp_fn: VJPFn,
    *,
    key: jax.Array | None = None,
    basis_indices: jax.Array | None = None,
    basis_coords: jax.Array | None = None,
    **options: Unpack[options_lib.EstimatorKwargs],
) -> Preconditioner:
  r"""Builds the preconditioner from a forward pass already run.

  ``samples, vjp_fn = jax.vjp(outputs_fn, params)`` is what a training step
  that computes the loss from the model's outputs runs anyway; this builds
  from it what :func:`kwng_jax.build_preconditioner` builds from ``outputs_fn``,
  without a second forward pass: the basis, the bandwidth and W, Q from
  ``samples``, and T from M calls of ``vjp_fn`` (one batched ``jax.vmap``).

  Args:
    samples: the outputs of the whole batch, shape ``(N, ...)``.
    vjp_fn: the VJP function of the outputs at the params, as ``jax.vjp``
      returns it. With ``jacobian_samples=n``, the VJP of the first n
      outputs only (e.g. of ``lambda p: model(p, x[:n])``); with
      ``jacobian_dtype``, of outputs computed in that dtype.
    key: PRNG key for the basis; not needed when the basis is pinned.
    basis_indices: see :func:`kwng_jax.natural_gradient`.
    basis_coords: see :func:`kwng_jax.natural_gradient`.
    **options: the estimator's options, keyword by keyword, as for
      :func:`kwng_jax.natural_gradient` (``num_basis``, ``kernel``,
      ``bandwidth``, ``log_bandwidth``, ``damping``, ``ridge``, ``rcond``,
      ``jacobian_samples``, ``jacobian_dtype``, ``jacobian_batching``).
      Here ``jacobian_samples`` is n, the number of leading samples
      ``vjp_fn`` covers, and ``jacobian_dtype`` the dtype of the outputs it
      differentiates.

  Returns:
    A :class:`kwng_jax.Preconditioner`, the same (to rounding) as
    :func:`kwng_jax.build_preconditioner` of the function ``vjp_fn`` came from.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import kwng_jax
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> params = {'w': jnp.ones((3, 4))}
    >>> samples, vjp_fn = jax.vjp(lambda p: jnp.tanh(x @ p['w']), params)
    >>> pre = kwng_jax.preconditioner_from_vjp(
    ...     samples, vjp_fn, key=jax.random.key(1), num_basis=5)
    >>> direction, info = kwng_jax.apply_preconditioner(
    ...     pre, {'w': jnp.ones((3, 4))}, 1e-5)
    >>> direction['w'].shape
    (3, 4)
  """
  opts = options_lib.EstimatorOptions.from_kwargs('preconditioner_from_vjp', options)
  return from_vjp_of_options(
      samples, vjp_fn, opts, key=key, basis_indices=basis_indices,
      basis_coords=basis_coords,
  )


def from_vjp_of_options(
    samples: jax.Array,
    vjp_fn: VJPFn,
    opts: options_lib.EstimatorOptions,
    *,
    key: jax.Array | None = None,
    basis_indices: jax.Array | None = None,
    basis_coords: jax.Array | None = None,
    diagonal_average: probes.DiagonalAverage | None = None,
    grads: PyTree | None = None,
) -> Preconditioner:
  """:func:`preconditioner_from_vjp` with its options already validated."""
  if not callable(vjp_fn):
    raise ValueError(
        'vjp_fn must be the VJP function jax.vjp returns: '
        'samples, vjp_fn = jax.vjp(outputs_fn, params).'
    )
  samples = outputs_lib.as_samples(samples)
  # 'auto' is the whole batch here: vjp_fn is that of the whole batch.
  num_rows = options_lib.fixed_rows(opts.jacobian_samples) or samples.shape[0]
  if num_rows > samples.shape[0]:
    raise ValueError(
        f'jacobian_samples={num_rows} must be between 1 and the batch size '
        f'N={samples.shape[0]} (the leading axis of the samples).'
    )
  jacobian_like = jax.ShapeDtypeStruct(
      (num_rows,) + samples.shape[1:], opts.jacobian_dtype or samples.dtype
  )
  return from_vjp(
      samples, vjp_fn, opts, key=key, basis_indices=basis_indices,
      basis_coords=basis_coords, jacobian_like=jacobian_like, num_rows=num_rows,
      diagonal_average=diagonal_average, grads=grads,
  )[0]


def from_vjp_with_pullback(
    samples: jax.Array,
    vjp_fn: VJPFn,
    opts: options_lib.EstimatorOptions,
    loss_cotangent: jax.Array,
    *,
    key: jax.Array,
    diagonal_average: probes.DiagonalAverage | None = None,
    direct_grads: PyTree | None = None,
) -> tuple[Preconditioner, PyTree]:
  r"""The preconditioner, and :math:`J^\top` ``loss_cotangent``, in one backward pass.

  The loss cotangent (the gradient of the loss in the samples) is stacked
  with the M kernel cotangents of T, so that the gradient that reaches the
  params through the samples costs no backward pass of its own. The whole
  batch only: ``vjp_fn`` is that of all the samples, in their dtype. With
  ``direct_grads`` (the loss's gradient in the params outside the samples),
  the preconditioner holds :math:`\tilde T D g` for
  :math:`g = J^\top` ``loss_cotangent`` + ``direct_grads``.
  """
  samples = outputs_lib.as_samples(samples)
  jacobian_like = jax.ShapeDtypeStruct(samples.shape, samples.dtype)
  return from_vjp(
      samples, vjp_fn, opts, key=key, basis_indices=None, basis_coords=None,
      jacobian_like=jacobian_like, num_rows=samples.shape[0],
      loss_cotangent=loss_cotangent, diagonal_average=diagonal_average,
      direct_grads=direct_grads,
  )


def from_vjp(
    samples: jax.Array,
    vjp_fn: VJPFn,
    opts: options_lib.EstimatorOptions,
    *,
    key: jax.Array | None,
    basis_indices: jax.Array | None,
    basis_coords: jax.Array | None,
    jacobian_like: jax.ShapeDtypeStruct,
    num_rows: int,
    loss_cotangent: jax.Array | None = None,
    diagonal_average: probes.DiagonalAverage | None = None,
    grads: PyTree | None = None,
    direct_grads: PyTree | None = None,
) -> tuple[Preconditioner, PyTree | None]:
  """The preconditioner from checked samples and the VJP of their first rows.

  ``jacobian_like`` is the shape and dtype of the outputs ``vjp_fn``
  differentiates (n rows, or the whole batch); W, Q and T are computed from
  the first ``num_rows`` = n samples (the basis and the bandwidth from all of
  ``samples``). With ``loss_cotangent`` (whole batch only), its pullback
  comes second, from the same batched VJP; else None. With
  ``diagonal_average`` (an optimizer's state, ``damping='metric_diagonal'``),
  ``probes.AVERAGED_PROBES`` probes update it and the damping uses the
  average, which the preconditioner returns in its ``diagonal_average``.
  With ``grads`` (shaped like the params), the Gram's pass over the rows
  gives :math:`\tilde T D g` too, in ``gradient_products``; with
  ``loss_cotangent`` and ``direct_grads``, g is the loss cotangent's
  pullback plus ``direct_grads``.
  """
  _warn_if_independent_of_params(vjp_fn, jacobian_like)
  points_matrix = factors.as_sample_matrix(samples)
  num_samples, dim = points_matrix.shape
  if not 1 <= num_rows <= num_samples:
    raise ValueError(
        f'jacobian_samples={num_rows} must be between 1 and the batch size '
        f'N={num_samples} (the leading axis of what outputs_fn returns).'
    )

  if (basis_indices is None) != (basis_coords is None):
    raise ValueError(
        'Pass both basis_indices and basis_coords to pin the basis, or neither.'
    )
  num_probes = 0
  if opts.damping == 'metric_diagonal':
    num_probes = probes.NUM_PROBES if diagonal_average is None else probes.AVERAGED_PROBES
  num_probe_words = probes.probe_words(num_probes, num_rows, jacobian_like.shape)
  probe_bits = None
  if basis_indices is None:
    if key is None:
      raise ValueError(
          'KWNG draws a random basis: pass key=jax.random.key(...), or pin the '
          'basis with basis_indices and basis_coords.'
      )
    # The basis and the probes from one random draw: one hash kernel
    # rather than two.
    words = threefry.random_words(key, num_samples + opts.num_basis + num_probe_words)
    basis_indices, basis_coords = factors.basis_from_bits(
        words[:num_samples + opts.num_basis], num_samples, dim)
    probe_bits = words[num_samples + opts.num_basis:]
    valid_basis = jnp.ones((), jnp.bool_)
  else:
    basis_indices, basis_coords, valid_basis = factors.check_pinned_basis(
        basis_indices, basis_coords, num_samples, dim
    )

  kernel_fn = kernels_lib.resolve_kernel(opts.kernel)
  # Kernel algebra in at least float32 even for bf16 samples.
  kernel_dtype = solve.at_least_float32(points_matrix.dtype)
  points = points_matrix.astype(kernel_dtype)
  kernels_lib.check_scalar_kernel(kernel_fn, dim, kernel_dtype)
  finite_samples = jnp.all(jnp.isfinite(points))
  # The basis is gathered out of a (possibly sharded) batch onto every device.
  basis = points.at[basis_indices].get(out_sharding=sharding.replicated())
  log_multiplier = jnp.asarray(opts.log_bandwidth).astype(kernel_dtype)
  sigma = sharding.in_auto_mode(
      lambda b, x: kernels_lib.select_bandwidth(opts.bandwidth, b, x, log_multiplier),
      out_sharding=PartitionSpec(),
  )(basis, points)
  rows = points if num_rows == num_samples else points[:num_rows]
  cross = factors.cross_derivatives(kernel_fn, basis, basis_coords, rows, sigma)
  gram = factors.basis_gradient_gram(cross)
  if not (isinstance(opts.ridge, (int, float)) and opts.ridge == 0):
    rkhs = factors.basis_rkhs_gram(kernel_fn, basis, basis_coords, sigma)
    gram = gram + jnp.asarray(opts.ridge).astype(kernel_dtype) * rkhs
  with jax.default_matmul_precision(FULL_PRECISION):
    mixing, rank = solve.whitening(gram, opts.rcond)
    # T is linear in its cotangents: whitening W before the VJPs gives T̃
    # from them directly, with no pass over an M×P factor.
    whitened_cross = jnp.tensordot(mixing.astype(kernel_dtype), cross, axes=1)
  groups = [factors.kernel_cotangents(whitened_cross, jacobian_like.shape, jacobian_like.dtype)]
  if num_probes:
    # The probes ride in the same backward pass as T, on the same rows.
    if probe_bits is None:
      probe_bits = threefry.random_words(probe_key(key), num_probe_words)
    probe_rows = probes.probe_cotangents_from_bits(
        probe_bits, num_probes, num_rows, jacobian_like.shape, jacobian_like.dtype)
    groups.append(sharding.like(probe_rows, groups[0]))
  if loss_cotangent is not None:
    groups.append(jnp.asarray(loss_cotangent).astype(groups[0].dtype)[None])
  pulled = _pullback_groups(
      vjp_fn, groups, options_lib.resolved_batching(opts.jacobian_batching))
  # Back in the precision of the default path from jacobian_dtype: the
  # damping and the M×M solve run in at least float32.
  factor_dtype = solve.at_least_float32(samples.dtype, *(
      leaf.dtype for leaf in jax.tree.leaves(pulled[0])))
  whitened_rows = [jax.tree.map(lambda t: t.astype(factor_dtype), row) for row in pulled[0]]
  loss_pullback = pulled[-1][0] if loss_cotangent is not None else None
  if loss_pullback is not None and direct_grads is not None:
    grads = jax.tree.map(lambda a, b: a + b, loss_pullback, direct_grads)
  squared_norms = solve.column_squared_norms(whitened_rows)
  if opts.damping == 'safe':
    damping_diag, unseen = solve.safe_damping(squared_norms)
  elif num_probes:
    metric_diagonal = probes.mean_square(pulled[1])
    if diagonal_average is None:
      damping_diag, unseen = probes.metric_diagonal_damping(metric_diagonal, squared_norms)
    else:
      # The damping of the debiased average total / weight, from the total
      # (the quotient is unused: under jit, XLA drops it).
      diagonal_average, _ = probes.averaged_diagonal(diagonal_average, metric_diagonal)
      damping_diag, unseen = probes.metric_diagonal_damping(
          diagonal_average.total, squared_norms, divisor=diagonal_average.weight)
  else:
    damping_diag, unseen = solve.damping_diagonal(squared_norms, opts.damping), None
  grads_structure: Any = jax.tree.structure(grads)
  if grads is not None and grads_structure != jax.tree.structure(damping_diag):
    grads = None  # apply_preconditioner explains the mismatch.
  # Everything the solve needs besides the Gram is computed before its
  # loops start. XLA:CPU runs independent operations at once only as far as
  # a buffer assignment made for one sequential order allows; the order it
  # chooses without the barrier leaves a core idle longer around the loops
  # (670k-parameter MLP, M = 5, on 2 cores: 10.7 against 11.0 ms per step;
  # digits CNN 4.10 against 4.27 ms; a barrier without v, or v computed
  # after the Gram, gained less).
  whitened_rows, damping_diag, grads, unseen = jax.lax.optimization_barrier(
      (whitened_rows, damping_diag, grads, unseen))
  with jax.default_matmul_precision(FULL_PRECISION):
    # The contraction over the parameters runs over FSDP-sharded axes.
    if grads is None:
      damped_gram, gradient_products = sharding.in_auto_mode(
          solve.damped_gram, out_sharding=PartitionSpec()
      )(whitened_rows, damping_diag), None
    else:
      damped_gram, gradient_products = sharding.in_auto_mode(
          solve.damped_gram_and_products, out_sharding=(PartitionSpec(), PartitionSpec())
      )(whitened_rows, damping_diag, grads)
  # D > 0, so T̃ D T̃ᵀ has a positive diagonal entry exactly when T̃ is
  # nonzero: no extra pass over T̃.
  depends_on_params = jnp.any(jnp.diagonal(damped_gram) > 0)
  preconditioner = Preconditioner(
      whitened_rows=tuple(whitened_rows),
      damping=damping_diag,
      gram=damped_gram,
      bandwidth=sigma.astype(jnp.float32),
      effective_rank=rank,
      finite_samples=finite_samples,
      depends_on_params=depends_on_params,
      valid_hyperparameters=valid_basis & opts.traced_valid(),
      unseen=unseen,
      diagonal_average=diagonal_average if num_probes else None,
      gradient_products=gradient_products,
  )
  return preconditioner, loss_pullback


def _pullback_groups(
    vjp_fn: VJPFn, groups: list[jax.Array], batching: str
) -> list[list[PyTree]]:
  """The VJPs of each group of cotangents (each of shape ``(K, ...)``), row by row.

  ``'loop'`` pulls every row back on its own; on CPU nothing downstream
  stacks the rows of a wide leaf. ``'vmap'`` and ``'map'`` pull all the
  groups back in one batched call and slice it.
  """
  if batching == 'loop':
    return [[vjp_fn(group[k])[0] for k in range(group.shape[0])] for group in groups]
  stacked = factors.pullbacks(vjp_fn, jnp.concatenate(groups), batching)
  out, start = [], 0
  for group in groups:
    out.append([jax.tree.map(lambda t, k=k: t[k], stacked)
                for k in range(start, start + group.shape[0])])
    start += group.shape[0]
  return out


def _warn_if_independent_of_params(
    vjp_fn: VJPFn, jacobian_like: jax.ShapeDtypeStruct
) -> None:
  """Warns at trace time when the samples provably do not depend on the params.

  Then T is zero and every step is the damped gradient (flagged at run time
  by ``KWNGInfo.depends_on_params``). The VJP is traced once more for the
  check; its jaxpr is not run.
  """
  if not outputs_lib.depends_on_input(jax.make_jaxpr(vjp_fn)(jacobian_like)):
    warnings.warn(
        'The samples of outputs_fn do not depend on params, so KWNG reduces '
        'to a damped gradient step. outputs_fn must compute the samples from '
        'the params it is given: lambda p: model.apply(p, x), or for NNX '
        'kwng_jax.flax_utils.nnx_outputs_fn(model, x), not a closure over '
        'the model.',
        RuntimeWarning,
        stacklevel=4,
    )
