"""The adaptive (Levenberg–Marquardt) damping of the published optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import pytest

import kwng_jax


def feed(opt, params, outputs_fn, loss_fn, values):
  """Runs updates at fixed params with the given losses; returns ε after each."""
  state = opt.init(params)
  grads = jax.grad(loss_fn)(params)
  update = jax.jit(lambda s, v: opt.update(grads, s, params, outputs_fn=outputs_fn, value=v))
  epsilons, states = [], []
  for value in values:
    value = value(state) if callable(value) else value
    _, state = update(state, jnp.asarray(value, jnp.float32))
    epsilons.append(float(otu.tree_get(state, 'kwng_epsilon')))
    states.append(state)
  return np.array(epsilons), states


def test_no_decrease_grows_epsilon_at_each_window_end(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.kwng(0.1, epsilon=1e-3)
  epsilons, _ = feed(opt, params, outputs_fn, loss_fn, [1.0] * 10)
  np.testing.assert_allclose(epsilons[:4], 1e-3, rtol=1e-6)
  np.testing.assert_allclose(epsilons[4:9], 1e-3 / 0.85, rtol=1e-6)
  np.testing.assert_allclose(epsilons[9], 1e-3 / 0.85**2, rtol=1e-6)


def test_large_decrease_shrinks_epsilon(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.kwng(1e-3, epsilon=1e-3)
  epsilons, _ = feed(opt, params, outputs_fn, loss_fn, [100.0 - 10.0 * t for t in range(10)])
  np.testing.assert_allclose(epsilons[:4], 1e-3, rtol=1e-6)
  np.testing.assert_allclose(epsilons[4], 1e-3 * 0.85, rtol=1e-6)
  np.testing.assert_allclose(epsilons[9], 1e-3 * 0.85**2, rtol=1e-6)


def test_ratio_between_thresholds_keeps_epsilon(mlp_problem):
  """An actual decrease of a quarter of the prediction (ρ = 0.5) keeps ε."""
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.kwng(0.1, epsilon=1e-3)

  def half_of_predicted(state):
    # ρ = 2 (L_prev - L) / predicted = 0.5  <=>  L = L_prev - predicted / 4.
    return state.damping_previous_loss - 0.25 * state.damping_predicted_decrease

  values = [5.0] + [half_of_predicted] * 9
  epsilons, states = feed(opt, params, outputs_fn, loss_fn, values)
  assert float(states[1].damping_predicted_decrease) > 0
  np.testing.assert_allclose(epsilons, 1e-3, rtol=1e-6)


def test_epsilon_stays_within_its_bounds(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  high = kwng_jax.kwng(0.1, epsilon=0.95e5)
  epsilons, _ = feed(high, params, outputs_fn, loss_fn, [1.0] * 10)
  assert epsilons.max() == pytest.approx(1e5)
  low = kwng_jax.kwng(1e-3, epsilon=1.05e-10)
  epsilons, _ = feed(low, params, outputs_fn, loss_fn, [100.0 - 10.0 * t for t in range(10)])
  assert epsilons.min() == pytest.approx(1e-10)


def test_predicted_decrease_is_lr_times_alignment_for_the_published_chain(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  lr = 0.05
  opt = kwng_jax.kwng(lr, max_norm=None, num_basis=8)
  _, states = feed(opt, params, outputs_fn, loss_fn, [1.0])
  info = otu.tree_get(states[0], 'kwng_info')
  assert not bool(info.fallback)
  np.testing.assert_allclose(
      states[0].damping_predicted_decrease, lr * info.alignment, rtol=1e-5)


def test_missing_value_and_missing_kwng_are_named(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.kwng(0.1)
  grads = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError, match='value'):
    opt.update(grads, opt.init(params), params, outputs_fn=outputs_fn)
  with pytest.raises(ValueError, match='scale_by_kwng'):
    kwng_jax.adaptive_damping(optax.sgd(0.1)).init(params)
