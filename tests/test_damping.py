"""The adaptive (Levenberg–Marquardt) damping: the published rule and the per-step one."""

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
  opt = kwng_jax.published_kwng(0.1, epsilon=1e-3)
  epsilons, _ = feed(opt, params, outputs_fn, loss_fn, [1.0] * 10)
  np.testing.assert_allclose(epsilons[:4], 1e-3, rtol=1e-6)
  np.testing.assert_allclose(epsilons[4:9], 1e-3 / 0.85, rtol=1e-6)
  np.testing.assert_allclose(epsilons[9], 1e-3 / 0.85**2, rtol=1e-6)


def test_large_decrease_shrinks_epsilon(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.published_kwng(1e-3, epsilon=1e-3)
  epsilons, _ = feed(opt, params, outputs_fn, loss_fn, [100.0 - 10.0 * t for t in range(10)])
  np.testing.assert_allclose(epsilons[:4], 1e-3, rtol=1e-6)
  np.testing.assert_allclose(epsilons[4], 1e-3 * 0.85, rtol=1e-6)
  np.testing.assert_allclose(epsilons[9], 1e-3 * 0.85**2, rtol=1e-6)


def test_ratio_between_thresholds_keeps_epsilon(mlp_problem):
  """An actual decrease of a quarter of the prediction (ρ = 0.5) keeps ε."""
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.published_kwng(0.1, epsilon=1e-3)

  def half_of_predicted(state):
    # ρ = 2 (L_prev - L) / predicted = 0.5  <=>  L = L_prev - predicted / 4.
    return state.damping_previous_loss - 0.25 * state.damping_predicted_decrease

  values = [5.0] + [half_of_predicted] * 9
  epsilons, states = feed(opt, params, outputs_fn, loss_fn, values)
  assert float(states[1].damping_predicted_decrease) > 0
  np.testing.assert_allclose(epsilons, 1e-3, rtol=1e-6)


def test_epsilon_stays_within_its_bounds(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  high = kwng_jax.published_kwng(0.1, epsilon=0.95e5)
  epsilons, _ = feed(high, params, outputs_fn, loss_fn, [1.0] * 10)
  assert epsilons.max() == pytest.approx(1e5)
  low = kwng_jax.published_kwng(1e-3, epsilon=1.05e-10)
  epsilons, _ = feed(low, params, outputs_fn, loss_fn, [100.0 - 10.0 * t for t in range(10)])
  assert epsilons.min() == pytest.approx(1e-10)


def test_predicted_decrease_is_lr_times_alignment_for_the_published_chain(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  lr = 0.05
  opt = kwng_jax.published_kwng(lr, max_norm=None, num_basis=8)
  _, states = feed(opt, params, outputs_fn, loss_fn, [1.0])
  info = otu.tree_get(states[0], 'kwng_info')
  assert not bool(info.fallback)
  np.testing.assert_allclose(
      states[0].damping_predicted_decrease, lr * info.alignment, rtol=1e-5)


def test_missing_value_and_missing_kwng_are_named(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.published_kwng(0.1)
  grads = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError, match='value'):
    opt.update(grads, opt.init(params), params, outputs_fn=outputs_fn)
  with pytest.raises(ValueError, match='scale_by_kwng'):
    kwng_jax.adaptive_damping(optax.sgd(0.1)).init(params)


def linear_problem():
  inputs = jax.random.normal(jax.random.key(0), (32, 3))
  outputs_fn = lambda p: inputs @ p  # noqa: E731
  loss_fn = lambda p: jnp.mean(jnp.square(outputs_fn(p) - 1.0))  # noqa: E731
  return jnp.zeros((3, 2)), outputs_fn, loss_fn


def epsilons_along_training(opt, num_steps):
  params, outputs_fn, loss_fn = linear_problem()
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
    return params + updates, state, loss

  epsilons, losses = [], []
  for _ in range(num_steps):
    params, state, loss = step(params, state)
    epsilons.append(float(otu.tree_get(state, 'kwng_epsilon')))
    losses.append(float(loss))
  return np.array(epsilons), np.array(losses)


def test_per_step_rule_grows_epsilon_when_steps_raise_the_loss():
  """Steps that move the samples by 1 (RMS) overshoot: ε must rise."""
  epsilons, losses = epsilons_along_training(kwng_jax.kwng(1.0, momentum=None), 12)
  assert losses[5] > losses[0]
  # From the second step on, every failed step divides ε by 0.85.
  assert epsilons[-1] > 1e-5 / 0.85**8, epsilons


def test_per_step_rule_shrinks_epsilon_when_steps_work():
  """Small steps decrease the loss as predicted: ε must fall, step after step.

  T has rank 2 here (linear samples of width 2), so the direction's
  components outside it rest on rounding, and a step's ratio can land just
  inside [0.25, 0.75] (no change): ε must never rise and must fall at 9 of
  the 11 steps at least (each fall is a factor 0.85).
  """
  for batching in ('loop', 'vmap'):
    epsilons, losses = epsilons_along_training(
        kwng_jax.kwng(0.005, jacobian_batching=batching), 12)
    assert np.all(np.diff(losses) < 0)
    assert np.all(np.diff(epsilons) <= 0), epsilons
    assert epsilons[-1] <= 1e-5 * 0.85**9 * (1 + 1e-4), epsilons


def test_per_step_rule_compares_with_the_first_order_prediction(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.adaptive_damping(
      optax.chain(kwng_jax.scale_by_kwng(epsilon=1e-3), optax.sgd(1e-3)),
      window=1, ratio_scale=1.0)

  def fraction_of_predicted(fraction):
    return lambda state: state.damping_previous_loss - fraction * state.damping_predicted_decrease

  # ρ = 0.5 keeps ε (the published factor 2 would make it 1 and shrink it);
  # ρ = 0.2 grows it and ρ = 0.9 shrinks it, at the very next step.
  epsilons, _ = feed(opt, params, outputs_fn, loss_fn,
                     [5.0, fraction_of_predicted(0.5), fraction_of_predicted(0.2),
                      fraction_of_predicted(0.9)])
  np.testing.assert_allclose(epsilons, [1e-3, 1e-3, 1e-3 / 0.85, 1e-3], rtol=1e-5)


def test_a_step_predicted_uphill_counts_as_failed(mlp_problem):
  """Momentum can send u with ⟨g, u⟩ > 0: a rise of the loss then gives ρ > 0.

  Counting that as success would shrink ε while the loss climbs; the rule
  grows it instead, and still shrinks it after a downhill step that worked.
  """
  params, outputs_fn, loss_fn = mlp_problem
  uphill = kwng_jax.adaptive_damping(
      optax.chain(kwng_jax.scale_by_kwng(epsilon=1e-3), optax.scale(1e-3)),
      window=1, ratio_scale=1.0)
  epsilons, states = feed(uphill, params, outputs_fn, loss_fn, [5.0, 10.0])
  assert float(states[0].damping_predicted_decrease) < 0
  np.testing.assert_allclose(epsilons, [1e-3, 1e-3 / 0.85], rtol=1e-5)

  downhill = kwng_jax.adaptive_damping(
      optax.chain(kwng_jax.scale_by_kwng(epsilon=1e-3), optax.scale(-1e-3)),
      window=1, ratio_scale=1.0)
  epsilons, states = feed(downhill, params, outputs_fn, loss_fn,
                          [5.0, lambda s: s.damping_previous_loss - s.damping_predicted_decrease])
  assert float(states[0].damping_predicted_decrease) > 0
  np.testing.assert_allclose(epsilons, [1e-3, 1e-3 * 0.85], rtol=1e-5)
