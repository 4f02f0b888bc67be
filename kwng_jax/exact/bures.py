r"""The Bures–Wasserstein distance between Gaussians, a differentiable loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kwng_jax.exact.common import _float_dtype
from kwng_jax.exact.gaussian import gaussian_unpack


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
