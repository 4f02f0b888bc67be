"""Factors: basis selection, Q, K and the batched VJP for T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from kwng_jax import factors
from kwng_jax import kernels


def test_select_basis_draws_distinct_indices_and_valid_coords():
  indices, coords = factors.select_basis(10, 3, 10, key=jax.random.key(0))
  assert sorted(np.asarray(indices).tolist()) == list(range(10))
  assert bool(jnp.all((coords >= 0) & (coords < 3)))
  other, _ = factors.select_basis(10, 3, 10, key=jax.random.key(1))
  assert not np.array_equal(np.asarray(indices), np.asarray(other))


def test_select_basis_draws_every_index_and_coordinate_equally_often():
  # 2000 draws of 3 of 6 indices: each index is expected 1000 times
  # (standard deviation about 22), and no index may repeat within a draw.
  keys = jax.random.split(jax.random.key(0), 2000)
  indices = jax.vmap(lambda k: factors.select_basis(6, 2, 3, key=k)[0])(keys)
  indices = np.asarray(indices)
  assert all(len(set(row)) == 3 for row in indices.tolist())
  counts = np.bincount(indices.ravel(), minlength=6)
  assert np.all(np.abs(counts - 1000) < 120), counts
  # The coordinates: 6000 draws in [0, 3), 2000 expected each (sd about 37).
  coords = jax.vmap(lambda k: factors.select_basis(6, 3, 3, key=k)[1])(keys)
  counts = np.bincount(np.asarray(coords).ravel(), minlength=3)
  assert counts.shape == (3,) and np.all(np.abs(counts - 2000) < 200), counts


def test_select_basis_rejects_more_basis_points_than_samples():
  with pytest.raises(ValueError, match=r'num_basis=9.*N=8'):
    factors.select_basis(8, 2, 9, key=jax.random.key(0))


def test_jacobian_factor_equals_jacrev_contracted_with_cross(mlp_problem):
  params, outputs_fn, _ = mlp_problem
  samples, vjp_fn = jax.vjp(outputs_fn, params)
  indices, coords = factors.select_basis(*samples.shape, 6, key=jax.random.key(3))
  cross = factors.cross_derivatives(
      kernels.gaussian, samples[indices], coords, samples, jnp.asarray(1.3)
  )
  jacobian = factors.jacobian_factor(vjp_fn, cross, samples.shape, samples.dtype)

  flat_params, unravel = ravel_pytree(params)
  dense_jacobian = jax.jacrev(lambda v: outputs_fn(unravel(v)))(flat_params)  # (N, d, P)
  expected = jnp.einsum('mnr,nrp->mp', cross, dense_jacobian) / samples.shape[0]
  rows = jax.vmap(lambda t: ravel_pytree(t)[0])(jacobian)
  assert jax.tree.structure(jacobian) == jax.tree.structure(params)
  np.testing.assert_allclose(rows, expected, rtol=2e-5, atol=1e-6)


def test_jacobian_factor_uses_one_backward_pass_for_all_rows(mlp_problem):
  """The VJP of outputs_fn is traced once, however many basis functions."""
  params, outputs_fn, _ = mlp_problem
  calls = []

  def counted(p):
    calls.append(1)
    return outputs_fn(p)

  samples, vjp_fn = jax.vjp(counted, params)
  cross = jnp.ones((7,) + samples.shape)
  jacobian = factors.jacobian_factor(vjp_fn, cross, samples.shape, samples.dtype)
  assert len(calls) == 1
  assert jacobian['w1'].shape == (7,) + params['w1'].shape


@pytest.mark.usefixtures('enable_x64')
def test_gram_matrices_are_symmetric_positive_semidefinite():
  rng = np.random.default_rng(1)
  samples = jnp.asarray(rng.normal(size=(40, 3)))
  coords = jnp.array([0, 1, 2, 0, 1])
  basis = samples[:5]
  cross = factors.cross_derivatives(kernels.gaussian, basis, coords, samples, 2.0)
  q = factors.basis_gradient_gram(cross)
  np.testing.assert_allclose(q, np.einsum('mnr,knr->mk', cross, cross) / 40)
  k = factors.basis_rkhs_gram(kernels.gaussian, basis, coords, 2.0)
  for gram in (q, k):
    np.testing.assert_allclose(gram, gram.T, atol=1e-14)
    assert float(jnp.linalg.eigvalsh(gram).min()) > -1e-12
  # K's diagonal is ∂x_i∂y_i k(y, y) = 1/σ for the Gaussian kernel.
  np.testing.assert_allclose(jnp.diag(k), 0.5 * jnp.ones(5))


def test_samples_of_shape_n_are_one_dimensional():
  assert factors.as_sample_matrix(jnp.arange(4.0)).shape == (4, 1)
  assert factors.as_sample_matrix(jnp.zeros((4, 2, 3))).shape == (4, 6)
  with pytest.raises(ValueError, match='batch axis'):
    factors.as_sample_matrix(jnp.zeros(()))


@pytest.mark.parametrize('indices, coords, name', [
    ([0, 40], [0, 1], 'basis_indices'),
    ([-1, 2], [0, 1], 'basis_indices'),
    ([3, 3], [0, 1], 'basis_indices'),
    ([0, 1], [0, 4], 'basis_coords'),
    ([0.0, 1.0], [0, 1], 'basis_indices'),
])
def test_pinned_basis_out_of_range_or_repeated_is_named(indices, coords, name):
  with pytest.raises(ValueError, match=name):
    factors.check_pinned_basis(jnp.array(indices), jnp.array(coords), 32, 4)


def test_traced_pinned_basis_is_flagged_not_clamped():
  def validity(indices, coords):
    return factors.check_pinned_basis(indices, coords, 32, 4)[2]

  validity = jax.jit(validity)
  assert bool(validity(jnp.array([0, 31]), jnp.array([0, 3])))
  assert not bool(validity(jnp.array([0, 32]), jnp.array([0, 3])))
  assert not bool(validity(jnp.array([5, 5]), jnp.array([0, 3])))
  assert not bool(validity(jnp.array([0, 1]), jnp.array([0, 4])))


@pytest.mark.parametrize('batching', ['loop', 'map'])
def test_batchings_of_the_vjps_agree_with_vmap(batching):
  x = jax.random.normal(jax.random.key(0), (16, 3))
  params = {'w': jax.random.normal(jax.random.key(1), (3, 4)), 'b': jnp.zeros(4)}
  samples, vjp_fn = jax.vjp(lambda p: jnp.tanh(x @ p['w'] + p['b'][None, :]), params)
  cross = jax.random.normal(jax.random.key(2), (5, 12, 4))  # T from the first 12 rows
  expected = factors.jacobian_factor(vjp_fn, cross, samples.shape, samples.dtype, 'vmap')
  got = jax.jit(lambda c: factors.jacobian_factor(
      vjp_fn, c, samples.shape, samples.dtype, batching))(cross)
  for name in params:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_auto_batching_is_a_loop_on_cpu_and_can_be_overridden():
  from kwng_jax._src import options
  assert options.resolved_batching('auto') == ('loop' if jax.default_backend() == 'cpu' else 'vmap')
  assert options.resolved_batching('map') == 'map'
  with pytest.raises(ValueError, match='jacobian_batching'):
    options.EstimatorOptions(jacobian_batching='unrolled')
