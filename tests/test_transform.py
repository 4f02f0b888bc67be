"""scale_by_kwng and kwng as Optax transformations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kwng_jax

from conftest import mlp_apply


def run_steps(opt, params, outputs_fn, loss_fn, num_steps, jit=True):
  state = opt.init(params)

  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
    return optax.apply_updates(params, updates), state, loss

  if jit:
    step = jax.jit(step)
  losses = []
  for _ in range(num_steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, state, losses


def test_update_equals_natural_gradient_with_the_derived_key(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  opt = kwng_jax.scale_by_kwng(num_basis=5, damping='squared', seed=3)
  state = opt.init(params)
  updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn)
  updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn)
  key = jax.random.fold_in(jax.random.key(3), 1)
  expected, info = kwng_jax.natural_gradient(
      grads, outputs_fn, params, key=key, num_basis=5, damping='squared')
  assert not bool(info.fallback)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, expected)
  assert int(state.kwng_count) == 2
  np.testing.assert_allclose(state.kwng_info.alignment, info.alignment, rtol=1e-6)


@pytest.mark.parametrize('update_every, builds', [(1, 3), (2, 2)])
def test_metric_diagonal_state_averages_the_probes_of_each_build(mlp_problem, update_every,
                                                                  builds):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.scale_by_kwng(num_basis=5, damping='metric_diagonal', update_every=update_every)
  _, state, _ = run_steps(opt, params, outputs_fn, loss_fn, 3)
  average = state.kwng_metric_diagonal
  # One estimate per build (steps 0, 1, 2 or steps 0, 2), decay 0.9.
  np.testing.assert_allclose(average.weight, 1 - kwng_jax.probes.DIAGONAL_DECAY ** builds,
                             rtol=1e-6)
  assert jax.tree.structure(average.total) == jax.tree.structure(params)
  assert all(bool(jnp.all(t > 0)) for t in jax.tree.leaves(average.total))
  assert kwng_jax.scale_by_kwng(num_basis=5).init(params).kwng_metric_diagonal is None


def test_metric_diagonal_damping_uses_the_state_average(mlp_problem):
  """Scaling the stored average of one array changes its step; an outside preconditioner keeps it."""
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.scale_by_kwng(num_basis=5, damping='metric_diagonal')
  _, state, _ = run_steps(opt, params, outputs_fn, loss_fn, 2)
  grads = jax.grad(loss_fn)(params)
  update = jax.jit(functools.partial(opt.update, outputs_fn=outputs_fn))
  direction, _ = update(grads, state, params)
  total = state.kwng_metric_diagonal.total
  scaled = state._replace(kwng_metric_diagonal=state.kwng_metric_diagonal._replace(
      total={**total, 'w1': total['w1'] * 1e4}))
  changed, new_state = update(grads, scaled, params)
  assert not np.allclose(changed['w1'], direction['w1'], rtol=1e-2)
  # A preconditioner built without the state leaves the average as it was.
  preconditioner = kwng_jax.build_preconditioner(
      outputs_fn, params, key=jax.random.key(0), num_basis=5, damping='metric_diagonal')
  _, kept = opt.update(grads, state, params, outputs_fn=outputs_fn, preconditioner=preconditioner)
  np.testing.assert_array_equal(kept.kwng_metric_diagonal.weight, state.kwng_metric_diagonal.weight)
  assert float(new_state.kwng_metric_diagonal.weight) > float(state.kwng_metric_diagonal.weight)


def test_the_damping_is_that_of_the_debiased_average(mlp_problem):
  """The D a step builds is metric_diagonal_damping of total / weight (after
  one step the weight is 0.1, so the total alone gives a D ten times smaller)."""
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.scale_by_kwng(num_basis=5, damping='metric_diagonal', update_every=2)
  _, state, _ = run_steps(opt, params, outputs_fn, loss_fn, 1)
  stored, average = state.kwng_preconditioner, state.kwng_metric_diagonal
  np.testing.assert_allclose(average.weight, 0.1, rtol=1e-6)
  want, _ = kwng_jax.probes.metric_diagonal_damping(
      jax.tree.map(lambda t: t / average.weight, average.total),
      kwng_jax.solve.column_squared_norms(stored.whitened_rows))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), stored.damping, want)


@pytest.mark.parametrize('damping', ['reference', 'safe'])
def test_step_with_products_from_the_gram_equals_the_two_pass_solve(mlp_problem, damping):
  """A step that builds its own preconditioner gets T̃ D g from the Gram's
  pass; given the same preconditioner built without g, the solve computes
  T̃ D g itself: the same update."""
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.scale_by_kwng(num_basis=5, damping=damping, seed=3)
  state = opt.init(params)
  grads = jax.grad(loss_fn)(params)
  fused, _ = jax.jit(functools.partial(opt.update, outputs_fn=outputs_fn))(grads, state, params)
  preconditioner = kwng_jax.build_preconditioner(
      outputs_fn, params, key=jax.random.fold_in(jax.random.key(3), 0), num_basis=5,
      damping=damping)
  assert preconditioner.gradient_products is None
  two_pass, _ = opt.update(grads, state, params, outputs_fn=outputs_fn,
                           preconditioner=preconditioner)
  for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(two_pass)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_every_build_of_a_step_hands_the_solve_its_gradient_products(mlp_problem, solved_products):
  """Each way a step gets its forward pass (outputs_fn alone, its first rows,
  samples_and_vjp alone or with jacobian_outputs_fn) builds with g, and the
  solve receives T̃ D g for that g; kwng()'s default damping included."""
  params, outputs_fn, loss_fn = mlp_problem
  inputs = jax.random.normal(jax.random.key(1), (64, 3))
  batch_fn = kwng_jax.batch_outputs_fn(mlp_apply, inputs)
  grads = jax.grad(loss_fn)(params)
  forward_passes = [
      dict(outputs_fn=outputs_fn),
      dict(outputs_fn=batch_fn),
      dict(samples_and_vjp=jax.vjp(outputs_fn, params)),
      dict(samples_and_vjp=jax.vjp(batch_fn, params), outputs_fn=batch_fn,
           jacobian_outputs_fn=batch_fn.first_rows(16)),
  ]
  for opt in (kwng_jax.scale_by_kwng(num_basis=5), kwng_jax.kwng()):
    for forward_pass in forward_passes:
      solved_products.clear()
      opt.update(grads, opt.init(params), params, value=loss_fn(params), **forward_pass)
      (products, want, _), = solved_products
      assert products is not None, forward_pass
      np.testing.assert_allclose(products, want, rtol=1e-4, atol=1e-6)


def test_jit_equals_eager_and_does_not_recompile(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.kwng(learning_rate=0.1)
  traces = []

  def step(params, state):
    traces.append(1)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step)
  eager_params, eager_state = params, opt.init(params)
  jit_params, jit_state = params, opt.init(params)
  for _ in range(3):
    with jax.disable_jit():
      eager_params, eager_state = step(eager_params, eager_state)
    jit_params, jit_state = jitted(jit_params, jit_state)
  eager_traces = 3
  assert len(traces) == eager_traces + 1, 'the jitted step was traced more than once'
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jit_params, eager_params)


def test_fallback_to_gradient_when_not_a_descent_direction(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  info = kwng_jax.KWNGInfo.empty()._replace(fallback=jnp.array(True))
  direction = jax.tree.map(lambda g: -g, grads)
  safe = kwng_jax._src.transform.safe_direction(grads, direction, info)
  jax.tree.map(np.testing.assert_array_equal, safe, grads)
  info = info._replace(fallback=jnp.array(False))
  safe = kwng_jax._src.transform.safe_direction(grads, direction, info)
  jax.tree.map(np.testing.assert_array_equal, safe, direction)


@pytest.mark.parametrize('tail', [
    optax.clip_by_global_norm(1.0),
    optax.sgd(0.05, momentum=0.9),
    optax.adam(1e-2),
    optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                optax.scale_by_schedule(optax.cosine_decay_schedule(1e-2, 10)),
                optax.scale(-1.0)),
], ids=['clip', 'momentum', 'adam', 'clip-adam-schedule'])
@pytest.mark.usefixtures('standard_promotion')  # optax's bias correction mixes int and float.
def test_chains_with_optax_transformations(mlp_problem, tail):
  params, outputs_fn, loss_fn = mlp_problem
  opt = optax.chain(kwng_jax.scale_by_kwng(), tail)
  new_params, state, losses = run_steps(opt, params, outputs_fn, loss_fn, 3)
  assert all(np.isfinite(losses))
  assert int(optax.tree_utils.tree_get(state, 'kwng_count')) == 3
  assert not np.allclose(new_params['w1'], params['w1'])


def test_kwng_with_a_schedule_decreases_the_loss(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.kwng(optax.exponential_decay(0.1, 5, 0.9), num_basis=8)
  _, _, losses = run_steps(opt, params, outputs_fn, loss_fn, 15)
  assert losses[-1] < losses[0]


def test_inject_hyperparams_with_static_num_basis(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = optax.inject_hyperparams(kwng_jax.kwng, static_args=('num_basis',))(
      learning_rate=0.1, num_basis=4)
  _, state, losses = run_steps(opt, params, outputs_fn, loss_fn, 2)
  assert all(np.isfinite(losses))
  assert float(state.hyperparams['learning_rate']) == pytest.approx(0.1)
  state.hyperparams['learning_rate'] = jnp.asarray(0.0)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, _ = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


def test_inject_hyperparams_with_update_every(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = optax.inject_hyperparams(
      kwng_jax.kwng, static_args=('num_basis', 'update_every'))(
          learning_rate=0.1, num_basis=4, update_every=2)
  _, state, losses = run_steps(opt, params, outputs_fn, loss_fn, 3)
  assert all(np.isfinite(losses))
  stored = optax.tree_utils.tree_get(state, 'kwng_preconditioner')
  assert [row['w1'].shape for row in stored.whitened_rows] == [params['w1'].shape] * 4
  # Not static: inject_hyperparams turns it into an array, and the error says
  # what to do.
  with pytest.raises(ValueError, match=r"static_args=\('num_basis', 'update_every'\)"):
    optax.inject_hyperparams(kwng_jax.kwng, static_args=('num_basis',))(
        learning_rate=0.1, num_basis=4, update_every=2).init(params)


@pytest.mark.usefixtures('standard_promotion')  # optax's accumulator mixes int and float.
def test_multi_steps_accumulates_before_kwng(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = optax.MultiSteps(kwng_jax.kwng(0.1), every_k_schedule=2)
  state = opt.init(params)
  grads = jax.grad(loss_fn)(params)
  loss = loss_fn(params)
  updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
  updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
  assert any(float(jnp.abs(u).max()) > 0.0 for u in jax.tree.leaves(updates))
  assert int(optax.tree_utils.tree_get(state, 'kwng_count')) == 1


def test_apply_if_finite_skips_nan_steps(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = optax.apply_if_finite(kwng_jax.kwng(0.1), max_consecutive_errors=3)
  state = opt.init(params)
  grads = jax.grad(loss_fn)(params)
  bad = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads)
  updates, state = opt.update(bad, state, params, outputs_fn=outputs_fn, value=loss_fn(params))
  assert int(state.notfinite_count) == 1
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss_fn(params))
  assert int(state.notfinite_count) == 0


def test_nonfinite_gradient_or_samples_never_give_nan_updates(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.kwng(0.1)
  state = opt.init(params)
  grads = jax.grad(loss_fn)(params)
  bad_grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.inf), grads)
  bad_outputs = lambda p: outputs_fn(p).at[0, 0].set(jnp.nan)
  for g, fn in [(bad_grads, outputs_fn), (grads, bad_outputs)]:
    updates, new_state = opt.update(g, state, params, outputs_fn=fn, value=loss_fn(params))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    info = optax.tree_utils.tree_get(new_state, 'kwng_info')
    assert not bool(info.finite_inputs)


def test_identical_samples_give_finite_updates():
  params = {'bias': jnp.array([0.5, -1.0, 2.0])}
  outputs_fn = lambda p: jnp.zeros((16, 3)) + p['bias'][None, :]
  loss_fn = lambda p: jnp.sum(jnp.square(outputs_fn(p)))
  new_params, _, losses = run_steps(kwng_jax.kwng(0.1), params, outputs_fn, loss_fn, 3)
  assert bool(jnp.all(jnp.isfinite(new_params['bias'])))
  assert losses[-1] < losses[0]


def test_bfloat16_params_get_bfloat16_updates(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  opt = kwng_jax.kwng(0.1)
  state = opt.init(params16)
  loss, grads = jax.value_and_grad(loss_fn)(params16)
  updates, state = jax.jit(functools.partial(opt.update, outputs_fn=outputs_fn))(
      grads, state, params16, value=loss)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert optax.tree_utils.tree_get(state, 'kwng_epsilon').dtype == jnp.float32


def test_state_initialises_from_shape_dtype_structs(mlp_problem):
  params, _, _ = mlp_problem
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  for opt in (kwng_jax.scale_by_kwng(), kwng_jax.kwng(0.1)):
    abstract_state = opt.init(abstract)
    concrete_state = opt.init(params)
    assert jax.tree.structure(abstract_state) == jax.tree.structure(concrete_state)
    shapes = jax.eval_shape(opt.init, abstract)
    assert jax.tree.structure(shapes) == jax.tree.structure(concrete_state)


def test_missing_outputs_fn_is_named(mlp_problem):
  params, _, loss_fn = mlp_problem
  opt = kwng_jax.scale_by_kwng()
  grads = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError, match='outputs_fn'):
    opt.update(grads, opt.init(params), params)


def test_unknown_extra_arguments_are_ignored(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.scale_by_kwng()
  grads = jax.grad(loss_fn)(params)
  updates, _ = opt.update(grads, opt.init(params), params, outputs_fn=outputs_fn,
                          value=1.0, batch_stats=None, anything='else')
  assert jax.tree.structure(updates) == jax.tree.structure(grads)


def test_bad_construction_arguments_fail_early():
  with pytest.raises(ValueError, match="'reference', 'squared', 'identity'"):
    kwng_jax.scale_by_kwng(damping='diagonal')
  with pytest.raises(ValueError, match='gaussian'):
    kwng_jax.kwng(0.1, kernel='rbf')
  with pytest.raises(ValueError, match='epsilon'):
    kwng_jax.scale_by_kwng(epsilon=0.0)


def test_too_many_basis_points_fail_at_trace_time(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.scale_by_kwng(num_basis=64)
  grads = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError, match=r'num_basis=64.*N=32'):
    jax.jit(functools.partial(opt.update, outputs_fn=outputs_fn))(grads, opt.init(params), params)


def test_samples_independent_of_the_params_give_the_damped_gradient_at_every_step():
  """No parameter seen: D = 1 and the step is g / (1 + eps), from the
  first step on (when the running average's weight is 0.1)."""
  params = {'w': jnp.ones((3, 2))}
  outputs_fn = lambda p: jnp.ones((16, 2))  # noqa: E731
  opt = kwng_jax.scale_by_kwng(num_basis=3, epsilon=1.0, damping='metric_diagonal')
  state = opt.init(params)
  grads = {'w': jnp.arange(6.0).reshape(3, 2)}
  update = jax.jit(functools.partial(opt.update, outputs_fn=outputs_fn))
  with pytest.warns(RuntimeWarning, match='do not depend on params'):
    for _ in range(2):
      direction, state = update(grads, state, params)
      np.testing.assert_allclose(direction['w'], grads['w'] / 2.0, rtol=1e-6)
