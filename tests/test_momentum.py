"""The restarted heavy-ball momentum of kwng(): its recurrence, restarts and safety."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kwng_jax
from kwng_jax._src import momentum as momentum_lib


def run(opt, gradients):
  """Feeds the gradients in turn; returns the updates and the last state."""
  params = jnp.zeros(2)
  state = opt.init(params)
  update = jax.jit(lambda g, s: opt.update(g, s, params))
  updates = []
  for g in gradients:
    u, state = update(jnp.asarray(g, jnp.float32), state)
    updates.append(np.asarray(u))
  return np.array(updates), state


@pytest.mark.parametrize('nesterov', [False, True])
def test_recurrence_averages_the_inner_steps(nesterov):
  inner = optax.with_extra_args_support(optax.scale(0.5))
  opt = momentum_lib.restarted_momentum(inner, 0.9, nesterov=nesterov)
  gradients = [[1.0, 0.0], [1.0, 1.0], [0.5, 2.0]]
  updates, state = run(opt, gradients)
  momentum = np.zeros(2)
  for g, u in zip(gradients, updates):
    step = 0.5 * np.asarray(g)
    momentum = 0.1 * step + 0.9 * momentum
    np.testing.assert_allclose(u, 0.1 * step + 0.9 * momentum if nesterov else momentum,
                               rtol=1e-6)
  assert int(state.momentum_restarts) == 0


def test_a_clear_reversal_restarts_and_mild_noise_does_not():
  """Restart iff ⟨g, m⟩ < -0.3 ⟨g, s⟩: the average goes uphill, clearly."""
  inner = optax.with_extra_args_support(optax.identity())
  opt = momentum_lib.restarted_momentum(inner, 0.9)
  # m = (0.1, 0). g = (-1, 0.5): ⟨g, m⟩ = -0.1 > -0.3 ⟨g, g⟩ = -0.375, kept.
  updates, state = run(opt, [[1.0, 0.0], [-1.0, 0.5]])
  np.testing.assert_allclose(updates[1], [-0.1 + 0.09, 0.05], rtol=1e-5)
  assert int(state.momentum_restarts) == 0
  # m = (1, 0). g = (-1, 0.5): ⟨g, m⟩ = -1 < -0.375, dropped: the update is 0.1 g.
  updates, state = run(opt, [[10.0, 0.0], [-1.0, 0.5]])
  np.testing.assert_allclose(updates[1], [-0.1, 0.05], rtol=1e-5)
  assert int(state.momentum_restarts) == 1


def test_unusable_inputs_give_a_zero_update_and_keep_the_momentum():
  """A NaN gradient or Inf samples must not let old velocity carry the parameters."""
  x = jax.random.normal(jax.random.key(0), (32, 3))
  outputs_fn = lambda p: x @ p  # noqa: E731
  loss_fn = lambda p: jnp.mean((outputs_fn(p) - 1.0) ** 2)  # noqa: E731
  opt = kwng_jax.kwng()
  params = jnp.zeros((3, 2))
  state = opt.init(params)
  step = jax.jit(lambda g, s, v: opt.update(g, s, params, outputs_fn=outputs_fn, value=v))
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, state = step(grads, state, loss)
  assert float(jnp.abs(updates).max()) > 0
  before = optax.tree_utils.tree_get(state, 'momentum')
  for bad_grads, bad_outputs_fn in ((grads * jnp.nan, outputs_fn),
                                    (grads, lambda p: outputs_fn(p) / 0.0)):
    updates, bad_state = opt.update(bad_grads, state, params, outputs_fn=bad_outputs_fn,
                                    value=loss)
    np.testing.assert_array_equal(updates, 0.0)
    np.testing.assert_array_equal(optax.tree_utils.tree_get(bad_state, 'momentum'), before)
    assert not bool(optax.tree_utils.tree_get(bad_state, 'kwng_info').finite_inputs)


def test_a_non_finite_gradient_stops_any_inner_transformation():
  """Without KWNG's diagnostics, the gradient's own finiteness decides."""
  opt = momentum_lib.restarted_momentum(optax.with_extra_args_support(optax.identity()), 0.9)
  updates, state = run(opt, [[1.0, 2.0], [jnp.nan, 0.0]])
  np.testing.assert_array_equal(updates[1], 0.0)
  np.testing.assert_allclose(state.momentum, [0.1, 0.2], rtol=1e-6)


def least_squares_steps_to_optimum(monkeypatch, restart_ratio):
  """Steps kwng() takes to 1.01 × the optimum of its docstring's least squares."""
  monkeypatch.setattr(momentum_lib, 'RESTART_RATIO', restart_ratio)
  x = jax.random.normal(jax.random.key(0), (32, 3))
  outputs_fn = lambda p: x @ p  # noqa: E731
  loss_fn = lambda p: jnp.mean((outputs_fn(p) - 1.0) ** 2)  # noqa: E731
  best = float(loss_fn(jnp.linalg.lstsq(x, jnp.ones((32, 2)))[0]))
  opt = kwng_jax.kwng()
  params, state = jnp.zeros((3, 2)), opt.init(jnp.zeros((3, 2)))

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
    return params + updates, state

  for t in range(400):
    params, state = step(params, state)
    if float(loss_fn(params)) < 1.01 * best:
      return t + 1, state
  return None, state


def test_restarts_stop_a_deterministic_problem_from_overshooting(monkeypatch):
  """Measured: 152 steps with restarts (c = 0.3), 97 with c = 0.1, 309 without."""
  with_restarts, state = least_squares_steps_to_optimum(monkeypatch, 0.3)
  assert with_restarts is not None and with_restarts <= 200, with_restarts
  assert int(optax.tree_utils.tree_get(state, 'momentum_restarts')) > 0
  without, _ = least_squares_steps_to_optimum(monkeypatch, float('inf'))
  assert without is None or without > 1.5 * with_restarts, (with_restarts, without)


@pytest.mark.parametrize('momentum', [1.0, -0.1, float('nan'), '0.9', jnp.ones(2)])
def test_bad_momentum_is_named(momentum):
  with pytest.raises(ValueError, match='momentum'):
    kwng_jax.kwng(momentum=momentum)


def test_no_momentum_is_the_single_step_rule():
  """momentum=None: the update is -lr times the capped direction, with no momentum state."""
  x = jax.random.normal(jax.random.key(0), (32, 3))
  outputs_fn = lambda p: x @ p  # noqa: E731
  params = jnp.zeros((3, 2))
  grads = jax.grad(lambda p: jnp.mean((outputs_fn(p) - 1.0) ** 2))(params)
  single = kwng_jax.kwng(0.3, momentum=None, adaptive=False)
  capped = optax.chain(kwng_jax.scale_by_kwng(damping='metric_diagonal'),
                       kwng_jax.scale_by_displacement(1.0, mode='cap'))
  expected, _ = capped.update(grads, capped.init(params), params, outputs_fn=outputs_fn)
  updates, state = single.update(grads, single.init(params), params, outputs_fn=outputs_fn)
  np.testing.assert_allclose(updates, -0.3 * expected, rtol=1e-6)
  assert optax.tree_utils.tree_get(state, 'momentum') is None


@pytest.mark.parametrize('nesterov', [False, True])
def test_a_donated_step_stores_the_momentum_in_place(nesterov):
  """A jitted step with its state donated compiles without a copy of the
  momentum: nothing reads m_{t-1} after the new momentum is stored over it."""
  x = jax.random.normal(jax.random.key(0), (32, 24))
  outputs_fn = lambda p: jnp.tanh(x @ p['w1']) @ p['w2']  # noqa: E731
  params = {'w1': 0.1 * jnp.ones((24, 48)), 'w2': 0.1 * jnp.ones((48, 4))}
  opt = kwng_jax.kwng(nesterov=nesterov)

  def step(params, state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(outputs_fn(p) ** 2))(params)
    updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
    return optax.apply_updates(params, updates), state

  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt.init(params)).compile().as_text()
  copies = [line for line in hlo.splitlines()
            if ' copy(' in line and 'momentum__' in line]
  assert 'momentum__' in hlo
  assert not copies, copies


@pytest.mark.parametrize('case', ['kwng', 'fallback', 'large fallback', 'unusable'])
def test_the_step_product_read_from_the_state_equals_the_sum_over_the_step(mlp_problem, case):
  """<g, s> of the capped KWNG step from KWNG's alignment and the cap's
  factor: for ĝ, for a step that fell back to g (ĝ not finite), also with
  |g|^2 near 1e30, and 0 for a step zeroed because g is not finite."""
  params, outputs_fn, loss_fn = mlp_problem
  inner = optax.chain(kwng_jax.scale_by_kwng(num_basis=5),
                      kwng_jax.scale_by_displacement(1e-3))
  grads = jax.grad(loss_fn)(params)
  if case == 'large fallback':
    grads = jax.tree.map(lambda g: 1e15 * g, grads)
  extra_args = {}
  if case.endswith('fallback'):
    preconditioner = kwng_jax.build_preconditioner(
        outputs_fn, params, key=jax.random.key(0), num_basis=5, damping='metric_diagonal')
    damping = {**preconditioner.damping, 'w1': preconditioner.damping['w1'].at[0, 0].set(jnp.inf)}
    extra_args = {'preconditioner': preconditioner._replace(damping=damping)}
  if case == 'unusable':
    grads = {**grads, 'b1': grads['b1'].at[0].set(jnp.nan)}
  steps, state = inner.update(grads, inner.init(params), params, outputs_fn=outputs_fn,
                              **extra_args)
  info = state[0].kwng_info
  assert bool(info.finite_inputs) == (case != 'unusable')
  assert bool(info.fallback) == (case != 'kwng')
  product = momentum_lib.capped_kwng_step_product(state)
  if case == 'unusable':
    assert float(product) == 0.0
    return
  assert float(state[1].displacement_scale) < 1  # the cap binds
  want = sum(float(np.vdot(np.float64(g), np.float64(s)))
             for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(steps)))
  assert want > 0
  np.testing.assert_allclose(float(product), want, rtol=1e-5)


@pytest.mark.parametrize('nesterov', [False, True])
def test_the_state_records_the_product_of_the_gradient_and_the_update(nesterov):
  """<g_t, u_t> from the restart test's two products, through a restart
  and through a step zeroed for a NaN gradient."""
  inner = optax.with_extra_args_support(optax.scale(0.5))
  opt = momentum_lib.restarted_momentum(inner, 0.9, nesterov=nesterov)
  params = jnp.zeros(2)
  state = opt.init(params)
  update = jax.jit(lambda g, s: opt.update(g, s, params))
  restarts = 0
  # The third gradient turns against the momentum: a restart.
  for g in [[1.0, 0.0], [1.0, 1.0], [-0.1, 0.0], [0.5, 2.0]]:
    g = jnp.asarray(g, jnp.float32)
    u, state = update(g, state)
    np.testing.assert_allclose(float(state.momentum_gradient_product), float(jnp.vdot(g, u)),
                               rtol=1e-6)
    restarts = int(state.momentum_restarts)
  assert restarts == 1


@pytest.mark.parametrize('momentum, nesterov, learning_rate', [
    (0.9, False, 0.5), (0.9, True, 0.5), (None, False, 0.5),
    (0.9, False, optax.linear_schedule(0.5, 0.1, 4))])
def test_kwng_predicts_the_decrease_of_its_update_from_the_state(momentum, nesterov,
                                                                 learning_rate):
  """adaptive_damping's -<g, u>, read from the chain's state, is the sum
  over the update, with or without momentum, at a scheduled learning rate."""
  x = jax.random.normal(jax.random.key(0), (32, 3))
  outputs_fn = lambda p: jnp.tanh(x @ p)  # noqa: E731
  loss_fn = lambda p: jnp.mean((outputs_fn(p) - 0.5) ** 2)  # noqa: E731
  opt = kwng_jax.kwng(learning_rate, momentum=momentum, nesterov=nesterov)
  params = 0.1 * jnp.ones((3, 2))
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)

  for _ in range(3):
    grads = jax.grad(loss_fn)(params)
    updates, state = step(params, state)
    np.testing.assert_allclose(float(state.damping_predicted_decrease),
                               -float(jnp.vdot(grads, updates)), rtol=1e-5)
    params = params + updates
