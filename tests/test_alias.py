"""The recommended optimizer kwng() on problems where it must work, and its invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kwng_jax


def train(opt, params, loss_fn, outputs_fn, num_steps):
  """Full-batch training; returns the final params and the samples after each step."""
  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
    params = optax.apply_updates(params, updates)
    return params, state, outputs_fn(params)

  state = opt.init(params)
  trajectory = []
  for _ in range(num_steps):
    params, state, samples = step(params, state)
    trajectory.append(samples)
  return params, state, jnp.stack(trajectory)


def least_squares(num_outputs, seed=0, num_samples=64, noise=0.1):
  """Standard-normal features plus a bias, noisy linear targets, and the optimum."""
  k_x, k_w, k_noise = jax.random.split(jax.random.key(seed), 3)
  features = jax.random.normal(k_x, (num_samples, 5))
  targets = (features @ jax.random.normal(k_w, (5, num_outputs)) + 0.5
             + noise * jax.random.normal(k_noise, (num_samples, num_outputs)))
  design = jnp.concatenate([features, jnp.ones((num_samples, 1))], axis=1)
  residual = design @ jnp.linalg.lstsq(design, targets)[0] - targets
  params = {'w': jnp.zeros((5, num_outputs)), 'b': jnp.zeros(num_outputs)}
  outputs_fn = lambda p: features @ p['w'] + p['b'][None, :]  # noqa: E731
  return params, outputs_fn, targets, residual


def test_least_squares_reaches_its_optimum_with_the_defaults():
  params, outputs_fn, targets, residual = least_squares(1)
  loss_fn = lambda p: jnp.mean(jnp.square(outputs_fn(p) - targets))  # noqa: E731
  optimum = float(jnp.mean(jnp.square(residual)))
  final, _, _ = train(kwng_jax.kwng(), params, loss_fn, outputs_fn, 2000)
  assert float(loss_fn(final)) <= 1.1 * optimum, (float(loss_fn(final)), optimum)
  # The published chain takes fixed Euclidean steps and does not get there.
  published, _, _ = train(kwng_jax.published_kwng(0.1), params, loss_fn, outputs_fn, 2000)
  assert float(loss_fn(published)) > 10 * optimum


def test_parameter_outside_outputs_fn_reaches_the_gaussian_likelihood_optimum():
  """mean |y - f(x)|² / (2σ²) + d log σ with log σ a parameter the samples do not see."""
  params, outputs_fn, targets, residual = least_squares(2, noise=0.3)
  params = {**params, 'log_sigma': jnp.zeros(())}

  def loss_fn(p):
    squared = jnp.mean(jnp.sum(jnp.square(targets - outputs_fn(p)), axis=1))
    return squared / (2 * jnp.exp(2 * p['log_sigma'])) + 2 * p['log_sigma']

  mean_squared = float(jnp.mean(jnp.sum(jnp.square(residual), axis=1)))
  optimum = 1.0 + np.log(mean_squared / 2)  # σ² = mean |r|² / d, d = 2
  final, _, _ = train(kwng_jax.kwng(), params, loss_fn, outputs_fn, 1000)
  assert abs(float(loss_fn(final)) - optimum) <= 0.05, (float(loss_fn(final)), optimum)
  # 'reference' damping gives log σ a step of 1e8 g / ε: it diverges.
  diverged, _, _ = train(kwng_jax.kwng(damping='reference'), params, loss_fn, outputs_fn, 1000)
  assert not abs(float(loss_fn(diverged)) - optimum) <= 0.05


def mlp(params, inputs, scales):
  hidden = jnp.tanh(inputs @ params['w1'] + params['b1'][None, :])
  return hidden @ (params['w2'] * scales[None, :]) + (params['b2'] * scales)[None, :]


@pytest.mark.usefixtures('standard_promotion')  # optax.adam's bias correction
@pytest.mark.parametrize('epsilon', [1e-5])
def test_trajectories_barely_depend_on_how_the_head_is_parametrized(epsilon):
  """The same MLP with its last layer written θ' = θ / s, s = logspace(-2, 1).

  The two models compute the same logits; their trajectories differ only
  where the optimizer is not invariant to the reparametrization. Measured
  (max over 50 steps of the RMS logit gap, over the RMS distance the logits
  travel): KWNG 1.2e-5, Adam 1.18, SGD 16.9. The 'metric_diagonal' damping
  and the metric estimate both transform as a metric under θ_j -> θ_j / s_j,
  the displacement cap, the momentum and its restart test are covariant,
  and both runs draw the same basis and probes: the gap is roundoff. With
  the 'safe' damping (column norms, which scale like s rather than s²,
  decide the direction off the M-dimensional estimate) it is 1.04, about as
  close as Adam.
  """
  k_x, k_y, k_1, k_2 = jax.random.split(jax.random.key(0), 4)
  inputs = jax.random.normal(k_x, (64, 4))
  labels = jax.random.randint(k_y, (64,), 0, 3)
  params = {'w1': jax.random.normal(k_1, (4, 8)) / 2, 'b1': jnp.zeros(8),
            'w2': jax.random.normal(k_2, (8, 3)) / 3, 'b2': jnp.zeros(3)}
  scales = jnp.logspace(-2, 1, 3)
  ones = jnp.ones(3)
  scaled = {**params, 'w2': params['w2'] / scales[None, :], 'b2': params['b2'] / scales}

  def run(opt, params, scales):
    outputs_fn = lambda p: mlp(p, inputs, scales)  # noqa: E731
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        outputs_fn(p), labels).mean()
    return train(opt, params, loss_fn, outputs_fn, 50)[2]

  def distance(make_opt):
    a, b = run(make_opt(), params, ones), run(make_opt(), scaled, scales)
    moved = jnp.sqrt(jnp.mean(jnp.square(a[-1] - a[0])))
    return float(jnp.max(jnp.sqrt(jnp.mean(jnp.square(a - b), axis=(1, 2)))) / moved)

  kwng = distance(lambda: kwng_jax.kwng(epsilon=epsilon))
  safe = distance(lambda: kwng_jax.kwng(epsilon=epsilon, damping='safe'))
  sgd = distance(lambda: optax.sgd(0.3))
  adam = distance(lambda: optax.adam(0.03))
  print(f'relative trajectory distance: KWNG {kwng:.3g}, damping safe {safe:.3g}, '
        f'SGD {sgd:.3g}, Adam {adam:.3g}')
  assert kwng < 1e-3, (kwng, safe, sgd, adam)
  assert safe > 0.3, (kwng, safe, sgd, adam)
  assert safe < 0.1 * sgd, (kwng, safe, sgd, adam)


def test_default_learning_rate_and_published_name():
  assert kwng_jax.kwng().init(jnp.zeros(3)) is not None
  with pytest.raises(TypeError):
    kwng_jax.kwng(max_norm=1.0)  # a published_kwng option
  assert kwng_jax.published_kwng(0.1, max_norm=1.0).init(jnp.zeros(3)) is not None
