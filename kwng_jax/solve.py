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
rows of the whitened factor, D and :math:`\tilde T D \tilde T^\top`)
is computed once (:func:`whitening`, :func:`damping_diagonal`,
:func:`damped_gram`), so it can be reused across steps. A step that builds
them for one g gets :math:`\tilde T D g` in the same pass over the rows
(:func:`damped_gram_and_products`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
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


def whitening(gram: jax.Array, rcond: float | None = None) -> tuple[jax.Array, jax.Array]:
  r"""The M×M whitening :math:`S^{-1/2} U^\top` of :math:`G = U S U^\top`, and its rank.

  Args:
    gram: the symmetric positive semi-definite M×M matrix :math:`G` (Q for
      the ridgeless estimator, :math:`Q + \lambda K` for the ridge one).
    rcond: eigenvalues at most ``rcond`` times the largest are dropped
      (their rows of the whitening are zero). Default: M times the machine
      epsilon of the solve dtype.

  Returns:
    ``(mixing, effective_rank)``: the M×M matrix, in the dtype of M×M
    solves (:func:`small_matrix_dtype`), and the int32 count of kept
    eigenvalues. :math:`\tilde T` = ``mixing @ T``; since T is linear in
    its cotangents, it is also the T of the cotangents ``mixing @ W``.
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
  return inv_sqrt[:, None] * eigvecs.T, jnp.sum(keep, dtype=jnp.int32)


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
  mixing, rank = whitening(gram, rcond)
  leaf_dtype = factor_dtype(jacobian)

  def mix(t):
    return jnp.tensordot(mixing.astype(leaf_dtype), t.astype(leaf_dtype), axes=1)

  return jax.tree.map(mix, jacobian), rank


def column_squared_norms(whitened_rows: Sequence[PyTree]) -> PyTree:
  r""":math:`q_j = \|\tilde T_{:, j}\|_2^2`, the diagonal of :math:`\tilde T^\top\tilde T`.

  Summed over the M rows one by one: XLA:CPU reduces over a leading axis of
  size M far slower than it adds M arrays (measured on 2 cores, shape
  (5, 784, 512): 9.4 ms against 0.33 ms), and rows straight out of the VJPs
  need no stacking first.

  Args:
    whitened_rows: the M rows of :math:`\tilde T`, each shaped like the
      params (of a stacked factor:
      ``[jax.tree.map(lambda t: t[m], whitened) for m in range(M)]``).

  Returns:
    q, shaped like the params; the dampings depend on :math:`\tilde T`
    through q alone.
  """
  return jax.tree.map(
      lambda *rows: functools.reduce(jnp.add, [jnp.square(r) for r in rows]), *whitened_rows)


def damping_diagonal(squared_norms: PyTree, damping: str = 'reference') -> PyTree:
  r"""The diagonal damping D, a pytree shaped like the params.

  * ``'reference'``: :math:`D_j = 1 / (\|\tilde T_{:, j}\|_2 + 10^{-8})`, the
    column norms of the WHITENED factor, as the published implementation;
  * ``'squared'``: :math:`D_j = 1 / (\|\tilde T_{:, j}\|_2^2 + 10^{-8})`,
    covariant under a rescaling :math:`\theta_j \to a\theta_j`;
  * ``'identity'``: :math:`D = 1`;
  * ``'metric_diagonal'``: :math:`D_j^{-1} = (J^\top J)_{jj} / N`, the
    diagonal of the samples' own metric, estimated from random probes
    (:func:`kwng_jax.probes.metric_diagonal_damping`; not computable from
    the column norms alone, so this function refuses it);
  * ``'safe'``: ``'reference'`` on the columns the samples see. A column
    they do not see (a column of zeros: a parameter the loss uses but
    ``outputs_fn`` does not, a ReLU unit dead on the batch, T from a
    sub-batch) gets :math:`D_j = 1/c`, with :math:`c` the root mean square
    of the seen column norms, instead of :math:`10^8`;
    :func:`safe_damping` gives it its curvature too.

  Args:
    squared_norms: q, the squared column norms of :math:`\tilde T`
      (:func:`column_squared_norms`).
    damping: one of :data:`DAMPINGS`.

  Returns:
    D, same structure and dtype as ``squared_norms``.
  """
  check_damping(damping)
  if damping == 'safe':
    return safe_damping(squared_norms)[0]
  if damping == 'metric_diagonal':
    raise ValueError(
        "damping='metric_diagonal' needs the diagonal of the samples' metric, "
        'which the whitened factor does not hold: use '
        'kwng_jax.probes.metric_diagonal_damping.'
    )

  def diagonal(squared_norm):
    if damping == 'reference':
      return 1.0 / (jnp.sqrt(squared_norm) + DAMPING_OFFSET)
    if damping == 'squared':
      return 1.0 / (squared_norm + DAMPING_OFFSET)
    return jnp.ones_like(squared_norm)

  return jax.tree.map(diagonal, squared_norms)


def safe_damping(squared_norms: PyTree) -> tuple[PyTree, PyTree]:
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
    squared_norms: q, the squared column norms of :math:`\tilde T`
      (:func:`column_squared_norms`).

  Returns:
    ``(D, v)``, each shaped like ``squared_norms``.
  """
  # With no column seen at all (samples that do not depend on the params)
  # c = 1: the direction is then the gradient scaled by 1 / (1 + eps).
  typical = jnp.sqrt(mean_over_support(squared_norms, squared_norms))
  damping = jax.tree.map(
      lambda q: 1.0 / jnp.where(q > 0, jnp.sqrt(q) + DAMPING_OFFSET, typical.astype(q.dtype)),
      squared_norms)
  unseen = jax.tree.map(
      lambda q: jnp.where(q > 0, 0.0, jnp.square(typical)).astype(q.dtype), squared_norms)
  return damping, unseen


def mean_over_support(
    values: PyTree, support: PyTree, default: float | jax.Array = 1.0
) -> jax.Array:
  """The mean of ``values`` over the entries where ``support`` is positive; ``default`` if there are none.

  ``support`` is nonnegative, and ``values`` is zero wherever it is zero (a
  zero column of J gives zero column norms and a zero metric diagonal), so
  the sum over all entries is the sum over the support.
  """
  total = functools.reduce(jnp.add, [jnp.sum(v) for v in jax.tree.leaves(values)])
  count = functools.reduce(
      jnp.add, [_count_positive(s).astype(total.dtype) for s in jax.tree.leaves(support)])
  mean = total / jnp.maximum(count, 1)
  # A NaN makes the sum (and below 2^24 entries the count) NaN: the mean
  # is then NaN, not the default.
  return jnp.where(count == 0, jnp.asarray(default).astype(total.dtype), mean).astype(total.dtype)


def _count_positive(nonnegative: jax.Array) -> jax.Array:
  """How many entries of a nonnegative array are positive."""
  if nonnegative.size < 2**24:
    # The sum of the signs: XLA:CPU reduces it with far fewer passes than a
    # boolean mask converted to int (the metric-diagonal damping of a
    # 670k-parameter MLP on 2 cores: 13.5 against 14.3 ms per step); exact
    # in float32 below 2^24 entries. Never narrower than the entries, so
    # that no positive float64 rounds to zero.
    if jnp.finfo(nonnegative.dtype).bits < 32:
      nonnegative = nonnegative.astype(jnp.float32)
    return jnp.sum(jnp.sign(nonnegative))
  return jnp.sum(nonnegative > 0, dtype=jnp.int32)


#: Columns per block of :func:`damped_gram` on CPU, where XLA:CPU runs the
#: M×M product far faster on blocks that stay in cache than on whole rows
#: (measured on 2 cores, 670k columns stacked: M = 5, 2.8 against 1.8 ms;
#: M = 20, 30 against 16 ms).
GRAM_BLOCK_COLUMNS = 8192

#: From this many rows on, each loop iteration of :func:`damped_gram` takes
#: two blocks, one from each half of the leaf. The products are then large
#: enough that two independent ones per iteration pay (670k-parameter MLP
#: on 2 cores, per step, with M + 1 rows: T̃'s and g's): M = 20, 5.2 ± 1.4
#: ms less; M = 10, 0.9 ± 0.6 ms less; M = 5, where they are small,
#: 0.3 ± 0.2 ms more. 11 is the smallest row count measured to gain; none
#: between 6 and 11 was measured.
GRAM_PAIRED_MIN_ROWS = 11


def damped_gram(whitened_rows: Sequence[PyTree], damping: PyTree) -> jax.Array:
  r""":math:`\tilde T D \tilde T^\top = F F^\top`, the M×M matrix of the Woodbury solve.

  Here :math:`F = \tilde T D^{1/2}`; on CPU it is not written out for a
  leaf of two blocks or more. Each leaf's product is summed over blocks of
  its columns: a block of :math:`\tilde T`'s M rows is sliced, scaled by
  :math:`D^{1/2}` and multiplied by its transpose while it is in cache. On
  CPU a block holds :data:`GRAM_BLOCK_COLUMNS` columns and a
  ``jax.lax.fori_loop`` runs over them (two blocks an iteration from
  :data:`GRAM_PAIRED_MIN_ROWS` rows on); a leaf of fewer than two blocks,
  and on accelerators every leaf, is one block. Stacking the M rows of a
  wide leaf into one M×P array first costs far more than the product (a
  784×512 leaf, M = 20, on 2 cores: the stack, the product and the solve
  take 40 ms, the blocks and the solve 13 ms).

  Args:
    whitened_rows: the M rows of :math:`\tilde T`, each shaped like the
      params (see :class:`kwng_jax.Preconditioner`).
    damping: D, shaped like the params, in the rows' dtype.

  Returns:
    The M×M matrix, in the dtype of M×M solves (:func:`small_matrix_dtype`).
  """
  return _blocked_gram(whitened_rows, damping)


def damped_gram_and_products(
    whitened_rows: Sequence[PyTree], damping: PyTree, grads: PyTree
) -> tuple[jax.Array, jax.Array]:
  r""":func:`damped_gram` and :math:`\tilde T D g`, in one pass over the rows.

  g joins the blocks of :func:`damped_gram` as one more row, so the
  right-hand side of the Woodbury solve costs no pass over
  :math:`\tilde T` of its own (670k-parameter MLP, M = 5, on 2 cores:
  12.8 against 14.2 ms per step).

  Args:
    whitened_rows: the M rows of :math:`\tilde T`, each shaped like ``grads``.
    damping: D, shaped like ``grads``, in the rows' dtype.
    grads: g.

  Returns:
    ``(gram, products)``: the M×M matrix of :func:`damped_gram` and the
    M-vector :math:`\tilde T D g`, in the dtype of M×M solves.
  """
  num_basis = len(whitened_rows)
  rows = [*whitened_rows, jax.tree.map(lambda g, d: g.astype(d.dtype), grads, damping)]
  extended = _blocked_gram(rows, damping)
  return extended[:num_basis, :num_basis], extended[:num_basis, num_basis]


def _blocked_gram(rows: Sequence[PyTree], damping: PyTree) -> jax.Array:
  """The K×K matrix of inner products in D of K params-shaped rows, block by block."""
  dtype = small_matrix_dtype()

  def gram(d, *leaf_rows):
    leaf_rows = [r.reshape(-1) for r in leaf_rows]
    d = d.reshape(-1)

    def block_gram(start, size):
      # The square root inside the block: taken outside the loop, it would
      # be one more pass that writes a params-sized array.
      root = jnp.sqrt(jax.lax.dynamic_slice_in_dim(d, start, size))
      block = jnp.stack(
          [jax.lax.dynamic_slice_in_dim(r, start, size) for r in leaf_rows]) * root[None]
      return (block @ block.T).astype(dtype)

    size = d.shape[0]
    if _one_block(size):
      return block_gram(0, size)
    num_blocks = size // GRAM_BLOCK_COLUMNS
    if len(leaf_rows) < GRAM_PAIRED_MIN_ROWS:
      rest = block_gram(num_blocks * GRAM_BLOCK_COLUMNS, size - num_blocks * GRAM_BLOCK_COLUMNS)
      return jax.lax.fori_loop(
          0, num_blocks,
          lambda i, total: total + block_gram(i * GRAM_BLOCK_COLUMNS, GRAM_BLOCK_COLUMNS), rest)
    half = num_blocks // 2
    # The columns past the last whole pair of blocks.
    rest = block_gram(2 * half * GRAM_BLOCK_COLUMNS, size - 2 * half * GRAM_BLOCK_COLUMNS)

    def pair(i, total):
      # Two independent products per iteration, one from each half of the
      # leaf, where one loop of single products left a core idle longer.
      return (total + block_gram(i * GRAM_BLOCK_COLUMNS, GRAM_BLOCK_COLUMNS)
              + block_gram((i + half) * GRAM_BLOCK_COLUMNS, GRAM_BLOCK_COLUMNS))

    return jax.lax.fori_loop(0, half, pair, rest)

  return functools.reduce(jnp.add, jax.tree.leaves(jax.tree.map(gram, damping, *rows)))


def _one_block(size: int) -> bool:
  """Whether the Gram and the solve take a leaf of ``size`` entries whole.

  On accelerators always; on CPU below two blocks of
  :data:`GRAM_BLOCK_COLUMNS`, where stacking the M rows costs less than
  the operations that avoid it (digits MLP, 9.6k parameters: 0.96 against
  1.04 ms per step; a 400k-entry leaf takes 10 ms more per step stacked).
  """
  return jax.default_backend() != 'cpu' or size < 2 * GRAM_BLOCK_COLUMNS


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
    whitened_rows: Sequence[PyTree],
    damping: PyTree,
    gram: jax.Array,
    epsilon: jax.Array,
    unseen: PyTree | None = None,
    *,
    gradient_products: jax.Array | None = None,
) -> PyTree:
  r"""The Woodbury solve :math:`(\tilde T^\top\tilde T + \epsilon D^{-1})^{-1} g`.

  .. math::
     \hat g = \frac{1}{\epsilon} D \left(g - \tilde T^\top c\right),
     \qquad (\tilde T D \tilde T^\top + \epsilon I_M)\, c = \tilde T D g:

  two passes over the M rows of :math:`\tilde T` (the M inner products
  :math:`\tilde T D g`, then :math:`g - \tilde T^\top c`) and an M×M
  solve; one pass when :func:`damped_gram_and_products` gave the products
  with the Gram.

  Args:
    grads: g, a pytree.
    whitened_rows: the M rows of :math:`\tilde T`, each shaped like
      ``grads``.
    damping: D, shaped like ``grads``, in the rows' dtype.
    gram: :math:`\tilde T D \tilde T^\top` from :func:`damped_gram` (or
      :func:`damped_gram_and_products`).
    epsilon: :math:`\epsilon > 0`.
    unseen: the curvature :math:`v` of :func:`safe_damping`, or None.
      Where it is positive the column of :math:`\tilde T` is zero, so the
      metric's diagonal there is :math:`v_j + \epsilon / D_j` and nothing
      else changes: the step there is :math:`D_j g_j / (\epsilon + v_j D_j)`.
    gradient_products: :math:`\tilde T D g` for this very ``grads``, from
      :func:`damped_gram_and_products` with this ``damping`` (before
      ``unseen`` is folded in); None computes them here, in the first pass.

  Returns:
    :math:`\hat g`, shaped like ``grads``, each leaf in its own dtype.
  """
  dtype = small_matrix_dtype()
  epsilon = jnp.asarray(epsilon).astype(dtype)
  if unseen is not None:
    # That step is the one of the damping D / (1 + v D / eps) with no v (D
    # itself where v = 0), since the columns of T̃ are zero where v is not.
    # Folded into D before the passes: XLA:CPU schedules the step with v in
    # its last pass far worse (670k-parameter MLP on 2 cores: 22 against 14 ms).
    damping = jax.tree.map(
        lambda d, v: d / (1.0 + v * d / epsilon.astype(d.dtype)), damping, unseen)
  if gradient_products is None:
    damped_grads = jax.tree.map(lambda g, d: g.astype(d.dtype) * d, grads, damping)

    def leaf_rhs(h, *rows):
      rows = [r.reshape(-1) for r in rows]
      if _one_block(h.size):
        return (jnp.stack(rows) @ h.reshape(-1)).astype(dtype)
      # Wide leaves: M inner products, as in damped_gram no M×P stack.
      return jnp.stack([jnp.vdot(r, h).astype(dtype) for r in rows])

    rhs = functools.reduce(
        jnp.add, jax.tree.leaves(jax.tree.map(leaf_rhs, damped_grads, *whitened_rows)))
  else:
    # T̃'s columns are zero where the fold changed D: the same products.
    rhs = gradient_products.astype(dtype)
  num_basis = gram.shape[0]
  system = gram.astype(dtype) + epsilon * jnp.eye(num_basis, dtype=dtype)
  coefficients = solve_psd(system, rhs)

  def direction(g, d, *rows):
    coefficient = coefficients.astype(d.dtype)
    pulled = functools.reduce(jnp.add, [coefficient[m] * t for m, t in enumerate(rows)])
    return (d / epsilon.astype(d.dtype) * (g.astype(d.dtype) - pulled)).astype(g.dtype)

  return jax.tree.map(direction, grads, damping, *whitened_rows)
