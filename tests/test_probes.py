"""Probes of the samples' metric diagonal, and their running average."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kwng_jax import factors
from kwng_jax import probes


@pytest.mark.parametrize('num_rows', [16, 6])
def test_probes_estimate_the_diagonal_of_the_samples_metric(num_rows):
  """mean_k (Jᵀv_k)² over random sign probes on the first n rows -> (JᵀJ)_jj / n."""
  x = jax.random.normal(jax.random.key(0), (16, 3)) * jnp.array([[0.1, 1.0, 3.0]])
  params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
  samples, vjp_fn = jax.vjp(lambda p: x @ p['w'] + p['b'][None, :], params)
  cotangents = probes.probe_cotangents(jax.random.key(1), 20000, num_rows, samples.shape,
                                       samples.dtype)
  assert cotangents.shape == (20000, 16, 2)
  np.testing.assert_array_equal(cotangents[:, num_rows:], 0.0)
  # Signs: +-1 / sqrt(n), each about half the time.
  np.testing.assert_allclose(jnp.abs(cotangents[:, :num_rows]), 1.0 / np.sqrt(num_rows), rtol=1e-6)
  assert abs(float(jnp.mean(cotangents[:, :num_rows] > 0)) - 0.5) < 0.01
  diagonal = probes.metric_diagonal(factors.pullbacks(vjp_fn, cotangents))
  # X[n, i] = sum_a x[n, a] w[a, i] + b[i]: (JᵀJ) at w[a, i] is sum_n x[n, a]², at b[i] it is n.
  expected_w = jnp.broadcast_to(jnp.mean(jnp.square(x[:num_rows]), axis=0)[:, None], (3, 2))
  np.testing.assert_allclose(diagonal['w'], expected_w, rtol=0.05)
  np.testing.assert_allclose(diagonal['b'], jnp.ones(2), rtol=0.05)


def test_averaged_diagonal_is_the_debiased_exponential_average():
  params = {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)}
  average = probes.DiagonalAverage.zeros(params)
  estimates = [jax.tree.map(lambda p, c=c: jnp.full(p.shape, c), params) for c in (4.0, 1.0, 2.0)]
  diagonals = []
  for estimate in estimates:
    average, diagonal = probes.averaged_diagonal(average, estimate, decay=0.5)
    diagonals.append(diagonal)
  # The first is the estimate itself; then sum_s b^(t-s) (1-b) e_s / (1 - b^t).
  np.testing.assert_allclose(diagonals[0]['w'], 4.0, rtol=1e-6)
  np.testing.assert_allclose(diagonals[1]['b'], (0.25 * 4 + 0.5 * 1) / 0.75, rtol=1e-6)
  np.testing.assert_allclose(diagonals[2]['w'], (0.125 * 4 + 0.25 * 1 + 0.5 * 2) / 0.875,
                             rtol=1e-6)
  np.testing.assert_allclose(average.weight, 0.875, rtol=1e-6)
