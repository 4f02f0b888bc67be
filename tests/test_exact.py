"""Tests of kwng_jax.exact: the exact Wasserstein references of SPEC §1.5.

Every metric is checked against an independent definition,
u^T G_W u = lim W2^2(rho_theta, rho_{theta + t u}) / t^2, with W2 from the
closed-form Bures formula (Gaussians) or the L2 distance of quantile
functions (one-dimensional families).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kwng_jax import exact

PARAMETRIZATIONS = exact.PARAMETRIZATIONS


def _random_theta(rng, dim, parametrization):
  """A float64 parameter vector with a well-conditioned covariance (NumPy)."""
  mu = rng.normal(size=dim)
  a = np.eye(dim) + 0.3 * rng.normal(size=(dim, dim))
  scale = 0.5 + rng.uniform(size=dim)
  if parametrization == 'cholesky':
    a[np.diag_indices(dim)] = 1.0 + 0.3 * np.abs(rng.normal(size=dim))
    rest = a[np.tril_indices(dim)]
  elif parametrization == 'full':
    rest = a.reshape(-1)
  elif parametrization == 'diagonal':
    rest = scale
  else:
    rest = np.log(scale)
  return jnp.asarray(np.concatenate([mu, rest]))


def _random_symmetric(rng, dim):
  b = rng.normal(size=(dim, dim))
  return jnp.asarray(b + b.T)


def _random_spd(rng, dim):
  b = rng.normal(size=(dim, dim))
  return jnp.asarray(b @ b.T + 0.5 * np.eye(dim))


# --- Location family and the natural-gradient solve. -----------------------


@pytest.mark.usefixtures('enable_x64')
def test_location_metric_is_identity_and_equals_naive_metric():
  dim = 3
  z = jnp.asarray(np.random.default_rng(0).normal(size=(50, dim)))
  naive = exact.naive_metric(lambda mu: mu[None, :] + z, jnp.ones(dim))
  np.testing.assert_allclose(naive, exact.location_metric(dim), atol=1e-14)
  assert exact.location_metric(dim, jnp.float64).dtype == jnp.float64


@pytest.mark.usefixtures('enable_x64')
def test_wasserstein_natural_gradient_solves_damped_system():
  rng = np.random.default_rng(1)
  metric = _random_spd(rng, 4)
  grads = jnp.asarray(rng.normal(size=4))
  for epsilon in (0.0, 0.1):
    direction = exact.wasserstein_natural_gradient(metric, grads, epsilon)
    expected = np.linalg.solve(np.asarray(metric) + epsilon * np.eye(4), grads)
    np.testing.assert_allclose(direction, expected, rtol=1e-10)
  # A pytree of gradients keeps its structure.
  tree = {'a': grads[:1], 'b': grads[1:]}
  out = exact.wasserstein_natural_gradient(metric, tree)
  np.testing.assert_allclose(
      jnp.concatenate([out['a'], out['b']]),
      np.linalg.solve(np.asarray(metric), grads),
      rtol=1e-10,
  )


@pytest.mark.usefixtures('enable_x64')
def test_wasserstein_natural_gradient_singular_metric_is_minimum_norm():
  metric = jnp.diag(jnp.array([2.0, 0.0, 1.0]))
  direction = exact.wasserstein_natural_gradient(
      metric, jnp.array([1.0, 1.0, 1.0])
  )
  np.testing.assert_allclose(direction, [0.5, 0.0, 1.0], atol=1e-14)


# --- Gaussian parametrizations. --------------------------------------------


@pytest.mark.parametrize('parametrization', PARAMETRIZATIONS)
@pytest.mark.parametrize('dim', [1, 2, 3])
@pytest.mark.usefixtures('enable_x64')
def test_pack_unpack_round_trip_and_sampler(parametrization, dim):
  rng = np.random.default_rng(dim)
  theta = _random_theta(rng, dim, parametrization)
  assert theta.shape == (exact.gaussian_num_params(dim, parametrization),)
  assert exact.gaussian_dim(theta.shape[0], parametrization) == dim
  mu, a = exact.gaussian_unpack(theta, parametrization)
  np.testing.assert_allclose(
      exact.gaussian_pack(mu, a, parametrization), theta, rtol=1e-14
  )
  z = jnp.asarray(rng.normal(size=(7, dim)))
  x = exact.gaussian_sample(theta, z, parametrization)
  np.testing.assert_allclose(x, mu[None, :] + z @ a.T, rtol=1e-13, atol=1e-14)


def test_bad_parametrization_and_size_raise():
  with pytest.raises(ValueError, match='parametrization'):
    exact.gaussian_num_params(2, 'banana')
  with pytest.raises(ValueError, match='No dimension'):
    exact.gaussian_dim(4, 'cholesky')
  with pytest.raises(ValueError, match='rule'):
    exact.quantile_quadrature(8, 'simpson')


@pytest.mark.usefixtures('enable_x64')
def test_lyapunov_solve_residual():
  rng = np.random.default_rng(2)
  sigma, rhs = _random_spd(rng, 3), _random_symmetric(rng, 3)
  s = exact.lyapunov_solve(sigma, rhs)
  np.testing.assert_allclose(s, s.T, atol=1e-12)
  np.testing.assert_allclose(s @ sigma + sigma @ s, rhs, atol=1e-12)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _metric_and_bures_quotients(theta, directions, parametrization, t):
  """G_W, and W2^2(rho_theta, rho_{theta + t u}) / t^2 for each row u."""
  metric = exact.gaussian_metric(theta, parametrization)

  def quotient(u):
    return exact.gaussian_wasserstein_sq(
        theta, theta + t * u, parametrization
    ) / (t * t)

  return metric, jax.vmap(quotient)(directions)


@pytest.mark.parametrize('parametrization', PARAMETRIZATIONS)
@pytest.mark.parametrize('dim', [1, 2, 3])
@pytest.mark.usefixtures('enable_x64')
def test_gaussian_metric_matches_bures_distance(parametrization, dim):
  """u^T G_W u = lim W2^2(rho_theta, rho_{theta + t u}) / t^2 (Bures)."""
  rng = np.random.default_rng(10 * dim + PARAMETRIZATIONS.index(parametrization))
  theta = _random_theta(rng, dim, parametrization)
  directions = rng.normal(size=(3, theta.shape[0]))
  metric, quotients = _metric_and_bures_quotients(
      theta, jnp.asarray(directions), parametrization, 1e-4
  )
  metric = np.asarray(metric)
  assert metric.shape == (theta.shape[0],) * 2
  np.testing.assert_allclose(metric, metric.T, atol=1e-14)
  expected = np.einsum('kp,pq,kq->k', directions, metric, directions)
  np.testing.assert_allclose(quotients, expected, rtol=1e-3)


@pytest.mark.usefixtures('enable_x64')
def test_gaussian_metric_special_values():
  # Diagonal: the identity; log-diagonal: diag(1, .., 1, s^2).
  theta = jnp.array([0.3, -0.2, 0.7, 1.9])
  np.testing.assert_allclose(
      exact.gaussian_metric(theta, 'diagonal'), np.eye(4), atol=1e-13
  )
  np.testing.assert_allclose(
      exact.gaussian_metric(theta, 'log_diagonal'),
      np.diag([1.0, 1.0, np.exp(1.4), np.exp(3.8)]),
      rtol=1e-12,
      atol=1e-13,
  )
  # Cholesky at A = I, d = 2: moving A[1, 0] costs tr(S S) = 1/2.
  theta = exact.gaussian_pack(jnp.zeros(2), jnp.eye(2), 'cholesky')
  metric = exact.gaussian_metric(theta, 'cholesky')
  np.testing.assert_allclose(metric[3, 3], 0.5, rtol=1e-13)


@pytest.mark.parametrize('dim', [2, 3])
@pytest.mark.usefixtures('enable_x64')
def test_full_metric_singular_cholesky_positive_definite(dim):
  rng = np.random.default_rng(20 + dim)
  theta = _random_theta(rng, dim, 'full')
  metric = np.asarray(exact.gaussian_metric(theta, 'full'))
  a = np.asarray(theta[dim:]).reshape(dim, dim)
  # A rotation direction A -> A (I + t K), K skew, does not move the law.
  k = rng.normal(size=(dim, dim))
  u = np.concatenate([np.zeros(dim), (a @ (k - k.T)).reshape(-1)])
  assert abs(u @ metric @ u) < 1e-12 * np.max(np.abs(metric)) * (u @ u)
  eigvals = np.linalg.eigvalsh(metric)
  num_null = dim * (dim - 1) // 2
  assert np.sum(eigvals < 1e-10 * eigvals[-1]) == num_null
  assert eigvals[num_null] > 1e-3 * eigvals[-1]
  # Cholesky: positive definite.
  theta_c = _random_theta(rng, dim, 'cholesky')
  eigvals_c = np.linalg.eigvalsh(exact.gaussian_metric(theta_c, 'cholesky'))
  assert eigvals_c[0] > 1e-3 * eigvals_c[-1]


@pytest.mark.usefixtures('enable_x64')
def test_natural_gradient_moves_the_law_alike_in_full_and_cholesky():
  """The Wasserstein natural gradient is a property of the law, not of theta."""
  rng = np.random.default_rng(5)
  dim = 2
  theta_c = _random_theta(rng, dim, 'cholesky')
  mu, a = exact.gaussian_unpack(theta_c, 'cholesky')
  theta_f = exact.gaussian_pack(mu, a, 'full')
  target_mu, target_sigma = jnp.asarray(rng.normal(size=dim)), _random_spd(
      rng, dim
  )

  @functools.partial(jax.jit, static_argnums=1)
  def law_velocity(theta, parametrization):
    def loss(t):
      m, b = exact.gaussian_unpack(t, parametrization)
      return exact.bures_wasserstein_sq(m, b @ b.T, target_mu, target_sigma)

    metric = exact.gaussian_metric(theta, parametrization)
    direction = exact.wasserstein_natural_gradient(metric, jax.grad(loss)(theta))

    def law(t):
      m, b = exact.gaussian_unpack(t, parametrization)
      return m, b @ b.T

    return jax.jvp(law, (theta,), (direction,))[1]

  dmu_c, dsigma_c = law_velocity(theta_c, 'cholesky')
  dmu_f, dsigma_f = law_velocity(theta_f, 'full')
  np.testing.assert_allclose(dmu_f, dmu_c, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(dsigma_f, dsigma_c, rtol=1e-9, atol=1e-12)


# --- The naive metric. -----------------------------------------------------


def _design_noise(dim):
  """2d points with mean 0 and second moment I: exact for E[J^T J]."""
  e = np.sqrt(dim) * np.eye(dim)
  return jnp.asarray(np.concatenate([e, -e]))


@pytest.mark.parametrize('parametrization', PARAMETRIZATIONS)
@pytest.mark.usefixtures('enable_x64')
def test_naive_metric_closed_form(parametrization):
  rng = np.random.default_rng(7)
  dim = 2
  theta = _random_theta(rng, dim, parametrization)
  closed = exact.gaussian_naive_metric(theta, parametrization)
  z = _design_noise(dim)
  exact_design = exact.naive_metric(
      lambda t: exact.gaussian_sample(t, z, parametrization), theta
  )
  np.testing.assert_allclose(exact_design, closed, atol=1e-13)
  z = jnp.asarray(rng.normal(size=(4000, dim)))
  monte_carlo = exact.naive_metric(
      lambda t: exact.gaussian_sample(t, z, parametrization), theta
  )
  np.testing.assert_allclose(monte_carlo, closed, atol=0.1 * np.max(closed))


@pytest.mark.usefixtures('enable_x64')
def test_naive_metric_differs_from_wasserstein_for_cholesky():
  rng = np.random.default_rng(8)
  theta = _random_theta(rng, 2, 'cholesky')
  naive = exact.gaussian_naive_metric(theta, 'cholesky')
  wasserstein = exact.gaussian_metric(theta, 'cholesky')
  np.testing.assert_allclose(naive, np.eye(5), atol=1e-14)
  # Off-diagonal entry A[1, 0] is theta[3]: its field is not a gradient.
  assert abs(float(naive[3, 3] - wasserstein[3, 3])) > 0.1
  assert float(jnp.max(jnp.abs(naive - wasserstein))) > 0.1
  # At A = I the gap is exactly 1 - 1/2.
  theta = exact.gaussian_pack(jnp.zeros(2), jnp.eye(2), 'cholesky')
  gap = exact.gaussian_naive_metric(theta) - exact.gaussian_metric(theta)
  np.testing.assert_allclose(gap[3, 3], 0.5, rtol=1e-13)


@pytest.mark.parametrize('parametrization', ['diagonal', 'log_diagonal'])
@pytest.mark.usefixtures('enable_x64')
def test_naive_metric_equals_wasserstein_for_diagonal(parametrization):
  rng = np.random.default_rng(9)
  theta = _random_theta(rng, 3, parametrization)
  z = _design_noise(3)
  naive = exact.naive_metric(
      lambda t: exact.gaussian_sample(t, z, parametrization), theta
  )
  np.testing.assert_allclose(
      naive, exact.gaussian_metric(theta, parametrization), atol=1e-12
  )


# --- One-dimensional families from quantile functions. ---------------------


@pytest.mark.usefixtures('enable_x64')
def test_quantile_metric_matches_gaussian_metric_in_one_dimension():
  theta = jnp.array([0.7, 1.3])  # (mu, s)
  for rule, num_nodes, tol in (('normal', 32, 1e-12), ('legendre', 256, 1e-4)):
    quantile = exact.quantile_metric(
        exact.gaussian_quantile, theta, num_nodes, rule
    )
    np.testing.assert_allclose(
        quantile, exact.gaussian_metric(theta, 'diagonal'), rtol=tol, atol=tol
    )

  def log_scale_quantile(t, u):
    return exact.gaussian_quantile(jnp.stack([t[0], jnp.exp(t[1])]), u)

  theta = jnp.array([0.7, jnp.log(1.3)])
  np.testing.assert_allclose(
      exact.quantile_metric(log_scale_quantile, theta),
      exact.gaussian_metric(theta, 'log_diagonal'),
      rtol=1e-12,
      atol=1e-12,
  )


@pytest.mark.parametrize('scale', [0.5, 1.0])
@pytest.mark.usefixtures('enable_x64')
def test_lognormal_metric(scale):
  theta = jnp.array([0.3, np.log(scale)])
  quadrature = exact.quantile_metric(exact.lognormal_quantile, theta)
  closed = exact.lognormal_metric(theta)
  np.testing.assert_allclose(quadrature, closed, rtol=1e-8)
  # Against finite differences of W2^2 = ||Q_theta - Q_theta'||^2_{L2(0,1)}.
  rng = np.random.default_rng(11)
  t = 1e-4
  for _ in range(3):
    u = jnp.asarray(rng.normal(size=2))
    w2 = exact.quantile_wasserstein_sq(
        exact.lognormal_quantile, theta, theta + t * u
    )
    np.testing.assert_allclose(w2 / t**2, u @ closed @ u, rtol=1e-3)


@pytest.mark.usefixtures('enable_x64')
def test_quantile_quadrature_weights():
  for rule in exact.QUADRATURE_RULES:
    u, w = exact.quantile_quadrature(64, rule)
    assert u.dtype == jnp.float64
    assert bool(jnp.all((u > 0) & (u < 1)))
    np.testing.assert_allclose(jnp.sum(w), 1.0, rtol=1e-12)
    np.testing.assert_allclose(jnp.sum(w * u), 0.5, rtol=1e-12)


# --- The Bures-Wasserstein loss. -------------------------------------------


@pytest.mark.usefixtures('enable_x64')
def test_bures_known_values():
  # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
  w2 = exact.bures_wasserstein_sq(
      jnp.array([1.0]), jnp.array([[4.0]]), jnp.array([-1.0]), jnp.array([[9.0]])
  )
  np.testing.assert_allclose(w2, 4.0 + 1.0, rtol=1e-13)
  # Commuting covariances: sum of squared differences of square roots.
  rng = np.random.default_rng(12)
  q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  l1, l2 = np.array([1.0, 2.0, 3.0]), np.array([0.5, 4.0, 1.0])
  s1, s2 = jnp.asarray(q @ np.diag(l1) @ q.T), jnp.asarray(q @ np.diag(l2) @ q.T)
  w2 = exact.bures_wasserstein_sq(jnp.zeros(3), s1, jnp.zeros(3), s2)
  np.testing.assert_allclose(
      w2, np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2), rtol=1e-12
  )
  # Against scipy's matrix square root for a generic pair.
  scipy_linalg = pytest.importorskip('scipy.linalg')
  s1, s2 = _random_spd(rng, 3), _random_spd(rng, 3)
  r1 = scipy_linalg.sqrtm(np.asarray(s1))
  cross = scipy_linalg.sqrtm(r1 @ np.asarray(s2) @ r1)
  expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(cross).real
  w2 = exact.bures_wasserstein_sq(jnp.zeros(3), s1, jnp.zeros(3), s2)
  np.testing.assert_allclose(w2, expected, rtol=1e-10)


@pytest.mark.usefixtures('enable_x64')
def test_bures_gradient_matches_finite_differences():
  rng = np.random.default_rng(13)
  dim = 3
  mu1, mu2 = jnp.asarray(rng.normal(size=dim)), jnp.asarray(rng.normal(size=dim))
  s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
  loss = jax.jit(exact.bures_wasserstein_sq)
  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(mu1, s1, mu2, s2)
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g)))
  h = 1e-6
  for _ in range(3):
    dmu1 = jnp.asarray(rng.normal(size=dim))
    ds1, ds2 = _random_symmetric(rng, dim), _random_symmetric(rng, dim)
    plus = loss(mu1 + h * dmu1, s1 + h * ds1, mu2, s2 + h * ds2)
    minus = loss(mu1 - h * dmu1, s1 - h * ds1, mu2, s2 - h * ds2)
    fd = (plus - minus) / (2 * h)
    directional = (
        grads[0] @ dmu1 + jnp.sum(grads[1] * ds1) + jnp.sum(grads[3] * ds2)
    )
    np.testing.assert_allclose(directional, fd, rtol=1e-6)


@pytest.mark.usefixtures('enable_x64')
def test_bures_gradient_finite_at_equal_and_degenerate_covariances():
  rng = np.random.default_rng(14)
  mu = jnp.asarray(rng.normal(size=3))
  for sigma in (_random_spd(rng, 3), jnp.eye(3), 2.0 * jnp.eye(3)):
    grads = jax.grad(exact.bures_wasserstein_sq, argnums=(0, 1, 2, 3))(
        mu, sigma, mu, sigma
    )
    for g in grads:
      assert bool(jnp.all(jnp.isfinite(g)))
      np.testing.assert_allclose(g, 0.0, atol=1e-7)
  # Near equality with a repeated eigenvalue: finite, matches finite differences.
  ds = 1e-3 * _random_symmetric(rng, 3)
  grad = jax.grad(exact.bures_wasserstein_sq, argnums=1)(
      mu, jnp.eye(3) + ds, mu, jnp.eye(3)
  )
  assert bool(jnp.all(jnp.isfinite(grad)))
  direction = _random_symmetric(rng, 3)
  h = 1e-6
  f = lambda s: exact.bures_wasserstein_sq(mu, s, mu, jnp.eye(3))  # noqa: E731
  fd = (f(jnp.eye(3) + ds + h * direction) - f(jnp.eye(3) + ds - h * direction))
  np.testing.assert_allclose(
      jnp.sum(grad * direction), fd / (2 * h), rtol=1e-4, atol=1e-9
  )


@pytest.mark.usefixtures('enable_x64')
def test_bures_hessian_is_twice_the_metric():
  """W2^2(rho_theta, rho_theta') = (theta' - theta)^T G_W (theta' - theta) + ..."""
  rng = np.random.default_rng(15)
  theta = _random_theta(rng, 2, 'cholesky')
  hessian = jax.hessian(
      lambda t: exact.gaussian_wasserstein_sq(theta, t, 'cholesky')
  )(theta)
  np.testing.assert_allclose(
      hessian, 2.0 * exact.gaussian_metric(theta, 'cholesky'), rtol=1e-6,
      atol=1e-9,
  )


# --- float32, strict promotion, jit. ---------------------------------------


def test_float32_and_jit():
  rng = np.random.default_rng(16)
  theta = jnp.asarray(rng.normal(size=5), dtype=jnp.float32)
  metric = jax.jit(exact.gaussian_metric, static_argnums=1)(theta, 'cholesky')
  assert metric.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(metric)))
  z = jnp.asarray(rng.normal(size=(16, 2)))  # float64 numpy, cast inside
  x = exact.gaussian_sample(theta, z)
  assert x.dtype == jnp.float32
  g = exact.quantile_metric(exact.lognormal_quantile, jnp.array([0.0, 0.0]))
  assert g.dtype == jnp.float32
  np.testing.assert_allclose(
      g, exact.lognormal_metric(jnp.array([0.0, 0.0])), rtol=1e-2
  )
  sigma = jnp.eye(2, dtype=jnp.float32)
  grad = jax.jit(jax.grad(exact.bures_wasserstein_sq, argnums=1))(
      jnp.zeros(2), sigma, jnp.ones(2), 2.0 * sigma
  )
  assert grad.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(grad)))
  direction = exact.wasserstein_natural_gradient(metric, jnp.ones(5), 1e-3)
  assert direction.dtype == jnp.float32
