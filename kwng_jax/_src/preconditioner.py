r"""What one step of KWNG builds and reports: the preconditioner and its diagnostics."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kwng_jax import probes
from kwng_jax import solve

PyTree = Any


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
    finite_inputs: False when the gradient or the samples hold NaN or Inf
      (or the gradient's entries sum beyond the float32 range, 3e38);
      the update of :func:`kwng_jax.scale_by_kwng` is then zero.
    depends_on_params: False when the whitened factor :math:`\\tilde T` is
      zero, as when the samples do not depend on the params: the direction
      is then the damped gradient, and ``outputs_fn`` is likely wrong (it
      closes over the model instead of using its argument).
    valid_hyperparameters: False when a hyperparameter given as a traced
      value (:math:`\\epsilon`, ridge, bandwidth, rcond, a pinned basis;
      e.g. through ``optax.inject_hyperparams``) was out of range; the
      update of :func:`kwng_jax.scale_by_kwng` is then zero.
    squared_gradient_norm: :math:`\\langle g, g\\rangle` (infinite beyond
      float32's range, :math:`\\|g\\| > 1.8 \\cdot 10^{19}`): with
      ``alignment``, the product of g with the update of
      :func:`kwng_jax.scale_by_kwng` (:math:`\\hat g`, or g on a fallback) is
      known without a pass over that update.
  """

  bandwidth: jax.Array
  effective_rank: jax.Array
  alignment: jax.Array
  fallback: jax.Array
  finite_inputs: jax.Array
  depends_on_params: jax.Array
  valid_hyperparameters: jax.Array
  squared_gradient_norm: jax.Array

  @property
  def usable(self) -> jax.Array:
    """Whether the inputs were finite and the traced hyperparameters in
    range; where not, the update of :func:`kwng_jax.scale_by_kwng` is zero."""
    return self.finite_inputs & self.valid_hyperparameters

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
        squared_gradient_norm=jnp.zeros((), jnp.float32),
    )


class Preconditioner(NamedTuple):
  r"""What one step of KWNG builds from the samples, before it sees :math:`\epsilon`.

  Attributes:
    whitened_rows: the M rows of the whitened factor :math:`\tilde T`, a
      tuple of M params-shaped pytrees, in at least float32. Kept apart:
      on CPU the Gram and the solve read a wide leaf's rows block by block
      (:func:`kwng_jax.solve.damped_gram`).
    damping: D, a params-shaped pytree.
    gram: :math:`\tilde T D \tilde T^\top`, shape (M, M).
    bandwidth: the kernel bandwidth used.
    effective_rank: the number of kept eigenvalues of the Gram matrix.
    finite_samples: whether the samples were all finite.
    depends_on_params: whether :math:`\tilde T` is nonzero, i.e. the
      samples depend on the params (False: every step is the damped
      gradient).
    valid_hyperparameters: whether the options given as traced values
      (ridge, bandwidth, rcond, a pinned basis) were in range.
    unseen: with ``damping='safe'`` or ``'metric_diagonal'``, the
      curvature given to the parameters the samples do not see
      (:func:`kwng_jax.solve.safe_damping`); None otherwise.
    diagonal_average: with ``damping='metric_diagonal'`` built by an
      optimizer, the running average of the metric diagonal after this
      build (:class:`kwng_jax.probes.DiagonalAverage`), which the
      optimizer's state keeps; None otherwise.
    gradient_products: :math:`\tilde T D g` for the g the preconditioner
      was built with (an optimizer's step, in the same pass over the rows
      as the Gram: :func:`kwng_jax.solve.damped_gram_and_products`), which
      :func:`kwng_jax.apply_preconditioner` then uses for that same g;
      None otherwise.
  """

  whitened_rows: tuple[PyTree, ...]
  damping: PyTree
  gram: jax.Array
  bandwidth: jax.Array
  effective_rank: jax.Array
  finite_samples: jax.Array
  depends_on_params: jax.Array
  valid_hyperparameters: jax.Array
  unseen: PyTree | None = None
  diagonal_average: probes.DiagonalAverage | None = None
  gradient_products: jax.Array | None = None

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
      damping: the damping it will hold (``'safe'`` and
        ``'metric_diagonal'`` store one more params-shaped pytree).

    Returns:
      A :class:`Preconditioner` with M rows of :math:`\tilde T` and D
      shaped like ``params``, and an M×M Gram.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import kwng_jax
      >>> params = {'w': jax.ShapeDtypeStruct((3, 4), jnp.float32)}
      >>> empty = kwng_jax.Preconditioner.empty(params, num_basis=5)
      >>> len(empty.whitened_rows), empty.whitened_rows[0]['w'].shape, empty.gram.shape
      (5, (3, 4), (5, 5))
    """
    if num_basis < 1:
      raise ValueError(f'num_basis={num_basis!r} must be at least 1.')
    dtype = solve.at_least_float32(*(p.dtype for p in jax.tree.leaves(params)))

    matrix_dtype = solve.small_matrix_dtype()
    solve.check_damping(damping)
    # zeros_like keeps the sharding of p (and accepts ShapeDtypeStruct).
    zeros = lambda p: jnp.zeros_like(p, dtype=dtype)  # noqa: E731
    return cls(
        whitened_rows=tuple(jax.tree.map(zeros, params) for _ in range(num_basis)),
        damping=jax.tree.map(zeros, params),
        gram=jnp.zeros((num_basis, num_basis), matrix_dtype),
        bandwidth=jnp.zeros((), jnp.float32),
        effective_rank=jnp.zeros((), jnp.int32),
        finite_samples=jnp.zeros((), jnp.bool_),
        depends_on_params=jnp.zeros((), jnp.bool_),
        valid_hyperparameters=jnp.ones((), jnp.bool_),
        unseen=jax.tree.map(zeros, params) if damping in solve.CURVATURE_DAMPINGS else None,
    )
