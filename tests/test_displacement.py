"""The sample displacement Δ and the scale_by_displacement transformation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kwng_jax

from conftest import mlp_apply
from conftest import mlp_params


def problem(dtype=jnp.float32):
  k_params, k_inputs, k_update = jax.random.split(jax.random.key(0), 3)
  params = mlp_params(k_params, dtype=dtype)
  inputs = jax.random.normal(k_inputs, (64, 3), dtype)
  updates = jax.tree.map(
      lambda p, k: jax.random.normal(k, p.shape, dtype),
      params, dict(zip(params, jax.random.split(k_update, len(params)))))
  return params, (lambda p: mlp_apply(p, inputs.astype(p['w1'].dtype))), updates


@pytest.mark.usefixtures('enable_x64')
def test_displacement_equals_finite_difference_of_the_samples():
  params, outputs_fn, updates = problem(jnp.float64)
  h = 1e-6
  shifted = lambda sign: outputs_fn(jax.tree.map(lambda p, u: p + sign * h * u, params, updates))  # noqa: E731
  moved = (shifted(1.0) - shifted(-1.0)) / (2 * h)
  expected = np.sqrt(np.mean(np.sum(np.square(np.asarray(moved)), axis=1)))
  displacement = kwng_jax.sample_displacement(outputs_fn, params, updates)
  np.testing.assert_allclose(displacement, expected, rtol=1e-7)


@pytest.mark.parametrize('scale', [1e-3, 1.0, 1e3])
def test_cap_and_normalize(scale):
  params, outputs_fn, updates = problem()
  updates = jax.tree.map(lambda u: scale * u, updates)
  before = float(kwng_jax.sample_displacement(outputs_fn, params, updates))
  for mode, expected in (('cap', min(before, 0.5)), ('normalize', 0.5)):
    opt = kwng_jax.scale_by_displacement(0.5, mode=mode)
    scaled, state = opt.update(updates, opt.init(params), params, outputs_fn=outputs_fn)
    after = float(kwng_jax.sample_displacement(outputs_fn, params, scaled))
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    np.testing.assert_allclose(state.displacement, before, rtol=1e-6)
    np.testing.assert_allclose(state.displacement_scale, after / before, rtol=1e-5)


def test_chained_learning_rate_scales_the_displacement():
  params, outputs_fn, updates = problem()
  opt = optax.chain(kwng_jax.scale_by_displacement(mode='normalize'),
                    optax.scale_by_learning_rate(optax.linear_schedule(0.2, 0.1, 1)))
  state = opt.init(params)
  for expected in (0.2, 0.1):
    scaled, state = opt.update(updates, state, params, outputs_fn=outputs_fn)
    np.testing.assert_allclose(kwng_jax.sample_displacement(outputs_fn, params, scaled),
                               expected, rtol=1e-5)


@pytest.mark.parametrize('mode', ['cap', 'normalize'])
def test_update_that_does_not_move_the_samples_passes_unchanged(mode):
  params = {'w': jnp.ones(3), 'unused': jnp.ones(2)}
  inputs = jnp.ones((8, 3))
  outputs_fn = lambda p: inputs @ p['w']  # noqa: E731
  updates = {'w': jnp.zeros(3), 'unused': jnp.array([1e30, -2.0])}
  opt = kwng_jax.scale_by_displacement(1.0, mode=mode)
  scaled, state = jax.jit(lambda u: opt.update(u, opt.init(params), params,
                                               outputs_fn=outputs_fn))(updates)
  assert float(state.displacement) == 0.0 and float(state.displacement_scale) == 1.0
  np.testing.assert_array_equal(scaled['unused'], updates['unused'])


def test_half_precision_samples_do_not_overflow():
  params, outputs_fn, updates = problem()
  big = lambda p: 1e3 * outputs_fn(p)  # noqa: E731
  reference = float(kwng_jax.sample_displacement(big, params, updates))
  half = jax.tree.map(lambda x: x.astype(jnp.float16), (params, updates))
  displacement = kwng_jax.sample_displacement(
      lambda p: jnp.asarray(1e3, jnp.float16) * outputs_fn(p), *half)
  assert displacement.dtype == jnp.float32
  # Δ² ~ 1e8 would overflow float16 (max 65504); Δ itself does not.
  assert reference > 300
  np.testing.assert_allclose(displacement, reference, rtol=2e-2)
  opt = kwng_jax.scale_by_displacement(1.0)
  scaled, _ = opt.update(half[1], opt.init(half[0]), half[0],
                         outputs_fn=lambda p: jnp.asarray(1e3, jnp.float16) * outputs_fn(p))
  assert all(x.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(x)))
             and bool(jnp.any(x != 0)) for x in jax.tree.leaves(scaled))


def test_half_precision_large_updates_do_not_overflow_the_jvp():
  """A float16 update of 6e4 moves the samples by J u ~ 1e5, past float16's
  65504: the tangent is scaled down before the JVP and the factor put back."""
  params, outputs_fn, updates = problem()
  big_updates = jax.tree.map(lambda u: 6e4 * u / jnp.max(jnp.abs(u)), updates)
  reference = float(kwng_jax.sample_displacement(outputs_fn, params, big_updates))
  half = jax.tree.map(lambda x: x.astype(jnp.float16), (params, big_updates))
  displacement = float(kwng_jax.sample_displacement(outputs_fn, *half))
  assert reference > 65504
  np.testing.assert_allclose(displacement, reference, rtol=2e-2)


@pytest.mark.parametrize('dtype, passes_over_u', [(jnp.float32, 0), (jnp.bfloat16, 0),
                                                   (jnp.float16, 1)])
def test_only_a_narrow_dtype_scales_the_tangent_first(dtype, passes_over_u):
  """In float32's range J u cannot overflow before Δ does: no max over u
  precedes the JVP. float16 params get the tangent over its largest entry."""
  # Widths that no other array of the computation has (entry_scale stacks
  # one maximum per leaf: 4 of them).
  params = mlp_params(jax.random.key(0), dims=(3, 6, 5), dtype=dtype)
  inputs = jax.random.normal(jax.random.key(1), (64, 3), dtype)
  outputs_fn = lambda p: mlp_apply(p, inputs.astype(p['w1'].dtype))  # noqa: E731
  updates = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=dtype)).reshape(p.shape),
                         params)
  shapes = {tuple(p.shape) for p in jax.tree.leaves(params)}

  def max_reductions_over_u(jaxpr):
    count = 0
    for eqn in jaxpr.eqns:
      count += (eqn.primitive.name == 'reduce_max'
                and tuple(eqn.invars[0].aval.shape) in shapes)
      for value in eqn.params.values():
        sub = getattr(value, 'jaxpr', value)
        if hasattr(sub, 'eqns'):
          count += max_reductions_over_u(sub)
    return count

  jaxpr = jax.make_jaxpr(
      lambda p, u: kwng_jax.sample_displacement(outputs_fn, p, u))(params, updates).jaxpr
  assert max_reductions_over_u(jaxpr) == passes_over_u * len(params)
  reference = kwng_jax.sample_displacement(
      outputs_fn, *jax.tree.map(lambda x: x.astype(jnp.float32), (params, updates)))
  np.testing.assert_allclose(
      float(kwng_jax.sample_displacement(outputs_fn, params, updates)), float(reference),
      rtol=2e-2)


def test_vmap_over_problems_equals_a_loop():
  params, outputs_fn, updates = problem()
  stacked = jax.tree.map(lambda u: jnp.stack([u, 10 * u, 0.01 * u]), updates)
  opt = kwng_jax.scale_by_displacement(1.0)
  state = opt.init(params)
  batched, states = jax.vmap(
      lambda u: opt.update(u, state, params, outputs_fn=outputs_fn))(stacked)
  for i in range(3):
    single, single_state = opt.update(jax.tree.map(lambda u: u[i], stacked), state, params,
                                      outputs_fn=outputs_fn)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-6), batched, single)
    np.testing.assert_allclose(states.displacement[i], single_state.displacement, rtol=1e-6)


def test_sharded_batch_equals_single_device():
  params, _, updates = problem()
  inputs = jax.random.normal(jax.random.key(5), (64, 3))
  opt = kwng_jax.scale_by_displacement(0.1)

  @jax.jit
  def update(params, updates, inputs):
    return opt.update(updates, opt.init(params), params,
                      outputs_fn=lambda p: mlp_apply(p, inputs))

  expected, expected_state = update(params, updates, inputs)
  mesh = jax.make_mesh((8,), ('data',))
  with jax.set_mesh(mesh):
    sharded_inputs = jax.device_put(inputs, NamedSharding(mesh, P('data')))
    scaled, state = update(params, updates, sharded_inputs)
  np.testing.assert_allclose(state.displacement, expected_state.displacement, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), scaled, expected)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match='mode'):
    kwng_jax.scale_by_displacement(mode='clip')
  for bad in (0.0, -1.0, np.float32(-1), jnp.array(float('nan'))):
    with pytest.raises(ValueError, match='max_displacement'):
      kwng_jax.scale_by_displacement(bad)
  params, _, updates = problem()
  opt = kwng_jax.scale_by_displacement()
  with pytest.raises(ValueError, match='outputs_fn'):
    opt.update(updates, opt.init(params), params)


def test_an_update_whose_jvp_overflows_is_not_taken_unscaled():
  """u = 2e36 through saturated tanh units: the hidden tangent overflows
  float32 and 0 * inf gives a NaN Δ. The step becomes zero, not u."""
  x = 10.0 * jax.random.normal(jax.random.key(0), (16, 64))
  params = {'w1': jnp.ones((64, 8)), 'w2': jnp.ones((8, 3))}
  outputs_fn = lambda p: jnp.tanh(x @ p['w1']) @ p['w2']  # noqa: E731
  updates = jax.tree.map(lambda p: jnp.full_like(p, 2e36), params)
  assert bool(jnp.isnan(kwng_jax.sample_displacement(outputs_fn, params, updates)))
  cap = kwng_jax.scale_by_displacement(1.0)
  scaled, state = cap.update(updates, cap.init(params), params, outputs_fn=outputs_fn)
  assert float(state.displacement_scale) == 0.0
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(scaled))
