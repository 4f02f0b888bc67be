"""The estimator against dense references, exact metrics and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kwng_jax
import references
from kwng_jax import factors

DAMPINGS = ('reference', 'squared', 'identity')


def dense_problem(params, outputs_fn, loss_fn, num_basis, seed=0):
  samples = np.asarray(outputs_fn(params))
  flat, unravel = ravel_pytree(params)
  jacobian = np.asarray(jax.jacrev(lambda v: outputs_fn(unravel(v)))(flat))
  grads = jax.grad(loss_fn)(params)
  indices, coords = factors.select_basis(
      samples.shape[0], samples.shape[1], num_basis, key=jax.random.key(seed)
  )
  return samples, jacobian, grads, indices, coords


@pytest.mark.usefixtures('enable_x64')
@pytest.mark.parametrize('damping', DAMPINGS)
@pytest.mark.parametrize('ridge', [0.0, 1e-2])
def test_direction_equals_dense_float64_transcription(mlp_problem, damping, ridge):
  params, outputs_fn, loss_fn = mlp_problem
  params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
  samples, jacobian, grads, indices, coords = dense_problem(
      params, outputs_fn, loss_fn, num_basis=6
  )
  t, q, k, _ = references.factors(samples, jacobian, np.asarray(indices), np.asarray(coords))
  g = np.asarray(ravel_pytree(grads)[0])
  epsilon = 1e-3
  direct, woodbury = references.natural_gradient(
      t, q, k, g, kind=damping, epsilon=epsilon, ridge=ridge
  )
  np.testing.assert_allclose(direct, woodbury, rtol=1e-7, atol=1e-9)

  direction, info = kwng_jax.natural_gradient(
      grads, outputs_fn, params, epsilon=epsilon, damping=damping, ridge=ridge,
      basis_indices=indices, basis_coords=coords,
  )
  assert jax.tree.structure(direction) == jax.tree.structure(grads)
  np.testing.assert_allclose(ravel_pytree(direction)[0], direct, rtol=1e-7, atol=1e-9)
  assert int(info.effective_rank) == 6
  np.testing.assert_allclose(info.alignment, g @ direct, rtol=1e-7)


@pytest.mark.parametrize('damping', DAMPINGS)
def test_float32_direction_agrees_with_float64_reference(mlp_problem, damping):
  params, outputs_fn, loss_fn = mlp_problem
  samples, jacobian, grads, indices, coords = dense_problem(
      params, outputs_fn, loss_fn, num_basis=5, seed=1
  )
  t, q, k, _ = references.factors(
      samples.astype(np.float64), jacobian.astype(np.float64),
      np.asarray(indices), np.asarray(coords),
  )
  g = np.asarray(ravel_pytree(grads)[0]).astype(np.float64)
  direct, _ = references.natural_gradient(t, q, k, g, kind=damping, epsilon=1e-5)
  direction, _ = kwng_jax.natural_gradient(
      grads, outputs_fn, params, epsilon=1e-5, damping=damping,
      basis_indices=indices, basis_coords=coords,
  )
  flat = np.asarray(ravel_pytree(direction)[0])
  assert flat.dtype == np.float32
  rel = np.linalg.norm(flat - direct) / np.linalg.norm(direct)
  assert rel < 1e-3, rel


def test_basis_drawn_from_key_is_reproducible_and_pinnable(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  key = jax.random.key(7)
  a, _ = kwng_jax.natural_gradient(grads, outputs_fn, params, key=key)
  b, _ = kwng_jax.natural_gradient(grads, outputs_fn, params, key=key)
  c, _ = kwng_jax.natural_gradient(grads, outputs_fn, params, key=jax.random.key(8))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.allclose(a['w1'], c['w1'])
  idx, coords = factors.select_basis(32, 4, 5, key=key)
  pinned, _ = kwng_jax.natural_gradient(
      grads, outputs_fn, params, basis_indices=idx, basis_coords=coords
  )
  np.testing.assert_allclose(pinned['w1'], a['w1'], rtol=1e-6)


def test_pinned_basis_with_metric_diagonal_draws_its_probes_from_the_key(mlp_problem):
  """With a pinned basis the probes of 'metric_diagonal' come from key (a
  fixed one without it): the same call gives the same direction, another
  key other probes."""
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  idx, coords = factors.select_basis(32, 4, 5, key=jax.random.key(7))

  def direction(**key):
    return kwng_jax.natural_gradient(grads, outputs_fn, params, basis_indices=idx,
                                     basis_coords=coords, damping='metric_diagonal', **key)[0]

  jax.tree.map(np.testing.assert_array_equal, direction(), direction())
  keyed, other = direction(key=jax.random.key(1)), direction(key=jax.random.key(2))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((direction(), keyed)))
  assert not np.allclose(keyed['w1'], other['w1'])


@pytest.mark.usefixtures('enable_x64')
def test_kernel_projection_beats_the_naive_metric_on_cholesky_gaussian():
  """SPEC §1.5: the estimate converges to (G_W + εI)⁻¹g; E[JᵀJ] does not."""
  dim, num_samples, num_basis, epsilon = 2, 4096, 64, 1e-5
  rows, cols = np.tril_indices(dim)
  mu, a = np.array([0.3, -0.5]), np.array([[1.0, 0.0], [0.5, 0.8]])
  theta = np.concatenate([mu, a[rows, cols]])
  g = np.random.default_rng(0).normal(size=theta.size)
  metric = references.cholesky_gaussian_metric(mu, a)
  target = np.linalg.solve(metric + epsilon * np.eye(theta.size), g)

  errors, naive_errors = [], []
  for seed in range(3):
    noise = jax.random.normal(jax.random.key(seed), (num_samples, dim), jnp.float64)

    def outputs_fn(th):
      lower = jnp.zeros((dim, dim), th.dtype).at[rows, cols].set(th[dim:])
      return th[:dim][None, :] + noise @ lower.T

    direction, info = kwng_jax.natural_gradient(
        jnp.asarray(g), outputs_fn, jnp.asarray(theta), key=jax.random.key(100 + seed),
        num_basis=num_basis, epsilon=epsilon, damping='identity',
    )
    assert not bool(info.fallback)
    errors.append(np.linalg.norm(direction - target) / np.linalg.norm(target))
    jac = np.asarray(jax.jacfwd(outputs_fn)(jnp.asarray(theta)))
    naive_metric = np.einsum('ndp,ndq->pq', jac, jac) / num_samples
    naive = np.linalg.solve(naive_metric + epsilon * np.eye(theta.size), g)
    naive_errors.append(np.linalg.norm(naive - target) / np.linalg.norm(target))
  error, naive_error = np.median(errors), np.median(naive_errors)
  assert error < 0.1, (error, naive_error)
  assert 5 * error < naive_error, (error, naive_error)


def test_one_dimensional_samples_are_treated_as_d_equals_1(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  flat_fn = lambda p: outputs_fn(p)[:, 0]
  column_fn = lambda p: outputs_fn(p)[:, :1]
  key = jax.random.key(0)
  a, _ = kwng_jax.natural_gradient(grads, flat_fn, params, key=key)
  b, _ = kwng_jax.natural_gradient(grads, column_fn, params, key=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


def test_too_many_basis_points_fail_at_trace_time(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  fn = jax.jit(lambda g, p: kwng_jax.natural_gradient(
      g, outputs_fn, p, key=jax.random.key(0), num_basis=33))
  with pytest.raises(ValueError, match=r'num_basis=33.*N=32'):
    fn(grads, params)


def test_missing_outputs_fn_or_key_is_named(mlp_problem):
  params, _, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError, match='outputs_fn'):
    kwng_jax.natural_gradient(grads, None, params, key=jax.random.key(0))
  with pytest.raises(ValueError, match='key'):
    kwng_jax.natural_gradient(grads, mlp_problem[1], params)


def test_unknown_damping_lists_valid_ones(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError, match="'reference', 'squared', 'identity'"):
    kwng_jax.natural_gradient(grads, outputs_fn, params, key=jax.random.key(0), damping='diag')


def test_nonfinite_inputs_are_reported(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  bad_grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  _, info = kwng_jax.natural_gradient(bad_grads, outputs_fn, params, key=jax.random.key(0))
  assert not bool(info.finite_inputs) and bool(info.fallback)
  bad_outputs = lambda p: outputs_fn(p).at[3, 1].set(jnp.inf)
  _, info = kwng_jax.natural_gradient(grads, bad_outputs, params, key=jax.random.key(0))
  assert not bool(info.finite_inputs)


@pytest.mark.parametrize('damping', DAMPINGS)
def test_identical_samples_give_a_finite_direction(damping):
  params = {'bias': jnp.array([0.5, -1.0, 2.0])}
  outputs_fn = lambda p: jnp.zeros((16, 3)) + p['bias'][None, :]
  grads = {'bias': jnp.array([1.0, 2.0, -1.0])}
  direction, info = kwng_jax.natural_gradient(
      grads, outputs_fn, params, key=jax.random.key(0), damping=damping)
  assert bool(jnp.all(jnp.isfinite(direction['bias'])))
  assert bool(info.alignment > 0) and not bool(info.fallback)


def test_info_holds_the_alignment_and_the_squared_gradient_norm(mlp_problem):
  """<g, ĝ> and <g, g>, each summed over every leaf."""
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  direction, info = kwng_jax.natural_gradient(
      grads, outputs_fn, params, key=jax.random.key(0), num_basis=5)

  def vdot(a, b):
    return sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  np.testing.assert_allclose(float(info.alignment), vdot(grads, direction), rtol=1e-5)
  np.testing.assert_allclose(float(info.squared_gradient_norm), vdot(grads, grads), rtol=1e-5)
  assert vdot(grads, grads) != vdot(grads, direction)
