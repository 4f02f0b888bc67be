"""Dense float64 NumPy transcriptions of SPEC §1, independent of kwng_jax."""

import numpy as np
import scipy.linalg


def gaussian_cross_derivatives(basis, coords, samples, sigma):
  """W[m, n, r] = ∂_{y_r}∂_{x_i} exp(-|x-y|²/2σ), i = coords[m], in closed form.

  ∂_{y_r}∂_{x_i} k = (δ_ir/σ - (x-y)_i (x-y)_r / σ²) k.
  """
  diff = basis[:, None, :] - samples[None, :, :]
  k = np.exp(-0.5 * np.sum(diff**2, -1) / sigma)
  diff_i = np.take_along_axis(diff, coords[:, None, None], axis=2)
  delta = np.eye(basis.shape[1])[coords][:, None, :]
  return (delta / sigma - diff_i * diff / sigma**2) * k[..., None]


def factors(samples, jacobian, indices, coords, log_bandwidth=0.0):
  """(T, Q, K, σ) for the Gaussian kernel with the published bandwidth.

  Args:
    samples: (N, d).
    jacobian: dense ∂X/∂θ, (N, d, P).
    indices, coords: the pinned basis.
  """
  basis = samples[indices]
  sigma = np.mean(np.sum((basis[:, None] - samples[None]) ** 2, -1))
  sigma *= 10.0**log_bandwidth
  cross = gaussian_cross_derivatives(basis, coords, samples, sigma)
  n = samples.shape[0]
  q = np.einsum('mnr,knr->mk', cross, cross) / n
  t = np.einsum('mnr,nrp->mp', cross, jacobian) / n
  cross_basis = gaussian_cross_derivatives(basis, coords, basis, sigma)
  k = cross_basis[:, np.arange(len(coords)), coords]
  return t, q, k, sigma


def whiten(t, gram, rcond):
  s, u = np.linalg.eigh(gram)
  keep = s > rcond * s.max()
  return (u[:, keep] / np.sqrt(s[keep])).T @ t


def damping(whitened, kind):
  norms = np.linalg.norm(whitened, axis=0)
  if kind == 'safe':
    seen = np.any(whitened != 0, axis=0)
    typical = np.sqrt(np.mean(norms[seen] ** 2))
    return np.where(seen, 1.0 / (norms + 1e-8), 1.0 / typical)
  return {
      'reference': 1.0 / (norms + 1e-8),
      'squared': 1.0 / (norms**2 + 1e-8),
      'identity': np.ones_like(norms),
  }[kind]


def unseen_curvature(whitened, kind):
  """'safe': the squared RMS seen column norm on the zero columns; else zeros."""
  norms = np.linalg.norm(whitened, axis=0)
  seen = np.any(whitened != 0, axis=0)
  if kind != 'safe':
    return np.zeros_like(norms)
  return np.where(seen, 0.0, np.mean(norms[seen] ** 2))


def natural_gradient(t, q, k, g, *, kind, epsilon, ridge=0.0, rcond=1e-12):
  """Both forms of SPEC §1.2 (ridge = 0) or §1.3 (ridge > 0).

  Returns:
    (direct, woodbury): (T̃ᵀT̃ + εD⁻¹)⁻¹g, and the Woodbury form, the latter
    with T and Q + λK unwhitened when ridge > 0.
  """
  gram = q + ridge * k
  whitened = whiten(t, gram, rcond)
  d = damping(whitened, kind)
  v = unseen_curvature(whitened, kind)
  direct = np.linalg.solve(whitened.T @ whitened + np.diag(v) + epsilon * np.diag(1.0 / d), g)
  if ridge == 0:
    inner = whitened @ (d[:, None] * whitened.T) + epsilon * np.eye(len(whitened))
    residual = g - whitened.T @ np.linalg.solve(inner, whitened @ (d * g))
    woodbury = d / (epsilon + v * d) * residual
  else:
    inner = t @ (d[:, None] * t.T) + ridge * epsilon * k + epsilon * q
    woodbury = d * (g - t.T @ np.linalg.solve(inner, t @ (d * g))) / epsilon
  return direct, woodbury


def cholesky_gaussian_metric(mu, a):
  """Exact G_W of N(μ, AAᵀ) in θ = (μ, tril(A)), by the Lyapunov equation."""
  d = len(mu)
  sigma = a @ a.T
  rows, cols = np.tril_indices(d)
  tangents = [(np.eye(d)[j], np.zeros((d, d))) for j in range(d)]
  for r, c in zip(rows, cols):
    da = np.zeros((d, d))
    da[r, c] = 1.0
    tangents.append((np.zeros(d), da))
  lyapunov = []
  for dmu, da in tangents:
    dsigma = da @ a.T + a @ da.T
    lyapunov.append((dmu, scipy.linalg.solve_continuous_lyapunov(sigma, dsigma)))
  return np.array([
      [mu_i @ mu_j + np.trace(s_i @ sigma @ s_j) for mu_j, s_j in lyapunov]
      for mu_i, s_i in lyapunov
  ])
