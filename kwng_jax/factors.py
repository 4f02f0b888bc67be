r"""The factors of one KWNG step: basis, W, Q, K and T.

Given samples :math:`X_n = h_\theta(Z_n) \in \mathbb{R}^d`, a basis of M
sample points :math:`Y_m = X_{n_m}` with one coordinate :math:`i_m` each, and a
kernel :math:`k`:

* :math:`W[m, n, r] = \partial_{y_r}\partial_{x_{i_m}} k(x, y)` at
  :math:`x = Y_m, y = X_n` (:func:`cross_derivatives`);
* :math:`Q = \frac1N \sum_n W[:, n, :]\,W[:, n, :]^\top`
  (:func:`basis_gradient_gram`);
* :math:`K[m, m'] = \partial_{x_{i_m}}\partial_{y_{i_{m'}}} k(Y_m, Y_{m'})`,
  the RKHS Gram of the basis functions (:func:`basis_rkhs_gram`);
* :math:`T[m] = \sum_{n} (W[m, n] / N)^\top \partial_\theta X_n`, the M
  vector–Jacobian products (:func:`jacobian_factor`), from one ``jax.vjp``
  of the sample function and one ``jax.vmap`` over the M cotangents;
* for the damping ``'metric_diagonal'``, the diagonal of the samples' metric
  :math:`(J^\top J)_{jj} / N`, from the VJPs of random probes
  (:mod:`kwng_jax.probes`).

All derivatives of the kernel come from JAX autodiff of the scalar kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kwng_jax import kernels as kernels_lib
from kwng_jax._src import sharding
from kwng_jax._src import threefry

PyTree = Any


def as_sample_matrix(samples: jax.Array) -> jax.Array:
  """Flattens samples of shape ``(N, ...)`` to ``(N, d)``; ``(N,)`` gives d = 1.

  Raises:
    ValueError: for a scalar, which holds no batch of samples.
  """
  if samples.ndim == 0:
    raise ValueError(
        'outputs_fn must return samples with a leading batch axis, shape '
        '(N, ...); it returned a scalar.'
    )
  return samples.reshape(samples.shape[0], -1)


def select_basis(
    num_samples: int, dim: int, num_basis: int, *, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Draws M distinct sample indices and one random coordinate for each.

  Args:
    num_samples: N, the number of samples.
    dim: d, the dimension of one (flattened) sample.
    num_basis: M, the number of basis functions; at most N.
    key: a PRNG key.

  Returns:
    ``(indices, coords)``, two int32 arrays of shape ``(M,)``: distinct
    indices into the samples, and coordinates in ``[0, d)``.

  Raises:
    ValueError: if ``num_basis`` exceeds the number of samples.

  Example:
    >>> import jax
    >>> from kwng_jax import factors
    >>> idx, coords = factors.select_basis(128, 10, 5, key=jax.random.key(0))
    >>> idx.shape, coords.shape
    ((5,), (5,))
  """
  check_num_basis(num_basis, num_samples)
  words = threefry.random_words(key, num_samples + num_basis)
  return basis_from_bits(words, num_samples, dim)


def basis_from_bits(words: jax.Array, num_samples: int, dim: int) -> tuple[jax.Array, jax.Array]:
  """:func:`select_basis` from N + M random 32-bit words drawn already.

  The indices of the M largest of the first N words (M distinct indices,
  uniformly at random), and the last M words modulo d (a bias below
  d / 2^32). ``jax.random.choice(replace=False)`` and a second draw for the
  coordinates give the same distribution, but each draw expands to hundreds
  of HLO operations: four times the compile time. An optimizer draws these
  words and its probes' in one call (:mod:`kwng_jax.probes`).

  Args:
    words: uint32, shape ``(N + M,)``.
    num_samples: N.
    dim: d.

  Returns:
    ``(indices, coords)`` as :func:`select_basis` returns them.
  """
  num_basis = words.shape[0] - num_samples
  check_num_basis(num_basis, num_samples)
  _, indices = jax.lax.top_k(words[:num_samples], num_basis)
  coords = words[num_samples:] % jnp.uint32(dim)
  return indices.astype(jnp.int32), coords.astype(jnp.int32)


def check_pinned_basis(
    basis_indices: Any, basis_coords: Any, num_samples: int, dim: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Checks a pinned basis; returns it as int32 arrays, and whether it is valid.

  Concrete indices and coordinates are checked now: a ValueError names the
  one that is out of range or repeated. Traced ones cannot be, and the
  returned bool scalar says whether they were valid (M distinct indices in
  ``[0, N)``, coordinates in ``[0, d)``).

  Args:
    basis_indices: M sample indices.
    basis_coords: M coordinates.
    num_samples: N.
    dim: d.

  Returns:
    ``(indices, coords, valid)``.
  """
  indices = jnp.asarray(basis_indices)
  coords = jnp.asarray(basis_coords)
  if indices.shape != coords.shape or indices.ndim != 1:
    raise ValueError(
        'basis_indices and basis_coords must both have shape (M,); got '
        f'{indices.shape} and {coords.shape}.'
    )
  for name, value in (('basis_indices', indices), ('basis_coords', coords)):
    if not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f'{name} must hold integers; got dtype {value.dtype}.')
  check_num_basis(indices.shape[0], num_samples)
  indices, coords = indices.astype(jnp.int32), coords.astype(jnp.int32)
  in_range = (
      jnp.all((indices >= 0) & (indices < num_samples))
      & jnp.all((coords >= 0) & (coords < dim))
  )
  ordered = jnp.sort(indices)
  distinct = jnp.all(ordered[1:] != ordered[:-1])
  if not isinstance(indices, jax.core.Tracer):
    if not bool(jnp.all((indices >= 0) & (indices < num_samples))):
      raise ValueError(
          f'basis_indices={indices.tolist()} must lie in [0, N={num_samples}), '
          'the indices of samples in the batch.'
      )
    if not bool(distinct):
      raise ValueError(
          f'basis_indices={indices.tolist()} must be distinct: the basis '
          'points are M different samples.'
      )
  if not isinstance(coords, jax.core.Tracer) and not bool(
      jnp.all((coords >= 0) & (coords < dim))
  ):
    raise ValueError(
        f'basis_coords={coords.tolist()} must lie in [0, d={dim}), '
        'coordinates of one flattened sample.'
    )
  return indices, coords, in_range & distinct


def check_num_basis(num_basis: int, num_samples: int) -> None:
  """Raises a ValueError unless ``1 <= num_basis <= num_samples``."""
  if not 1 <= num_basis <= num_samples:
    raise ValueError(
        f'num_basis={num_basis} must be between 1 and the batch size '
        f'N={num_samples} (the leading axis of what outputs_fn returns): the '
        'basis points are distinct samples. Lower num_basis or use a larger '
        'batch.'
    )


def cross_derivatives(
    kernel: kernels_lib.Kernel,
    basis: jax.Array,
    basis_coords: jax.Array,
    samples: jax.Array,
    bandwidth: jax.Array,
) -> jax.Array:
  r"""The tensor :math:`W[m, n, r] = \partial_{y_r}\partial_{x_{i_m}} k(Y_m, X_n)`.

  The inner derivative is a forward-mode ``jax.jvp`` along the basis
  coordinate, the outer one a ``jax.grad`` in ``y``; both are vmapped, so a
  user kernel needs nothing but its scalar definition.

  Args:
    kernel: a scalar function ``k(x, y, bandwidth)``.
    basis: basis points :math:`Y`, shape ``(M, d)``.
    basis_coords: the coordinate :math:`i_m` of each basis point, ``(M,)``.
    samples: points :math:`X`, shape ``(N, d)``.
    bandwidth: the scalar bandwidth passed to the kernel.

  Returns:
    W, shape ``(M, N, d)``.
  """
  dim = basis.shape[-1]

  def directional(x, coord, y):
    direction = jax.nn.one_hot(coord, dim, dtype=x.dtype)
    return jax.jvp(lambda x_: kernel(x_, y, bandwidth), (x,), (direction,))[1]

  cross = jax.grad(directional, argnums=2)
  over_samples = jax.vmap(cross, in_axes=(None, None, 0))
  return jax.vmap(over_samples, in_axes=(0, 0, None))(
      basis, basis_coords, samples
  )


def basis_gradient_gram(cross: jax.Array) -> jax.Array:
  r""":math:`Q = \frac1N\sum_n W[:, n, :]\,W[:, n, :]^\top`, shape ``(M, M)``.

  The Gram matrix of the gradient fields of the basis functions in
  :math:`L^2` of the samples. With the batch sharded over an explicit mesh
  the sum runs over a sharded axis; the (small) result is replicated. Full
  float32 precision: GPUs would otherwise round the products to TF32, and
  the whitening by :math:`Q^{-1/2}` amplifies that error.
  """
  num_samples = cross.shape[1]
  gram = jnp.einsum(
      'mnr,knr->mk',
      cross,
      cross,
      precision=jax.lax.Precision.HIGHEST,
      out_sharding=sharding.replicated(),
  )
  return gram / num_samples


def basis_rkhs_gram(
    kernel: kernels_lib.Kernel,
    basis: jax.Array,
    basis_coords: jax.Array,
    bandwidth: jax.Array,
) -> jax.Array:
  r""":math:`K[m, m'] = \partial_{x_{i_m}}\partial_{y_{i_{m'}}} k(Y_m, Y_{m'})`.

  The RKHS Gram matrix of the basis functions, used by the ridge estimator
  (:math:`\lambda > 0`). Symmetrized, since roundoff in autodiff breaks the exact
  symmetry a symmetric kernel has.

  Returns:
    K, shape ``(M, M)``.
  """
  cross = cross_derivatives(kernel, basis, basis_coords, basis, bandwidth)
  gram = jnp.take_along_axis(cross, basis_coords[None, :, None], axis=2)[..., 0]
  return 0.5 * (gram + gram.T)


def jacobian_factor(
    vjp_fn: Callable[[jax.Array], tuple[PyTree]],
    cross: jax.Array,
    samples_shape: tuple[int, ...],
    samples_dtype: jnp.dtype,
    batching: str = 'vmap',
) -> PyTree:
  r"""T: row m is the VJP of the sample function with cotangent ``W[m] / n``.

  The M VJPs of one ``jax.vjp`` run as one batched backward pass
  (``batching='vmap'``), as M backward passes unrolled in the program
  (``'loop'``), or under ``jax.lax.map`` (``'map'``). The numbers agree to
  rounding; the speed does not: XLA:CPU runs the batched weight-gradient
  contractions of ``vmap`` far slower than M plain ones, while accelerators
  prefer the batch. When W covers only the first
  ``n < N`` samples (T from a subsample), the cotangents are zero on the
  others: the numbers are those of a VJP over n samples, the cost that of N
  (pass a function of the n samples alone to ``jax.vjp`` for the saving).

  Args:
    vjp_fn: the VJP function that ``jax.vjp(outputs_fn, params)`` returned.
    cross: W, shape ``(M, n, d)``, for the first n of the samples.
    samples_shape: the shape ``(N, ...)`` of what ``outputs_fn`` returned,
      ``N >= n``.
    samples_dtype: its dtype; the cotangents are cast to it.
    batching: ``'vmap'``, ``'loop'`` or ``'map'``.

  Returns:
    T as a pytree shaped like the params with a leading axis of size M.
  """
  return pullbacks(vjp_fn, kernel_cotangents(cross, samples_shape, samples_dtype), batching)


def kernel_cotangents(
    cross: jax.Array, samples_shape: tuple[int, ...], samples_dtype: jnp.dtype
) -> jax.Array:
  """The M cotangents ``W[m] / n`` of T, zero-padded to all N samples.

  Args:
    cross: W, shape ``(M, n, d)``, for the first n of the samples.
    samples_shape: the shape ``(N, ...)`` of the samples, ``N >= n``.
    samples_dtype: the dtype of the samples; the cotangents are cast to it.

  Returns:
    Shape ``(M, *samples_shape)``.
  """
  num_basis, num_rows = cross.shape[:2]
  num_samples = samples_shape[0]
  if num_rows > num_samples:
    raise ValueError(
        f'W covers {num_rows} samples but outputs_fn returned {num_samples}.'
    )
  cotangents = (cross / num_rows).astype(samples_dtype)
  if num_rows < num_samples:
    cotangents = jnp.pad(
        cotangents, ((0, 0), (0, num_samples - num_rows), (0, 0))
    )
  return cotangents.reshape((num_basis,) + tuple(samples_shape))


def pullbacks(
    vjp_fn: Callable[[jax.Array], tuple[PyTree]],
    cotangents: jax.Array,
    batching: str = 'vmap',
) -> PyTree:
  """The VJP of each of a leading batch of cotangents, stacked.

  Args:
    vjp_fn: the VJP function that ``jax.vjp(outputs_fn, params)`` returned.
    cotangents: shape ``(K, *samples_shape)``.
    batching: ``'vmap'`` (one batched backward pass), ``'loop'`` (K passes
      unrolled in the program) or ``'map'`` (``jax.lax.map``).

  Returns:
    A pytree shaped like the params with a leading axis of size K.
  """
  if batching == 'vmap':
    (pulled,) = jax.vmap(vjp_fn)(cotangents)
  elif batching == 'map':
    (pulled,) = jax.lax.map(vjp_fn, cotangents)
  elif batching == 'loop':
    rows = [vjp_fn(cotangents[k])[0] for k in range(cotangents.shape[0])]
    pulled = jax.tree.map(lambda *leaves: jnp.stack(leaves), *rows)
  else:
    raise ValueError(
        f"Unknown batching={batching!r}; valid values are 'vmap', 'loop', 'map'."
    )
  return pulled
