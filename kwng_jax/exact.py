r"""Exact Wasserstein information matrices, the references KWNG is tested on.

KWNG estimates the Wasserstein natural gradient :math:`G_W(\theta)^{-1} g`
from samples. This module gives :math:`G_W` in closed form (or by
deterministic quadrature) for location, Gaussian and one-dimensional families, so that estimates
can be measured against the truth:

* location families :math:`X = \mu + Z`: :math:`G_W = I`
  (:func:`location_metric`);
* Gaussians :math:`X = \mu + A Z`, :math:`\Sigma = A A^\top`, in four
  parametrizations (:func:`gaussian_metric`, solved through the Lyapunov
  equation of the Bures metric);
* one-dimensional families given by their quantile function
  (:func:`quantile_metric`), e.g. the log-normal;
* the naive metric :math:`\mathbb E[J^\top J]` of the sample map, which is
  NOT :math:`G_W` in general (:func:`naive_metric`);
* the closed-form :math:`W_2^2` between Gaussians, a differentiable loss
  (:func:`bures_wasserstein_sq`).

Everything is pure JAX (quadrature nodes are NumPy constants built at trace
time), respects ``jax_numpy_dtype_promotion='strict'`` and
``jax_numpy_rank_promotion='raise'``, and works in float32 or, with x64
enabled, float64. The metrics here are meant as references: use float64 for
exactness checks.

The metric is defined by
:math:`u^\top G_W(\theta) u = \lim_{t \to 0} W_2^2(\rho_\theta,
\rho_{\theta + t u}) / t^2`, which is how the tests check it.

References:
  Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
  ICLR 2020 (arXiv 1910.09652), §2 and Appendix.

  Li, Montúfar, *Natural gradient via optimal transport*, Information
  Geometry 1 (2018); Li, Zhao, *Wasserstein information matrix* (2019).

  Takatsu, *Wasserstein geometry of Gaussian measures*, Osaka J. Math. 48
  (2011); Bhatia, Jain, Lim, *On the Bures–Wasserstein distance between
  positive definite matrices*, Expo. Math. 37 (2019).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any

#: The Gaussian parametrizations of :func:`gaussian_unpack`.
PARAMETRIZATIONS = ('cholesky', 'full', 'diagonal', 'log_diagonal')

#: The quadrature rules of :func:`quantile_quadrature`.
QUADRATURE_RULES = ('normal', 'legendre')


def _float_dtype(*arrays: Any) -> jnp.dtype:
  """The widest floating dtype among ``arrays``, at least the default float."""
  dtypes = [jnp.asarray(a).dtype for a in arrays]
  dtypes = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
  return jnp.result_type(jnp.asarray(0.0).dtype, *dtypes)


# ---------------------------------------------------------------------------
# Location families and the natural-gradient solve.
# ---------------------------------------------------------------------------


def location_metric(dim: int, dtype: Any = None) -> jax.Array:
  r"""Wasserstein metric of a location family, the identity.

  For :math:`X = \mu + Z` with :math:`\mu \in \mathbb R^d` every tangent
  :math:`\partial X / \partial \mu_j = e_j` is a constant, hence a gradient
  field, and transporting by :math:`\delta\mu` costs
  :math:`\|\delta\mu\|^2`:

  .. math:: G_W(\mu) = I_d.

  Here the naive metric :math:`\mathbb E[J^\top J]` coincides with
  :math:`G_W`.

  Args:
    dim: the dimension :math:`d` of :math:`\mu`.
    dtype: the dtype of the result (default: the default float dtype).

  Returns:
    The :math:`d \times d` identity.

  Example:
    >>> from kwng_jax import exact
    >>> exact.location_metric(2)
    Array([[1., 0.],
           [0., 1.]], dtype=float32)

  References:
    Arbel et al., ICLR 2020.
  """
  return jnp.eye(dim, dtype=dtype)


@functools.partial(jax.jit, static_argnames=('rcond',))
def wasserstein_natural_gradient(
    metric: jax.Array,
    grads: PyTree,
    epsilon: float = 0.0,
    rcond: float | None = None,
) -> PyTree:
  r"""The (damped) natural gradient :math:`(G + \epsilon I)^{+} g`.

  .. math:: \hat g = (G + \epsilon I)^{+} g,

  with :math:`{}^{+}` the Moore–Penrose pseudo-inverse (computed from the
  eigendecomposition of the symmetric matrix), so a singular metric — such
  as the 'full' Gaussian one, see :func:`gaussian_metric` — gives the
  minimum-norm solution when :math:`\epsilon = 0`. This is the target KWNG
  estimates, :math:`(G_W + \epsilon I)^{-1} g`.

  Args:
    metric: the symmetric positive semi-definite :math:`P \times P` matrix
      :math:`G`.
    grads: :math:`g`, a vector of length :math:`P`, or a pytree with
      :math:`P` entries in all (flattened with
      :func:`jax.flatten_util.ravel_pytree`, in that order).
    epsilon: the damping :math:`\epsilon \ge 0`.
    rcond: eigenvalues at most ``rcond`` times the largest are treated as
      zero (default: :func:`jax.numpy.linalg.pinv`'s, :math:`10 P` times the
      machine epsilon).

  Returns:
    :math:`\hat g`, with the structure of ``grads``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> metric = jnp.array([[2.0, 0.0], [0.0, 0.0]])  # singular
    >>> exact.wasserstein_natural_gradient(metric, jnp.array([1.0, 1.0]))
    Array([0.5, 0. ], dtype=float32)

  References:
    Arbel et al., ICLR 2020, eq. (3).
  """
  flat, unravel = ravel_pytree(grads)
  dtype = _float_dtype(metric, flat)
  metric = jnp.asarray(metric).astype(dtype)
  metric = 0.5 * (metric + metric.T)
  damped = metric + jnp.asarray(epsilon, dtype=dtype) * jnp.eye(
      metric.shape[0], dtype=dtype
  )
  solution = jnp.linalg.pinv(damped, rtol=rcond, hermitian=True) @ flat.astype(
      dtype
  )
  return unravel(solution)


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
  """The dimension :math:`d` of a Gaussian with ``num_params`` parameters.

  The inverse of :func:`gaussian_num_params`; raises a ValueError when no
  dimension fits.

  Args:
    num_params: the length :math:`P` of the flat parameter vector.
    parametrization: one of :data:`PARAMETRIZATIONS`.

  Returns:
    :math:`d`, a Python int.

  Example:
    >>> from kwng_jax import exact
    >>> exact.gaussian_dim(9, 'cholesky')
    3
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


@functools.partial(jax.jit, static_argnames=('sample_fn',))
def naive_metric(
    sample_fn: Callable[[PyTree], jax.Array], theta: PyTree
) -> jax.Array:
  r"""The naive metric :math:`\frac1N \sum_n J_n^\top J_n` of a sample function.

  With :math:`J_n = \partial X_n / \partial\theta \in \mathbb R^{d \times P}`
  (by :func:`jax.jacfwd`),

  .. math:: \hat G = \frac1N \sum_{n=1}^N J_n^\top J_n ,

  the Monte Carlo estimate of :math:`\mathbb E[J^\top J]`: the metric that
  moves every sample independently. It is NOT the Wasserstein metric
  except when every :math:`\partial X/\partial\theta_p` is a gradient field
  (location, diagonal scale) — the point KWNG's kernel projection corrects.

  Args:
    sample_fn: ``theta -> samples`` of shape ``(N, ...)``, flattened to
      ``(N, d)``.
    theta: the parameters, a vector or a pytree (flattened with
      :func:`jax.flatten_util.ravel_pytree`; rows and columns of the result
      follow that order).

  Returns:
    :math:`\hat G`, shape ``(P, P)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> z = jax.random.normal(jax.random.key(0), (1000, 2))
    >>> g = exact.naive_metric(lambda mu: mu[None, :] + z, jnp.zeros(2))
    >>> g  # location family: the identity
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
  """
  flat, unravel = ravel_pytree(theta)

  def flat_samples(v):
    samples = sample_fn(unravel(v))
    return samples.reshape(samples.shape[0], -1)

  jac = jax.jacfwd(flat_samples)(flat)
  num_samples = jac.shape[0]
  return jnp.einsum('ndp,ndq->pq', jac, jac) / num_samples


# ---------------------------------------------------------------------------
# Bures–Wasserstein distance.
# ---------------------------------------------------------------------------


@jax.custom_jvp
def psd_sqrtm(matrix: jax.Array) -> jax.Array:
  r"""Square root of a symmetric positive semi-definite matrix, differentiable.

  :math:`M^{1/2} = V \operatorname{diag}(\sqrt{\max(\lambda, 0)}) V^\top`
  from :func:`jax.numpy.linalg.eigh` (the input is symmetrized first). Its
  derivative is NOT taken through ``eigh`` (whose derivative is infinite at
  repeated eigenvalues, e.g. at :math:`M = I`) but is the Daleckii–Krein
  formula, i.e. the Lyapunov solve
  :math:`\delta(M^{1/2}) M^{1/2} + M^{1/2}\delta(M^{1/2}) = \delta M`:

  .. math::
     \delta(M^{1/2}) = V \left[\frac{(V^\top \delta M V)_{ij}}
       {\sqrt{\lambda_i} + \sqrt{\lambda_j}}\right] V^\top ,

  finite whenever :math:`M` is positive definite, repeated eigenvalues
  included; the denominator is floored at machine epsilon times
  :math:`\sqrt{\lambda_{\max}}` so it stays finite (but large) near singular
  :math:`M`. Second derivatives differentiate this rule, hence go through
  ``eigh``: they are finite at distinct eigenvalues.

  Args:
    matrix: a symmetric PSD matrix, shape ``(d, d)``.

  Returns:
    :math:`M^{1/2}`, shape ``(d, d)``, symmetric.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> exact.psd_sqrtm(jnp.array([[4.0, 0.0], [0.0, 9.0]]))
    Array([[2., 0.],
           [0., 3.]], dtype=float32)
  """
  return _psd_sqrtm_parts(matrix)[0]


def _psd_sqrtm_parts(matrix):
  eigvals, eigvecs = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
  roots = jnp.sqrt(jnp.maximum(eigvals, 0.0))
  return (eigvecs * roots[None, :]) @ eigvecs.T, roots, eigvecs


@psd_sqrtm.defjvp
def _psd_sqrtm_jvp(primals, tangents):
  (matrix,), (tangent,) = primals, tangents
  root, roots, eigvecs = _psd_sqrtm_parts(matrix)
  dtype = root.dtype
  denom = roots[:, None] + roots[None, :]
  floor = jnp.finfo(dtype).eps * jnp.maximum(
      jnp.max(roots), jnp.finfo(dtype).tiny
  )
  denom = jnp.maximum(denom, floor)
  tangent = 0.5 * (tangent + tangent.T)
  rotated = eigvecs.T @ tangent.astype(dtype) @ eigvecs
  return root, eigvecs @ (rotated / denom) @ eigvecs.T


@jax.jit
def bures_wasserstein_sq(
    mu1: jax.Array, sigma1: jax.Array, mu2: jax.Array, sigma2: jax.Array
) -> jax.Array:
  r"""Squared 2-Wasserstein distance between two Gaussians (Bures formula).

  .. math::
     W_2^2 = \|\mu_1 - \mu_2\|^2 + \operatorname{tr}\Sigma_1
       + \operatorname{tr}\Sigma_2
       - 2\operatorname{tr}\left(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}
       \right)^{1/2}.

  Usable as a differentiable loss: square roots use :func:`psd_sqrtm`
  (eigenvalues clamped at zero, derivative by a Lyapunov solve), so
  :func:`jax.grad` is finite for positive definite covariances, including at
  :math:`\Sigma_1 = \Sigma_2` and at repeated eigenvalues. The value is not
  clamped, so for equal laws it may be a rounding error below zero (of the
  order of the machine epsilon times :math:`\operatorname{tr}\Sigma`).

  Args:
    mu1: mean of the first Gaussian, shape ``(d,)``.
    sigma1: its covariance, shape ``(d, d)``, symmetric PSD.
    mu2: mean of the second Gaussian, shape ``(d,)``.
    sigma2: its covariance, shape ``(d, d)``, symmetric PSD.

  Returns:
    The scalar :math:`W_2^2`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> # N(0, 1) vs N(1, 4) in 1-D: (0 - 1)^2 + (1 - 2)^2
    >>> float(exact.bures_wasserstein_sq(
    ...     jnp.zeros(1), jnp.eye(1), jnp.ones(1), 4.0 * jnp.eye(1)))
    2.0

  References:
    Dowson, Landau, *The Fréchet distance between multivariate normal
    distributions*, J. Multivariate Anal. 12 (1982); Bhatia, Jain, Lim
    (2019).
  """
  dtype = _float_dtype(mu1, sigma1, mu2, sigma2)
  mu1, sigma1, mu2, sigma2 = (
      jnp.asarray(x).astype(dtype) for x in (mu1, sigma1, mu2, sigma2)
  )
  sigma1 = 0.5 * (sigma1 + sigma1.T)
  sigma2 = 0.5 * (sigma2 + sigma2.T)
  root1 = psd_sqrtm(sigma1)
  cross = psd_sqrtm(root1 @ sigma2 @ root1)
  return (
      jnp.sum(jnp.square(mu1 - mu2))
      + jnp.trace(sigma1)
      + jnp.trace(sigma2)
      - 2.0 * jnp.trace(cross)
  )


@functools.partial(jax.jit, static_argnames=('parametrization',))
def gaussian_wasserstein_sq(
    theta1: jax.Array, theta2: jax.Array, parametrization: str = 'cholesky'
) -> jax.Array:
  r""":math:`W_2^2(\rho_{\theta_1}, \rho_{\theta_2})` of parametrized Gaussians.

  :func:`bures_wasserstein_sq` of :func:`gaussian_unpack`-ed parameters, with
  :math:`\Sigma = AA^\top`. For small :math:`t`,
  :math:`W_2^2(\rho_\theta, \rho_{\theta + t u}) = t^2 u^\top G_W(\theta) u +
  O(t^3)` with :math:`G_W` of :func:`gaussian_metric`.

  Args:
    theta1: the first flat parameter vector.
    theta2: the second flat parameter vector, same length.
    parametrization: one of :data:`PARAMETRIZATIONS`.

  Returns:
    The scalar :math:`W_2^2`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> theta = jnp.array([0.0, 0.0, 1.0, 1.0])
    >>> shifted = jnp.array([3.0, 4.0, 1.0, 1.0])
    >>> float(exact.gaussian_wasserstein_sq(theta, shifted, 'diagonal'))
    25.0
  """
  mu1, a1 = gaussian_unpack(theta1, parametrization)
  mu2, a2 = gaussian_unpack(theta2, parametrization)
  return bures_wasserstein_sq(mu1, a1 @ a1.T, mu2, a2 @ a2.T)


# ---------------------------------------------------------------------------
# One-dimensional families from quantile functions.
# ---------------------------------------------------------------------------


def quantile_quadrature(
    num_nodes: int = 64, rule: str = 'normal', dtype: Any = None
) -> tuple[jax.Array, jax.Array]:
  r"""Nodes :math:`u_k \in (0, 1)` and weights :math:`w_k` for :math:`\int_0^1`.

  * ``'normal'`` (default): Gauss–Hermite in the normal score. With
    :math:`u = \Phi(z)`,
    :math:`\int_0^1 f(u)\,du = \int f(\Phi(z))\,\varphi(z)\,dz`, integrated
    with the probabilists' Hermite rule
    (:func:`numpy.polynomial.hermite_e.hermegauss`, weights divided by
    :math:`\sqrt{2\pi}`; at most 300 nodes, beyond which NumPy's weights
    overflow). Quantile functions of distributions with unbounded support
    are singular at :math:`u \in \{0, 1\}` (the Gaussian one like
    :math:`\sqrt{-2\log u}`, the log-normal one exponentially in that),
    which ruins Gauss–Legendre's convergence, while :math:`f(\Phi(z))` is
    smooth, so this rule is exact for the Gaussian metric and, in float64,
    accurate to :math:`10^{-11}` or better (relative) for the log-normal metric
    with :math:`s = 1/2`, :math:`10^{-9}` with :math:`s = 1` and
    :math:`10^{-5}` with :math:`s = 2` (from 32 to 256 nodes alike;
    :func:`lognormal_metric`). What limits it is not the number of nodes
    but the upper tail: a level :math:`u = \Phi(z)` cannot resolve
    :math:`1 - u` below the machine epsilon, so :math:`Q(u)` loses accuracy
    for :math:`z \gtrsim 7` and nodes whose :math:`u` rounds to 1 (or to a
    subnormal) in ``dtype`` are dropped (weight 0): :math:`z > 8.2` in
    float64, :math:`z > 5.3` in float32, where :math:`\varphi` weighs less
    than :math:`10^{-14}`, resp. :math:`10^{-6}` — less is lost only if the
    integrand grows slower than that.
  * ``'legendre'``: Gauss–Legendre on :math:`(0, 1)`
    (:func:`numpy.polynomial.legendre.leggauss`), exact for polynomial
    quantiles (bounded support, e.g. uniform) but only algebraically
    convergent on unbounded ones: for the Gaussian metric the relative error
    is :math:`6 \cdot 10^{-4}` with 64 nodes and :math:`2 \cdot 10^{-6}`
    with 1024; for the log-normal with :math:`s = 1` it is 0.1 with 64
    nodes and :math:`6 \cdot 10^{-3}` with 1024. Do not use it for heavy
    tails.

  Args:
    num_nodes: the number of nodes (a Python int).
    rule: one of :data:`QUADRATURE_RULES`.
    dtype: the dtype of the result (default: the default float dtype).

  Returns:
    ``(u, w)``, each of shape ``(num_nodes,)``; the weights sum to 1 (up to
    the dropped nodes).

  Example:
    >>> from kwng_jax import exact
    >>> u, w = exact.quantile_quadrature(32, 'legendre')
    >>> round(float(w.sum()), 5), round(float((w * u).sum()), 5)
    (1.0, 0.5)
  """
  if rule not in QUADRATURE_RULES:
    raise ValueError(
        f'Unknown rule={rule!r}; valid values are {list(QUADRATURE_RULES)}.'
    )
  dtype = jnp.dtype(dtype) if dtype is not None else jnp.asarray(0.0).dtype
  u, w = _quadrature_nodes(num_nodes, rule, dtype)
  return jnp.asarray(u, dtype=dtype), jnp.asarray(w, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _quadrature_nodes(
    num_nodes: int, rule: str, dtype: Any
) -> tuple[np.ndarray, np.ndarray]:
  """NumPy float64 nodes and weights of :func:`quantile_quadrature`."""
  if rule == 'legendre':
    x, w = np.polynomial.legendre.leggauss(num_nodes)
    u, w = 0.5 * (x + 1.0), 0.5 * w
  else:
    if num_nodes > 300:
      raise ValueError(
          f"rule='normal' takes at most 300 nodes, got num_nodes={num_nodes}."
      )
    z, w = np.polynomial.hermite_e.hermegauss(num_nodes)
    u = np.array([0.5 * math.erfc(-zk / math.sqrt(2.0)) for zk in z])
    w = w / math.sqrt(2.0 * math.pi)
  u_cast = u.astype(dtype)
  # Subnormal levels are flushed to zero on some backends: keep normal ones.
  inside = (u_cast >= jnp.finfo(dtype).tiny) & (u_cast < 1.0)
  u = np.where(inside, u, 0.5)
  w = np.where(inside, w, 0.0)
  u.flags.writeable = False
  w.flags.writeable = False
  return u, w


@functools.partial(
    jax.jit, static_argnames=('quantile_fn', 'num_nodes', 'rule')
)
def quantile_metric(
    quantile_fn: Callable[[jax.Array, jax.Array], jax.Array],
    theta: jax.Array,
    num_nodes: int = 64,
    rule: str = 'normal',
) -> jax.Array:
  r"""Wasserstein metric of a one-dimensional family from its quantile function.

  In one dimension :math:`W_2` is the :math:`L^2(0, 1)` distance between
  quantile functions, so

  .. math::
     G_W(\theta) = \int_0^1 \partial_\theta Q_\theta(u)\,
       \partial_\theta Q_\theta(u)^\top du
     \approx \sum_k w_k\, \partial_\theta Q_\theta(u_k)\,
       \partial_\theta Q_\theta(u_k)^\top ,

  with the nodes of :func:`quantile_quadrature` (see there for the
  accuracy) and :math:`\partial_\theta Q` by :func:`jax.grad`.

  Args:
    quantile_fn: ``(theta, u) -> Q_theta(u)``, a scalar for a scalar
      ``u`` in (0, 1), differentiable in ``theta``.
    theta: the flat parameter vector, length :math:`P`.
    num_nodes: the number of quadrature nodes.
    rule: one of :data:`QUADRATURE_RULES`.

  Returns:
    :math:`G_W(\theta)`, shape ``(P, P)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> theta = jnp.array([0.0, 2.0])
    >>> g = exact.quantile_metric(exact.gaussian_quantile, theta)
    >>> bool(jnp.allclose(g, jnp.eye(2), atol=1e-4))  # N(mu, s^2): identity
    True

  References:
    Arbel et al., ICLR 2020; Villani, *Topics in Optimal
    Transportation* (2003), §2.2.
  """
  theta = jnp.asarray(theta)
  u, w = quantile_quadrature(num_nodes, rule, _float_dtype(theta))
  theta = theta.astype(u.dtype)
  grads = jax.vmap(jax.grad(quantile_fn), in_axes=(None, 0))(theta, u)
  return (grads * w[:, None]).T @ grads


@functools.partial(
    jax.jit, static_argnames=('quantile_fn', 'num_nodes', 'rule')
)
def quantile_wasserstein_sq(
    quantile_fn: Callable[[jax.Array, jax.Array], jax.Array],
    theta1: jax.Array,
    theta2: jax.Array,
    num_nodes: int = 64,
    rule: str = 'normal',
) -> jax.Array:
  r""":math:`W_2^2` between two members of a one-dimensional family.

  .. math::
     W_2^2(\rho_{\theta_1}, \rho_{\theta_2}) = \int_0^1
       (Q_{\theta_1}(u) - Q_{\theta_2}(u))^2 du
     \approx \sum_k w_k (Q_{\theta_1}(u_k) - Q_{\theta_2}(u_k))^2 .

  Args:
    quantile_fn: ``(theta, u) -> Q_theta(u)`` (see :func:`quantile_metric`).
    theta1: the first parameter vector.
    theta2: the second parameter vector.
    num_nodes: the number of quadrature nodes.
    rule: one of :data:`QUADRATURE_RULES`.

  Returns:
    The scalar :math:`W_2^2`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> theta1, theta2 = jnp.array([0.0, 1.0]), jnp.array([1.0, 3.0])
    >>> q = exact.gaussian_quantile
    >>> w2 = exact.quantile_wasserstein_sq(q, theta1, theta2)
    >>> round(float(w2), 4)  # (0 - 1)^2 + (1 - 3)^2
    5.0
  """
  theta1, theta2 = jnp.asarray(theta1), jnp.asarray(theta2)
  u, w = quantile_quadrature(num_nodes, rule, _float_dtype(theta1, theta2))
  q = jax.vmap(quantile_fn, in_axes=(None, 0))
  diff = q(theta1.astype(u.dtype), u) - q(theta2.astype(u.dtype), u)
  return jnp.sum(w * jnp.square(diff))


def gaussian_quantile(theta: jax.Array, u: jax.Array) -> jax.Array:
  r"""Quantile function of :math:`\mathcal N(\mu, s^2)`, in :math:`(\mu, s)`.

  .. math:: Q_\theta(u) = \mu + s\,\Phi^{-1}(u),

  whose Wasserstein metric in :math:`(\mu, s)` is the identity (the
  'diagonal' :func:`gaussian_metric` at :math:`d = 1`).

  Args:
    theta: ``(mu, s)``, shape ``(2,)``.
    u: a level in (0, 1).

  Returns:
    :math:`Q_\theta(u)`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> float(exact.gaussian_quantile(jnp.array([1.0, 2.0]), 0.5))
    1.0
  """
  theta = jnp.asarray(theta)
  u = jnp.asarray(u).astype(theta.dtype)
  return theta[0] + theta[1] * jax.scipy.special.ndtri(u)


def lognormal_quantile(theta: jax.Array, u: jax.Array) -> jax.Array:
  r"""Quantile function of the log-normal, :math:`\theta = (m, \log s)`.

  .. math:: Q_\theta(u) = \exp(m + s\,\Phi^{-1}(u)), \qquad s = e^{\theta_1},

  i.e. :math:`X = e^{m + sZ}`, :math:`Z \sim \mathcal N(0, 1)`. Its exact
  metric is :func:`lognormal_metric`.

  Args:
    theta: ``(m, log s)``, shape ``(2,)``.
    u: a level in (0, 1).

  Returns:
    :math:`Q_\theta(u)`.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> float(exact.lognormal_quantile(jnp.array([0.0, 0.0]), 0.5))  # median
    1.0
  """
  theta = jnp.asarray(theta)
  u = jnp.asarray(u).astype(theta.dtype)
  return jnp.exp(theta[0] + jnp.exp(theta[1]) * jax.scipy.special.ndtri(u))


@jax.jit
def lognormal_metric(theta: jax.Array) -> jax.Array:
  r"""Closed-form Wasserstein metric of the log-normal.

  With :math:`Q = e^{m + sz}`, :math:`\partial_m Q = Q` and
  :math:`\partial_{\log s} Q = s z Q`; Gaussian moments
  (:math:`\mathbb E[z^k e^{2sz}]`) give

  .. math::
     G_W(\theta) = e^{2m + 2s^2}
       \begin{pmatrix} 1 & 2s^2 \\ 2s^2 & s^2 (1 + 4s^2) \end{pmatrix}.

  It is the limit of ``quantile_metric(lognormal_quantile, theta)``.

  Args:
    theta: ``(m, log s)``, shape ``(2,)``.

  Returns:
    :math:`G_W(\theta)`, shape ``(2, 2)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kwng_jax import exact
    >>> exact.lognormal_metric(jnp.array([0.0, -1e3]))  # s -> 0: a point mass
    Array([[1., 0.],
           [0., 0.]], dtype=float32)
  """
  theta = jnp.asarray(theta)
  s2 = jnp.exp(2.0 * theta[1])
  scale = jnp.exp(2.0 * theta[0] + 2.0 * s2)
  off = 2.0 * s2
  return scale * jnp.stack([
      jnp.stack([jnp.ones_like(s2), off]),
      jnp.stack([off, s2 * (1.0 + 4.0 * s2)]),
  ])
