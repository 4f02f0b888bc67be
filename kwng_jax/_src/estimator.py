r"""The KWNG estimator as pure functions.

:func:`natural_gradient` is the optax-free entry point. It is the
composition of :func:`build_preconditioner` (samples, basis, kernel factors,
whitening and damping: everything independent of the gradient and of
:math:`\epsilon`) and :func:`apply_preconditioner` (the M×M Woodbury solve).
:func:`kwng_jax.preconditioner_from_vjp` builds the preconditioner from a
forward pass already run, ``jax.vjp(outputs_fn, params)``.

References:
  Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
  ICLR 2020 (arXiv 1910.09652).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any, TYPE_CHECKING

import jax
import jax.numpy as jnp

from kwng_jax import probes
from kwng_jax import solve
from kwng_jax._src import options as options_lib
from kwng_jax._src import outputs as outputs_lib
from kwng_jax._src import sharding
from kwng_jax._src import from_vjp as from_vjp_lib
from kwng_jax._src.from_vjp import from_vjp
from kwng_jax._src.preconditioner import KWNGInfo
from kwng_jax._src.preconditioner import Preconditioner

if TYPE_CHECKING:
  from typing_extensions import Unpack

PyTree = Any
OutputsFn = Callable[[PyTree], jax.Array]


def build_preconditioner(
    outputs_fn: OutputsFn,
    params: PyTree,
    *,
    key: jax.Array | None = None,
    basis_indices: jax.Array | None = None,
    basis_coords: jax.Array | None = None,
    jacobian_outputs_fn: OutputsFn | None = None,
    **options: Unpack[options_lib.EstimatorKwargs],
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
    >>> len(pre.whitened_rows), pre.whitened_rows[0]['w'].shape, direction['w'].shape
    (5, (3, 4), (3, 4))
  """
  opts = options_lib.EstimatorOptions.from_kwargs('build_preconditioner', options)
  return build(
      outputs_fn, params, opts, key=key, basis_indices=basis_indices,
      basis_coords=basis_coords, jacobian_outputs_fn=jacobian_outputs_fn,
  )


def build(
    outputs_fn: OutputsFn,
    params: PyTree,
    opts: options_lib.EstimatorOptions,
    *,
    key: jax.Array | None = None,
    basis_indices: jax.Array | None = None,
    basis_coords: jax.Array | None = None,
    jacobian_outputs_fn: OutputsFn | None = None,
    diagonal_average: probes.DiagonalAverage | None = None,
    grads: PyTree | None = None,
) -> Preconditioner:
  """:func:`build_preconditioner` with its options already validated.

  With ``grads``, the preconditioner holds :math:`\tilde T D g` for them
  (``Preconditioner.gradient_products``).
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
  opts, jacobian_outputs_fn = outputs_lib.resolve_jacobian_rows(
      opts, outputs_fn, jacobian_outputs_fn)
  jacobian_params = params
  if opts.jacobian_dtype is not None:
    jacobian_params = jax.tree.map(lambda p: p.astype(opts.jacobian_dtype), params)
  jacobian_fn = outputs_fn if jacobian_outputs_fn is None else jacobian_outputs_fn
  with outputs_lib.explained_errors():
    jacobian_outputs, vjp_fn = jax.vjp(jacobian_fn, jacobian_params)
  jacobian_outputs = outputs_lib.as_samples(jacobian_outputs)
  if jacobian_outputs_fn is None and opts.jacobian_dtype is None:
    # One forward pass gives the samples and the VJP.
    samples = jacobian_outputs
  else:
    # The samples the kernel sees stay in the params' precision, on the
    # whole batch; under jit this forward pass is shared with the loss's.
    with outputs_lib.explained_errors():
      samples = outputs_lib.as_samples(outputs_fn(params))
  if jacobian_outputs_fn is not None:
    check_jacobian_rows(jacobian_outputs, samples, options_lib.fixed_rows(opts.jacobian_samples))
  jacobian_like = jax.ShapeDtypeStruct(jacobian_outputs.shape, jacobian_outputs.dtype)
  num_rows = (jacobian_outputs.shape[0] if jacobian_outputs_fn is not None
              else options_lib.fixed_rows(opts.jacobian_samples) or samples.shape[0])
  return from_vjp(
      samples, vjp_fn, opts, key=key, basis_indices=basis_indices,
      basis_coords=basis_coords, jacobian_like=jacobian_like, num_rows=num_rows,
      diagonal_average=diagonal_average, grads=grads,
  )[0]


def check_jacobian_rows(rows: jax.Array, samples: jax.Array, num_rows: int | None) -> None:
  """Raises unless ``rows`` (of ``jacobian_outputs_fn``) are n rows shaped like ``samples``."""
  if (rows.shape[1:] != samples.shape[1:] or rows.shape[0] > samples.shape[0]
      or (num_rows is not None and rows.shape[0] != num_rows)):
    raise ValueError(
        'jacobian_outputs_fn must return the first jacobian_samples='
        f'{num_rows} rows of what outputs_fn returns '
        f'{samples.shape}; it returned shape {rows.shape}.'
    )


def apply_preconditioner(
    preconditioner: Preconditioner, grads: PyTree, epsilon: float | jax.Array
) -> tuple[PyTree, KWNGInfo]:
  r"""Returns :math:`\hat g = (\tilde T^\top\tilde T + \epsilon D^{-1})^{-1} g` and diagnostics.

  A preconditioner that holds ``gradient_products`` (built by an
  optimizer's step for its g) is applied with them: ``grads`` must then be
  that same g. :func:`build_preconditioner` and
  :func:`kwng_jax.preconditioner_from_vjp` build without them, for any g.
  """
  options_lib.check_positive('epsilon', epsilon)
  grads_structure: Any = jax.tree.structure(grads)
  if grads_structure != jax.tree.structure(preconditioner.damping):
    raise ValueError(
        'grads must be shaped like params (one gradient leaf per parameter); '
        f'got the structure {jax.tree.structure(grads)} for params of '
        f'structure {jax.tree.structure(preconditioner.damping)}.'
    )
  # Positional arguments only: auto_axes converts those to the Auto mesh.
  solve_fn = sharding.in_auto_mode(
      lambda *args: solve.damped_natural_gradient(*args[:-1], gradient_products=args[-1]),
      out_sharding=jax.tree.map(sharding.spec_of, grads),
  )
  with jax.default_matmul_precision(from_vjp_lib.FULL_PRECISION):
    direction = solve_fn(
        grads,
        preconditioner.whitened_rows,
        preconditioner.damping,
        preconditioner.gram,
        jnp.asarray(epsilon),
        preconditioner.unseen,
        preconditioner.gradient_products,
    )
  alignment = sharding.tree_vdot(grads, direction)
  # A reduction of its own, not one over a stack of [ĝ, g]: XLA:CPU writes
  # the stack out (the published chain on the 670k-parameter MLP: 0.5 ms a
  # step). Summed plainly: an overflow-safe norm (divided by the largest
  # entry first) cost 0.56 ms of that step, for |g| beyond 1.8e19.
  squared_gradient_norm = sharding.tree_vdot(grads, grads)
  finite_grads = _sum_is_finite(grads)
  # With g finite, <g, ĝ> is finite exactly when ĝ is (an Inf or NaN entry
  # of ĝ makes it Inf or NaN, 0 · Inf included), unless it overflows: no
  # pass over ĝ of its own.
  finite_direction = jnp.isfinite(alignment)
  info = KWNGInfo(
      bandwidth=preconditioner.bandwidth,
      effective_rank=preconditioner.effective_rank,
      alignment=alignment,
      fallback=~(finite_direction & (alignment > 0)),
      finite_inputs=finite_grads & preconditioner.finite_samples,
      depends_on_params=preconditioner.depends_on_params,
      valid_hyperparameters=preconditioner.valid_hyperparameters
      & options_lib.traced_options_valid(epsilon=epsilon),
      squared_gradient_norm=squared_gradient_norm,
  )
  return direction, info


def _sum_is_finite(tree: PyTree) -> jax.Array:
  """Whether the sum of all entries is finite: False for any NaN or Inf.

  One reduction that reads each leaf, where ``all(isfinite(x))`` writes a
  boolean array first. Finite entries whose sum overflows float32 (beyond
  3e38) count as not finite too.
  """
  sums = [jnp.sum(x, dtype=solve.at_least_float32(x.dtype)) for x in jax.tree.leaves(tree)]
  return jnp.isfinite(functools.reduce(jnp.add, sums)) if sums else jnp.array(True)


def natural_gradient(
    grads: PyTree,
    outputs_fn: OutputsFn,
    params: PyTree,
    *,
    epsilon: float | jax.Array = 1e-5,
    key: jax.Array | None = None,
    basis_indices: jax.Array | None = None,
    basis_coords: jax.Array | None = None,
    jacobian_outputs_fn: OutputsFn | None = None,
    **options: Unpack[options_lib.EstimatorKwargs],
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

  The estimator's options, ``num_basis`` to ``jacobian_batching`` below,
  are keyword arguments (``**options``), validated once by one options
  object; :func:`build_preconditioner` and
  :func:`kwng_jax.preconditioner_from_vjp` take the same ones, with the same
  defaults.

  Args:
    grads: g, the Euclidean gradient, a pytree shaped like ``params``.
    outputs_fn: ``params -> samples`` with a leading batch axis N.
    params: the point where the samples are differentiated.
    epsilon: the regularization strength :math:`\epsilon > 0` (default 1e-5).
    key: PRNG key for the basis (and the probes of ``'metric_diagonal'``);
      not needed when the basis is pinned (the probes then use a fixed key).
    basis_indices: M distinct sample indices, pins the basis (with
      ``basis_coords``).
    basis_coords: M coordinates in ``[0, d)``.
    jacobian_outputs_fn: ``params -> samples`` of the first n rows of the
      batch alone (e.g. ``lambda p: model(p, x[:n])``), differentiated for T
      instead of ``outputs_fn``; n is read from its output.
    num_basis: M, the number of basis functions, at most N (default 5).
    kernel: a name in :data:`kwng_jax.kernels.KERNELS`, or a scalar function
      ``k(x, y)`` or ``k(x, y, bandwidth)`` (default ``'gaussian'``).
    bandwidth: ``'mean_distance'`` (published, the default), ``'median'``,
      or a number.
    log_bandwidth: base-10 log of the multiplier of the bandwidth rule
      (default 0).
    damping: ``'reference'`` (published, the default),
      ``'metric_diagonal'``, ``'safe'``, ``'squared'`` or ``'identity'``
      (see :func:`kwng_jax.solve.damping_diagonal`).
    ridge: :math:`\lambda \ge 0` (default 0).
    rcond: relative eigenvalue threshold of the whitening (default None: M
      times the machine epsilon).
    jacobian_samples: n (default None: the whole batch); W, Q and T are
      computed from the first n samples only (the basis and the bandwidth
      still from all N). It is the KWNG
      estimate of the sub-batch, with the basis of the whole batch. The M
      vector–Jacobian products cost n/N of the full ones only when
      ``jacobian_outputs_fn`` computes those n samples alone, or
      ``outputs_fn`` can (:func:`kwng_jax.batch_outputs_fn`); without
      either, the numbers are the same and the cost that of the whole
      batch. ``'auto'``: 32 when one of them can, else the whole batch.
    jacobian_dtype: e.g. ``jnp.bfloat16`` (default None: the params'
      dtype): the params are cast to it for the VJPs that give T
      (``outputs_fn`` must then compute in the dtype of the params it is
      given). The samples, W, Q, the whitening and the M×M
      solve stay in the params' precision (at least float32).
    jacobian_batching: how the M VJPs run: ``'vmap'`` (one batched
      backward pass), ``'loop'`` (M backward passes unrolled), ``'map'``
      (``jax.lax.map``), or ``'auto'`` (the default): ``'loop'`` on CPU,
      where XLA runs the batched weight-gradient contractions slowly,
      ``'vmap'`` on accelerators. The numbers agree to rounding.

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
  opts = options_lib.EstimatorOptions.from_kwargs('natural_gradient', options)
  preconditioner = build(
      outputs_fn, params, opts, key=key, basis_indices=basis_indices,
      basis_coords=basis_coords, jacobian_outputs_fn=jacobian_outputs_fn, grads=grads,
  )
  return apply_preconditioner(preconditioner, grads, epsilon)
