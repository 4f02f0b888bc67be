r"""Gaussians :math:`X = \mu + A Z` in four parametrizations, and their exact
Wasserstein information matrix (through the Lyapunov equation of the Bures
metric)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kwng_jax.exact.common import _float_dtype


#: The Gaussian parametrizations of :func:`gaussian_unpack`.
PARAMETRIZATIONS = ('cholesky', 'full', 'diagonal', 'log_diagonal')


# ---------------------------------------------------------------------------
# Gaussians.
# ---------------------------------------------------------------------------


def _check_parametrization(parametrization: str) -> None:
  if parametrization not in PARAMETRIZATIONS:
    raise ValueError(
        f'Unknown parametrization={parametrization!r}; valid values are '
        f'{list(PARAMETRIZATIONS)}.'
    )


def gaussian_num_params(dim: int, parametrization: str = 'cholesky') -> int:
  r"""The number :math:`P` of free parameters of a Gaussian parametrization.

  * ``'cholesky'``: :math:`d + d(d+1)/2`;
  * ``'full'``: :math:`d + d^2`;
  * ``'diagonal'``, ``'log_diagonal'``: :math:`2d`.

  Args:
    dim: the dimension :math:`d`.
    parametrization: one of :data:`PARAMETRIZATIONS`.

  Returns:
    :math:`P`, a Python int.

  Example:
    >>> from kwng_jax import exact
    >>> exact.gaussian_num_params(2, 'cholesky')
    5
  """
  _check_parametrization(parametrization)
  if parametrization == 'cholesky':
    return dim + dim * (dim + 1) // 2
  if parametrization == 'full':
    return dim + dim * dim
  return 2 * dim


def gaussian_dim(num_params: int, parametrization: str = 'cholesky') -> int:
  """Returns the dimension :math:`d` (an int) of a Gaussian with ``num_params`` parameters.

  The inverse of :func:`gaussian_num_params`; raises a ValueError when no
  dimension fits.

  Args:
    num_params: the length :math:`P` of the flat parameter vector.
    parametrization: one of :data:`PARAMETRIZATIONS`.

  Example:
    >>> from kwng_jax import exact
    >>> [exact.gaussian_dim(exact.gaussian_num_params(d, 'full'), 'full')
    ...  for d in (1, 2, 3)]
    [1, 2, 3]
  """
  _check_parametrization(parametrization)
  if parametrization == 'cholesky':
    dim = int(round((math.sqrt(9 + 8 * num_params) - 3) / 2))
  elif parametrization == 'full':
    dim = int(round((math.sqrt(1 + 4 * num_params) - 1) / 2))
  else:
    dim = num_params // 2
  if dim < 1 or gaussian_num_params(dim, parametrization) != num_params:
    raise ValueError(
        f'No dimension has {num_params} parameters in the '
        f'{parametrization!r} parametrization.'
    )
  return dim


@functools.partial(jax.jit, static_argnames=('parametrization',))
def gaussian_unpack(
    theta: jax.Array, parametrization: str = 'cholesky'
) -> tuple[jax.Array, jax.Array]:
  r"""Splits a flat parameter vector into :math:`(\mu, A)`.

  The first :math:`d` entries of ``theta`` are :math:`\mu`; the rest give
  :math:`A`:

  * ``'cholesky'``: the :math:`d(d+1)/2` entries of a lower-triangular
    :math:`A`, row by row (the order of ``jnp.tril_indices(d)``); the
    diagonal is not constrained in sign;
  * ``'full'``: all :math:`d^2` entries of :math:`A`, row-major;
  * ``'diagonal'``: :math:`A = \operatorname{diag}(s)`;
  * ``'log_diagonal'``: :math:`A = \operatorname{diag}(\exp(l))`.

  Args:
    theta: the flat vector of length :math:`P`
      (:func:`gaussian_num_params`).
    parametrization: one of :data:`PARAMETRIZATIONS`.

  Returns:
    ``(mu, a)`` of shapes ``(d,)`` and ``(d, d)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> mu, a = exact.gaussian_unpack(jnp.arange(5.0), 'cholesky')
    >>> a
    Array([[2., 0.],
           [3., 4.]], dtype=float32)
  """
  theta = jnp.asarray(theta)
  dim = gaussian_dim(theta.shape[0], parametrization)
  mu, rest = theta[:dim], theta[dim:]
  if parametrization == 'cholesky':
    rows, cols = np.tril_indices(dim)
    a = jnp.zeros((dim, dim), dtype=theta.dtype).at[rows, cols].set(rest)
  elif parametrization == 'full':
    a = rest.reshape(dim, dim)
  elif parametrization == 'diagonal':
    a = jnp.diag(rest)
  else:
    a = jnp.diag(jnp.exp(rest))
  return mu, a


@functools.partial(jax.jit, static_argnames=('parametrization',))
def gaussian_pack(
    mu: jax.Array, a: jax.Array, parametrization: str = 'cholesky'
) -> jax.Array:
  """The flat parameter vector of :math:`(\\mu, A)`: the inverse of unpacking.

  Entries of ``a`` the parametrization has no room for (above the diagonal
  for 'cholesky', off the diagonal for the diagonal ones) are ignored; for
  'log_diagonal' the diagonal must be positive.

  Args:
    mu: the mean, shape ``(d,)``.
    a: the factor :math:`A`, shape ``(d, d)``.
    parametrization: one of :data:`PARAMETRIZATIONS`.

  Returns:
    The flat vector ``theta`` of length :math:`P`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> exact.gaussian_pack(jnp.zeros(2), 2.0 * jnp.eye(2), 'diagonal')
    Array([0., 0., 2., 2.], dtype=float32)
  """
  _check_parametrization(parametrization)
  mu = jnp.asarray(mu)
  a = jnp.asarray(a)
  dtype = _float_dtype(mu, a)
  mu, a = mu.astype(dtype), a.astype(dtype)
  dim = mu.shape[0]
  if parametrization == 'cholesky':
    rows, cols = np.tril_indices(dim)
    rest = a[rows, cols]
  elif parametrization == 'full':
    rest = a.reshape(-1)
  elif parametrization == 'diagonal':
    rest = jnp.diag(a)
  else:
    rest = jnp.log(jnp.diag(a))
  return jnp.concatenate([mu, rest])


@functools.partial(jax.jit, static_argnames=('parametrization',))
def gaussian_sample(
    theta: jax.Array, z: jax.Array, parametrization: str = 'cholesky'
) -> jax.Array:
  r"""The samples :math:`X_n = \mu + A Z_n` for fixed noise :math:`Z_n`.

  .. math:: x = \mu + z A^\top \quad (\text{row-wise}),

  so with :math:`Z_n \sim \mathcal N(0, I)`, :math:`X_n \sim
  \mathcal N(\mu, AA^\top)`. Holding ``z`` fixed makes this the sample
  function ``outputs_fn(theta)`` KWNG differentiates.

  Args:
    theta: the flat parameter vector (:func:`gaussian_unpack`).
    z: the noise, shape ``(N, d)``; cast to the dtype of ``theta``.
    parametrization: one of :data:`PARAMETRIZATIONS`.

  Returns:
    The samples, shape ``(N, d)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> z = jax.random.normal(jax.random.key(0), (4, 2))
    >>> exact.gaussian_sample(jnp.arange(5.0), z).shape
    (4, 2)
  """
  mu, a = gaussian_unpack(theta, parametrization)
  z = jnp.asarray(z).astype(a.dtype)
  return mu[None, :] + z @ a.T


@functools.partial(jax.jit, static_argnames=('parametrization',))
def gaussian_tangents(
    theta: jax.Array, parametrization: str = 'cholesky'
) -> tuple[jax.Array, jax.Array]:
  r"""The tangents :math:`(\partial_{\theta_p}\mu, \partial_{\theta_p} A)`.

  Obtained by :func:`jax.jacfwd` of :func:`gaussian_unpack`.

  Args:
    theta: the flat parameter vector, length :math:`P`.
    parametrization: one of :data:`PARAMETRIZATIONS`.

  Returns:
    ``(dmu, da)`` of shapes ``(P, d)`` and ``(P, d, d)``: row ``p`` is the
    tangent of the ``p``-th coordinate direction.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> dmu, da = exact.gaussian_tangents(jnp.arange(5.0))
    >>> dmu.shape, da.shape
    ((5, 2), (5, 2, 2))
  """
  theta = jnp.asarray(theta)
  dmu, da = jax.jacfwd(lambda t: gaussian_unpack(t, parametrization))(theta)
  return jnp.moveaxis(dmu, -1, 0), jnp.moveaxis(da, -1, 0)


@jax.jit
def lyapunov_solve(sigma: jax.Array, rhs: jax.Array) -> jax.Array:
  r"""Solves the Lyapunov equation :math:`S\Sigma + \Sigma S = R` for :math:`S`.

  With :math:`\Sigma = V \operatorname{diag}(\lambda) V^\top`,

  .. math::
     S = V \left[\frac{(V^\top R V)_{ij}}{\lambda_i + \lambda_j}\right]
         V^\top .

  :math:`\Sigma` should be symmetric positive definite; for a semi-definite
  one, the components with :math:`\lambda_i + \lambda_j` at most the machine
  epsilon times :math:`2\lambda_{\max}` are set to zero (a pseudo-inverse of
  the Lyapunov operator).

  Args:
    sigma: :math:`\Sigma`, shape ``(d, d)``.
    rhs: :math:`R`, shape ``(..., d, d)``, symmetric; leading axes are a
      batch of right-hand sides sharing one eigendecomposition of
      :math:`\Sigma`.

  Returns:
    :math:`S`, shape ``(..., d, d)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> exact.lyapunov_solve(2.0 * jnp.eye(2), jnp.eye(2))
    Array([[0.25, 0.  ],
           [0.  , 0.25]], dtype=float32)

  References:
    Bhatia, *Positive Definite Matrices*, Princeton (2007), Thm. 1.1.3.
  """
  dtype = _float_dtype(sigma, rhs)
  sigma = jnp.asarray(sigma).astype(dtype)
  rhs = jnp.asarray(rhs).astype(dtype)
  eigvals, eigvecs = jnp.linalg.eigh(0.5 * (sigma + sigma.T))
  denom = eigvals[:, None] + eigvals[None, :]
  floor = 2.0 * jnp.finfo(dtype).eps * jnp.max(jnp.abs(eigvals))
  keep = denom > floor
  inverse = jnp.where(keep, 1.0 / jnp.where(keep, denom, 1.0), 0.0)
  inverse = inverse.reshape((1,) * (rhs.ndim - 2) + inverse.shape)
  rotated = jnp.einsum('ji,...jk,kl->...il', eigvecs, rhs, eigvecs)
  return jnp.einsum('ij,...jk,lk->...il', eigvecs, rotated * inverse, eigvecs)


@functools.partial(jax.jit, static_argnames=('parametrization',))
def gaussian_metric(
    theta: jax.Array, parametrization: str = 'cholesky'
) -> jax.Array:
  r"""Exact Wasserstein information matrix of :math:`\mathcal N(\mu, AA^\top)`.

  For a tangent :math:`u = (\delta\mu, \delta A)`,
  :math:`\delta\Sigma = \delta A\, A^\top + A\, \delta A^\top`; let :math:`S_u`
  be the symmetric solution of :math:`S_u\Sigma + \Sigma S_u = \delta\Sigma`
  (:func:`lyapunov_solve`). Then :math:`v_u(x) = \delta\mu + S_u (x - \mu)`
  is the gradient velocity field (the optimal one) that moves the law along
  :math:`u`, and :math:`G_W[u, v] = \mathbb E[\langle v_u(X), v_v(X)\rangle]`:

  .. math::
     G_W[u, v] = \langle\delta\mu_u, \delta\mu_v\rangle
       + \operatorname{tr}(S_u \Sigma S_v),

  evaluated on the coordinate directions of ``theta`` (from
  :func:`gaussian_tangents`).

  * ``'cholesky'``: :math:`G_W` is positive definite when :math:`A` is
    invertible.
  * ``'full'``: :math:`G_W` is SINGULAR for :math:`d \ge 2`: rotations
    :math:`A \to A R` (tangent :math:`\delta A = AK`, :math:`K` skew) leave
    :math:`\Sigma` and hence the law unchanged, so its null space has
    dimension :math:`d(d-1)/2`. Solve with a pseudo-inverse
    (:func:`wasserstein_natural_gradient`).
  * ``'diagonal'``: :math:`G_W = I` (each :math:`\partial X/\partial s_i =
    Z_i e_i` is a gradient field); ``'log_diagonal'``:
    :math:`G_W = \operatorname{diag}(1, \ldots, 1, e^{2l_1}, \ldots)`.

  Args:
    theta: the flat parameter vector (:func:`gaussian_unpack`).
    parametrization: one of :data:`PARAMETRIZATIONS`.

  Returns:
    :math:`G_W(\theta)`, shape ``(P, P)``, symmetric.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> theta = jnp.array([0.0, 0.0, 1.0, 0.5, 1.0])  # A = [[1, 0], [.5, 1]]
    >>> exact.gaussian_metric(theta, 'cholesky').shape
    (5, 5)

  References:
    Takatsu (2011); Arbel et al., ICLR 2020.
  """
  theta = jnp.asarray(theta)
  _, a = gaussian_unpack(theta, parametrization)
  dmu, da = gaussian_tangents(theta, parametrization)
  sigma = a @ a.T
  dsigma = da @ a.T[None] + a[None] @ jnp.swapaxes(da, -1, -2)
  s = lyapunov_solve(sigma, dsigma)
  metric = dmu @ dmu.T + jnp.einsum('pij,jk,qki->pq', s, sigma, s)
  return 0.5 * (metric + metric.T)


@functools.partial(jax.jit, static_argnames=('parametrization',))
def gaussian_naive_metric(
    theta: jax.Array, parametrization: str = 'cholesky'
) -> jax.Array:
  r"""Closed form of the naive metric :math:`\mathbb E[J^\top J]` of a Gaussian.

  For :math:`X = \mu + AZ`, :math:`Z \sim \mathcal N(0, I)`, the Jacobian
  column of :math:`\theta_p` is :math:`\delta\mu_p + \delta A_p Z`, so

  .. math::
     \mathbb E[J^\top J]_{pq} = \langle\delta\mu_p, \delta\mu_q\rangle
       + \operatorname{tr}(\delta A_p^\top \delta A_q).

  It equals :func:`gaussian_metric` for the diagonal parametrizations but
  NOT for 'cholesky' or 'full' (there it is the identity, while
  :math:`G_W` is not): :math:`\delta A_p Z` is not a gradient field unless
  :math:`\delta A_p` is symmetric.

  Args:
    theta: the flat parameter vector (:func:`gaussian_unpack`).
    parametrization: one of :data:`PARAMETRIZATIONS`.

  Returns:
    The naive metric, shape ``(P, P)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> exact.gaussian_naive_metric(jnp.array([0.0, 0.0, 1.0, 0.5, 1.0])).shape
    (5, 5)
  """
  dmu, da = gaussian_tangents(theta, parametrization)
  return dmu @ dmu.T + jnp.einsum('pij,qij->pq', da, da)
