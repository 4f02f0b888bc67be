r"""Solves of the KWNG estimator: whitening, damping, and the M×M system.

Both estimators of the paper, ridgeless and ridge, share one shape. With a Gram matrix
:math:`G = Q + \lambda K` (:math:`\lambda = 0`: ridgeless) and its
eigendecomposition :math:`G = U S U^\top`, the whitened factor

.. math:: \tilde T = S^{-1/2} U^\top T

(rows of dropped eigenvalues set to zero) gives
:math:`\tilde T^\top \tilde T = T^\top G^{+} T`, and the direction is

.. math::
   \hat g = (\tilde T^\top \tilde T + \epsilon D^{-1})^{-1} g
          = \frac{1}{\epsilon} D \left(g - \tilde T^\top
            (\tilde T D \tilde T^\top + \epsilon I_M)^{-1} \tilde T D g\right)

by the Woodbury identity, so only an M×M system is solved. When G is
invertible this equals the ridge form
:math:`\frac1\epsilon D(g - T^\top(T D T^\top + \epsilon G)^{-1} T D g)`.

Everything that does not depend on :math:`\epsilon` or :math:`g` (the
whitened factor, D, and :math:`\tilde T D \tilde T^\top`) is computed once by
:func:`whitened_jacobian`, :func:`damping_diagonal` and
:func:`damped_gram`, so it can be reused across steps.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

PyTree = Any

#: The damping matrices D (see :func:`damping_diagonal`).
DAMPINGS = ('reference', 'squared', 'identity', 'safe', 'metric_diagonal')

#: The dampings that give the parameters the samples do not see a
#: curvature of their own (``Preconditioner.unseen``).
CURVATURE_DAMPINGS = ('safe', 'metric_diagonal')

#: Added to column norms so that a parameter the samples do not depend on
#: gets a large but finite damping (the published constant).
DAMPING_OFFSET = 1e-8

#: The floor of ``'metric_diagonal'``'s diagonal, relative to its unit's mean
#: (:func:`metric_diagonal_damping`). Chosen on the digits benchmarks (test
#: accuracy at the learning rate chosen on validation): 1e-1 and 1e-2 give
#: 0.971 and 0.980 on the well-conditioned CNN, 0.945 and 0.966 on the
#: ill-conditioned CNN, 0.970 and 0.975 on the ill-conditioned MLP; 1e-4
#: gives 0.974 on the well-conditioned CNN, and no floor 0.847 +- 0.146,
#: some seeds at chance.
METRIC_DIAGONAL_FLOOR = 1e-2


def check_damping(damping: str) -> None:
  """Raises a ValueError naming the valid dampings unless ``damping`` is one."""
  if damping not in DAMPINGS:
    raise ValueError(
        f'Unknown damping={damping!r}; valid values are {list(DAMPINGS)}.'
    )


def small_matrix_dtype() -> jnp.dtype:
  """float64 when x64 is enabled, else float32: the dtype of M×M solves."""
  return jnp.float64 if jax.config.read('jax_enable_x64') else jnp.float32


def at_least_float32(*dtypes: jnp.dtype) -> jnp.dtype:
  """The widest of the given float dtypes, and at least float32.

  Written out rather than ``jnp.result_type`` so that it also holds under
  ``jax_numpy_dtype_promotion='strict'``.
  """
  widths = [jnp.finfo(d).bits for d in dtypes if jnp.issubdtype(d, jnp.floating)]
  return jnp.float64 if max(widths, default=32) > 32 else jnp.float32


def factor_dtype(tree: PyTree) -> jnp.dtype:
  """The dtype M×P factors are held in: the params' widest, at least float32."""
  return at_least_float32(*(jnp.asarray(x).dtype for x in jax.tree.leaves(tree)))


def whitened_jacobian(
    jacobian: PyTree, gram: jax.Array, rcond: float | None = None
) -> tuple[PyTree, jax.Array]:
  r"""Returns :math:`\tilde T = S^{-1/2} U^\top T` and the number of kept modes.

  Args:
    jacobian: T, a pytree whose leaves have a leading axis of size M.
    gram: the symmetric positive semi-definite M×M matrix :math:`G` (Q for
      the ridgeless estimator, :math:`Q + \lambda K` for the ridge one).
    rcond: eigenvalues at most ``rcond`` times the largest are dropped
      (their rows of :math:`\tilde T` are zero). Default: M times the
      machine epsilon of the solve dtype.

  Returns:
    ``(whitened, effective_rank)``: :math:`\tilde T`, same structure as
    ``jacobian`` in at least float32, and the int32 count of kept eigenvalues.
  """
  dtype = small_matrix_dtype()
  num_basis = gram.shape[0]
  if rcond is None:
    rcond = num_basis * float(jnp.finfo(dtype).eps)
  gram = gram.astype(dtype)
  eigvals, eigvecs = jnp.linalg.eigh(0.5 * (gram + gram.T))
  # A Gram of all-zero fields (identical samples) has largest eigenvalue 0:
  # the strict inequality then keeps nothing and T̃ is zero, not NaN.
  keep = eigvals > rcond * jnp.max(eigvals)
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, eigvals, 1.0)), 0.0)
  mixing = inv_sqrt[:, None] * eigvecs.T
  leaf_dtype = factor_dtype(jacobian)

  def mix(t):
    return jnp.tensordot(mixing.astype(leaf_dtype), t.astype(leaf_dtype), axes=1)

  whitened = jax.tree.map(mix, jacobian)
  return whitened, jnp.sum(keep, dtype=jnp.int32)


def damping_diagonal(whitened: PyTree, damping: str = 'reference') -> PyTree:
  r"""The diagonal damping D, a pytree shaped like one row of ``whitened``.

  * ``'reference'``: :math:`D_j = 1 / (\|\tilde T_{:, j}\|_2 + 10^{-8})`, the
    column norms of the WHITENED factor, as the published implementation;
  * ``'squared'``: :math:`D_j = 1 / (\|\tilde T_{:, j}\|_2^2 + 10^{-8})`,
    covariant under a rescaling :math:`\theta_j \to a\theta_j`;
  * ``'identity'``: :math:`D = 1`;
  * ``'metric_diagonal'``: :math:`D_j^{-1} = (J^\top J)_{jj} / N`, the
    diagonal of the samples' own metric, estimated from random probes
    (:func:`metric_diagonal_damping`; not computable from ``whitened``
    alone, so this function refuses it);
  * ``'safe'``: ``'reference'`` on the columns the samples see. A column
    they do not see (a column of zeros: a parameter the loss uses but
    ``outputs_fn`` does not, a ReLU unit dead on the batch, T from a
    sub-batch) gets :math:`D_j = 1/c`, with :math:`c` the root mean square
    of the seen column norms, instead of :math:`10^8`;
    :func:`safe_damping` gives it its curvature too.

  Args:
    whitened: :math:`\tilde T`, leaves with a leading axis of size M.
    damping: one of :data:`DAMPINGS`.

  Returns:
    D, same structure as the params, in the dtype of ``whitened``.
  """
  check_damping(damping)
  if damping == 'safe':
    return safe_damping(whitened)[0]
  if damping == 'metric_diagonal':
    raise ValueError(
        "damping='metric_diagonal' needs the diagonal of the samples' metric, "
        'which the whitened factor does not hold: use metric_diagonal_damping.'
    )

  def diagonal(t):
    squared_norm = sum_over_basis(jnp.square(t))
    if damping == 'reference':
      return 1.0 / (jnp.sqrt(squared_norm) + DAMPING_OFFSET)
    if damping == 'squared':
      return 1.0 / (squared_norm + DAMPING_OFFSET)
    return jnp.ones_like(squared_norm)

  return jax.tree.map(diagonal, whitened)


def safe_damping(whitened: PyTree) -> tuple[PyTree, PyTree]:
  r"""D and the curvature :math:`v` of ``damping='safe'``.

  On a column of :math:`\tilde T` the samples see, :math:`D_j` is the
  ``'reference'`` one and :math:`v_j = 0`. On a column of zeros,
  :math:`D_j = 1/c` and :math:`v_j = c^2`, with :math:`c` the root mean
  square of the seen column norms. The metric of the solve becomes
  :math:`\tilde T^\top\tilde T + \mathrm{diag}(v) + \epsilon D^{-1}`: an
  unseen parameter is preconditioned as a typical seen parameter would be
  if the samples moved with it alone, :math:`\hat g_j = g_j / (c^2 +
  \epsilon c)`, instead of :math:`10^8 g_j / \epsilon` (which grows without
  bound as :math:`\epsilon \to 0`, and which no step length measured on the
  samples can see).

  A column is unseen when its squared norm is zero: an exact zero (or
  entries so small, below about 1e-19 in float32, that their squares
  underflow). No larger threshold can tell a zero column from a real but
  tiny one (the paper's ill-conditioned head gives whitened columns 1e-14
  times the largest, and the 'reference' damping relies on them).

  Args:
    whitened: :math:`\tilde T`, leaves with a leading axis of size M.

  Returns:
    ``(D, v)``, each shaped like one row of ``whitened``.
  """
  squared_norms = jax.tree.map(lambda t: sum_over_basis(jnp.square(t)), whitened)
  seen = jax.tree.map(lambda q: q > 0, squared_norms)
  # With no column seen at all (samples that do not depend on the params)
  # c = 1: the direction is then the gradient scaled by 1 / (1 + eps).
  typical = jnp.sqrt(_mean_over_seen(squared_norms, seen))
  damping = jax.tree.map(
      lambda q, m: 1.0 / jnp.where(m, jnp.sqrt(q) + DAMPING_OFFSET, typical.astype(q.dtype)),
      squared_norms, seen)
  unseen = jax.tree.map(
      lambda q, m: jnp.where(m, 0.0, jnp.square(typical)).astype(q.dtype), squared_norms, seen)
  return damping, unseen


def metric_diagonal_damping(metric_diagonal: PyTree, whitened: PyTree) -> tuple[PyTree, PyTree]:
  r"""D and the curvature :math:`v` of ``damping='metric_diagonal'``.

  With :math:`s_j = (J^\top J)_{jj} / N` the diagonal of the samples'
  metric (:func:`kwng_jax.probes.metric_diagonal`), :math:`D_j = 1 / s_j`:
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
  :func:`safe_damping` treats it: :math:`D_j^{-1}` and :math:`v_j` are
  those of a typical seen parameter, the mean of :math:`s` and of the
  squared column norms of :math:`\tilde T` over the seen parameters.

  Args:
    metric_diagonal: :math:`s`, params-shaped, :math:`\ge 0`.
    whitened: :math:`\tilde T`, leaves with a leading axis of size M.

  Returns:
    ``(D, v)``, each shaped like the params, in the dtype of ``whitened``.
  """
  seen = jax.tree.map(lambda d: d > 0, metric_diagonal)
  metric_diagonal = jax.tree.map(_floor_by_unit, metric_diagonal)
  squared_norms = jax.tree.map(lambda t: sum_over_basis(jnp.square(t)), whitened)
  # With no parameter seen (samples that do not depend on the params) both
  # are 1: the direction is then g / (1 + eps).
  typical_metric = _mean_over_seen(metric_diagonal, seen)
  typical_curvature = _mean_over_seen(squared_norms, seen)
  # T̃ can be zero where J is not (the whitening dropped every mode): the
  # unseen parameters still get a curvature, so their step stays bounded.
  typical_curvature = jnp.where(typical_curvature > 0, typical_curvature, 1.0)
  damping = jax.tree.map(
      lambda d, m, t: (1.0 / jnp.where(m, d, typical_metric)).astype(t.dtype),
      metric_diagonal, seen, squared_norms)
  unseen = jax.tree.map(
      lambda m, t: jnp.where(m, 0.0, typical_curvature).astype(t.dtype), seen, squared_norms)
  return damping, unseen


def _floor_by_unit(diagonal: jax.Array) -> jax.Array:
  """Each entry at least ``METRIC_DIAGONAL_FLOOR`` times its unit's mean; zeros stay."""
  if diagonal.ndim < 2:
    return diagonal
  unit_mean = jnp.mean(diagonal, axis=tuple(range(diagonal.ndim - 1)), keepdims=True)
  return jnp.where(diagonal > 0, jnp.maximum(diagonal, METRIC_DIAGONAL_FLOOR * unit_mean),
                   diagonal)


def _mean_over_seen(values: PyTree, seen: PyTree) -> jax.Array:
  """The mean of ``values`` over the entries ``seen`` marks; 1 if there are none.

  ``values`` is zero on the unseen entries (a zero column of J gives zero
  column norms and a zero metric diagonal), so the sum over all entries is
  the sum over the seen ones.
  """
  total = functools.reduce(jnp.add, [jnp.sum(v) for v in jax.tree.leaves(values)])
  count = functools.reduce(jnp.add, [jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(seen)])
  mean = total / jnp.maximum(count, 1).astype(total.dtype)
  return jnp.where(count > 0, mean, 1.0).astype(total.dtype)


def sum_over_basis(x: jax.Array) -> jax.Array:
  """``x.sum(axis=0)`` over the leading axis of size M, as M - 1 additions.

  XLA:CPU reduces over a leading axis far slower than it adds M contiguous
  slices (measured on 2 cores, shape (5, 784, 512): 9.4 ms against 0.33 ms);
  with M small the unrolled form costs nothing to compile either.
  """
  return functools.reduce(jnp.add, [x[m] for m in range(x.shape[0])])


def _contract(a: jax.Array, b: jax.Array) -> jax.Array:
  """Sums ``a[m, ...] * b[k, ...]`` over the trailing axes: shape (M, K).

  As one matrix product of the flattened rows: XLA:CPU runs it twice as fast
  as the same contraction over the original trailing axes. (Splitting the
  columns into cache-sized chunks sped up this product alone by 1.7x on a
  2-core CPU, but made the whole natural-gradient step 1.8x slower: XLA then
  fuses the chunks with their producers.)
  """
  return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T


def damped_gram(whitened: PyTree, damping: PyTree) -> jax.Array:
  r""":math:`\tilde T D \tilde T^\top`, the M×M matrix of the Woodbury solve."""
  dtype = small_matrix_dtype()
  terms = jax.tree.map(
      lambda t, d: _contract(t * d[None], t).astype(dtype), whitened, damping
  )
  return functools.reduce(jnp.add, jax.tree.leaves(terms))


def solve_psd(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
  """Solves ``matrix @ x = rhs`` for a symmetric positive definite matrix.

  Cholesky first; if roundoff made the factorisation fail (non-finite
  result), a clipped eigendecomposition takes over, so the answer is finite.
  """
  cholesky = jsl.cho_factor(matrix, lower=True)
  solution = jsl.cho_solve(cholesky, rhs)

  def eigen_solve():
    eigvals, eigvecs = jnp.linalg.eigh(matrix)
    tiny = jnp.finfo(matrix.dtype).tiny
    inverse = jnp.where(eigvals > tiny, 1.0 / jnp.maximum(eigvals, tiny), 0.0)
    return eigvecs @ (inverse * (eigvecs.T @ rhs))

  return jax.lax.cond(
      jnp.all(jnp.isfinite(solution)), lambda: solution, eigen_solve
  )


def damped_natural_gradient(
    grads: PyTree,
    whitened: PyTree,
    damping: PyTree,
    gram: jax.Array,
    epsilon: jax.Array,
    unseen: PyTree | None = None,
) -> PyTree:
  r"""The Woodbury solve :math:`(\tilde T^\top\tilde T + \epsilon D^{-1})^{-1} g`.

  .. math::
     \hat g = \frac{1}{\epsilon} D \left(g - \tilde T^\top
       (\tilde T D \tilde T^\top + \epsilon I_M)^{-1} \tilde T D g\right)

  Args:
    grads: g, a pytree.
    whitened: :math:`\tilde T`, leaves shaped like ``grads`` with a leading
      axis of size M.
    damping: D, shaped like ``grads``.
    gram: :math:`\tilde T D \tilde T^\top` from :func:`damped_gram`.
    epsilon: :math:`\epsilon > 0`.
    unseen: the curvature :math:`v` of :func:`safe_damping`, or None.
      Where it is positive the column of :math:`\tilde T` is zero, so the
      metric's diagonal there is :math:`v_j + \epsilon / D_j` and nothing
      else changes.

  Returns:
    :math:`\hat g`, shaped like ``grads``, each leaf in its own dtype.
  """
  dtype = small_matrix_dtype()
  leaf_dtype = factor_dtype(whitened)
  epsilon = jnp.asarray(epsilon).astype(dtype)
  num_basis = gram.shape[0]
  damped_grads = jax.tree.map(
      lambda g, d: g.astype(leaf_dtype) * d, grads, damping
  )
  projections = jax.tree.map(
      lambda t, dg: jnp.tensordot(t, dg, axes=dg.ndim).astype(dtype),
      whitened,
      damped_grads,
  )
  rhs = functools.reduce(jnp.add, jax.tree.leaves(projections))
  system = gram.astype(dtype) + epsilon * jnp.eye(num_basis, dtype=dtype)
  coefficients = solve_psd(system, rhs).astype(leaf_dtype)
  inv_epsilon = (1.0 / epsilon).astype(leaf_dtype)

  def direction(g, t, d, v=None):
    residual = g.astype(leaf_dtype) - jnp.tensordot(coefficients, t, axes=1)
    if v is None:
      return (inv_epsilon * d * residual).astype(g.dtype)
    # D / (eps + v D): D / eps where v = 0, 1 / (v + eps / D) on unseen columns.
    return (d / (epsilon.astype(leaf_dtype) + v * d) * residual).astype(g.dtype)

  if unseen is None:
    return jax.tree.map(direction, grads, whitened, damping)
  return jax.tree.map(direction, grads, whitened, damping, unseen)
