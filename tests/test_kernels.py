"""Kernels: autodiff derivatives, bandwidth rules, user kernels, bad names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kwng_jax import factors
from kwng_jax import kernels


def gaussian_cross_derivatives_closed_form(basis, coords, samples, sigma):
  """∂_{y_r}∂_{x_i} exp(-|x-y|²/2σ) = (δ_ir/σ - (x-y)_i (x-y)_r / σ²) k."""
  diff = basis[:, None, :] - samples[None, :, :]  # (M, N, d)
  k = np.exp(-0.5 * np.sum(diff**2, -1) / sigma)  # (M, N)
  diff_i = np.take_along_axis(diff, coords[:, None, None], axis=2)  # (M,N,1)
  delta = np.eye(basis.shape[1])[coords][:, None, :]  # (M, 1, d)
  return (delta / sigma - diff_i * diff / sigma**2) * k[..., None]


@pytest.mark.usefixtures('enable_x64')
def test_autodiff_cross_derivatives_equal_gaussian_closed_form():
  rng = np.random.default_rng(0)
  basis, samples = rng.normal(size=(4, 3)), rng.normal(size=(9, 3))
  coords = np.array([0, 2, 1, 2])
  sigma = 0.7
  cross = factors.cross_derivatives(
      kernels.gaussian, jnp.asarray(basis), jnp.asarray(coords),
      jnp.asarray(samples), jnp.asarray(sigma),
  )
  expected = gaussian_cross_derivatives_closed_form(basis, coords, samples, sigma)
  np.testing.assert_allclose(np.asarray(cross), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures('enable_x64')
def test_rational_quadratic_tends_to_gaussian():
  x, y = jnp.array([0.3, -0.2]), jnp.array([1.0, 0.5])
  rq = kernels.rational_quadratic(x, y, 0.8, alpha=1e7)
  np.testing.assert_allclose(rq, kernels.gaussian(x, y, 0.8), rtol=1e-6)


def test_kernels_are_one_on_the_diagonal_and_decay():
  x, y = jnp.zeros(3), jnp.ones(3)
  for name, kernel in kernels.KERNELS.items():
    assert float(kernel(x, x, 1.0)) == pytest.approx(1.0), name
    assert float(kernel(x, y, 1.0)) < float(kernel(x, 0.1 * y, 1.0)) < 1.0, name


def test_two_argument_user_kernel_is_accepted_and_differentiated():
  def laplacian_like(x, y):
    return jnp.exp(-jnp.sqrt(jnp.sum(jnp.square(x - y)) + 1.0))

  kernel = kernels.resolve_kernel(laplacian_like)
  basis, samples = jnp.ones((2, 2)), jnp.zeros((3, 2))
  cross = factors.cross_derivatives(kernel, basis, jnp.array([0, 1]), samples, 1.0)
  x, y = basis[0], samples[0]
  expected = jax.grad(lambda y_: jax.grad(laplacian_like)(x, y_)[0])(y)
  np.testing.assert_allclose(cross[0, 0], expected, rtol=1e-6)


def test_unknown_kernel_name_lists_valid_ones():
  with pytest.raises(ValueError, match='gaussian.*rational_quadratic|rational_quadratic'):
    kernels.resolve_kernel('laplace')
  with pytest.raises(ValueError, match='kernel'):
    kernels.resolve_kernel(3.0)
  with pytest.raises(ValueError, match='two positional arguments'):
    kernels.resolve_kernel(lambda x: x)


def test_bandwidth_rules():
  basis = jnp.array([[0.0, 0.0]])
  samples = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # sq dists 1, 4, 9
  assert float(kernels.select_bandwidth('mean_distance', basis, samples)) == pytest.approx(14 / 3)
  assert float(kernels.select_bandwidth('mean_distance', basis, samples, 1.0)) == pytest.approx(140 / 3)
  assert float(kernels.select_bandwidth('median', basis, samples)) == pytest.approx(4.0)
  assert float(kernels.select_bandwidth(2.5, basis, samples)) == pytest.approx(2.5)
  with pytest.raises(ValueError, match='bandwidth'):
    kernels.select_bandwidth('silverman', basis, samples)
  with pytest.raises(ValueError, match='positive'):
    kernels.select_bandwidth(0.0, basis, samples)


def test_identical_samples_get_the_bandwidth_floor_not_zero():
  samples = jnp.ones((5, 2))
  sigma = kernels.select_bandwidth('mean_distance', samples[:2], samples)
  assert float(sigma) == pytest.approx(kernels.MIN_BANDWIDTH)
  cross = factors.cross_derivatives(kernels.gaussian, samples[:2], jnp.array([0, 1]), samples, sigma)
  assert bool(jnp.all(jnp.isfinite(cross)))
