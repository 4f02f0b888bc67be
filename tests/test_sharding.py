"""KWNG under jax.jit with NamedSharding on 8 fake CPU devices.

The batch is sharded over a mesh axis 'data' (data parallelism), and the
parameters either replicated or sharded FSDP-style over the same axis. The
sharded update must equal the single-device one, for meshes in Auto mode
(the compiler picks shardings) and in Explicit mode (shardings are types; the
default of jax.make_mesh from JAX 0.10 on).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kwng_jax
from kwng_jax import factors
from kwng_jax import kernels

AXIS_TYPES = {'auto': AxisType.Auto, 'explicit': AxisType.Explicit}

#: Where each parameter lives. FSDP shards every parameter over the same
#: axis as the batch.
LAYOUTS = {
    'batch': {'w1': P(), 'b1': P(), 'w2': P()},
    'fsdp': {'w1': P(None, 'data'), 'b1': P('data'), 'w2': P('data', None)},
}


def make_problem(dtype=jnp.float32):
  k_x, k_w1, k_w2, k_t = jax.random.split(jax.random.key(0), 4)
  inputs = jax.random.normal(k_x, (128, 8), dtype)
  targets = jax.random.normal(k_t, (128, 4), dtype)
  params = {
      'w1': jax.random.normal(k_w1, (8, 16), dtype) / 8**0.5,
      'b1': jnp.zeros((16,), dtype),
      'w2': jax.random.normal(k_w2, (16, 4), dtype) / 4.0,
  }
  return params, inputs, targets


def apply(params, inputs):
  w1, b1, w2 = params['w1'], params['b1'], params['w2']
  if kwng_jax._src.sharding.explicit_axes():
    # FSDP under an explicit mesh: gather the parameters for the forward
    # pass (a no-op for replicated ones). JAX transposes this in the VJP into
    # a reduce-scatter, so gradients and T keep the parameters' sharding.
    w1, b1, w2 = (jax.sharding.reshard(w, P()) for w in (w1, b1, w2))
  return jnp.tanh(inputs @ w1 + b1[None, :]) @ w2


def train_step(opt, params, state, inputs, targets):
  outputs_fn = functools.partial(apply, inputs=inputs)
  loss_fn = lambda p: jnp.mean(jnp.square(outputs_fn(p) - targets))
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
  return updates, optax.apply_updates(params, updates), state


def run(opt, params, inputs, targets, num_steps):
  """Per-step KWNG updates of a short training run, and the final state."""
  step = jax.jit(functools.partial(train_step, opt))
  state = opt.init(params)
  updates = []
  for _ in range(num_steps):
    update, params, state = step(params, state, inputs, targets)
    updates.append(update)
  return updates, state


def shard(mesh, params, inputs, targets, layout):
  batch = NamedSharding(mesh, P('data'))
  params = jax.tree.map(
      lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), params, LAYOUTS[layout])
  return params, jax.device_put(inputs, batch), jax.device_put(targets, batch)


def relative_difference(a, b):
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)])
  a, b = flat(a), flat(b)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def same_spec(spec, expected, ndim):
  """P() and P(None,) say the same thing about a 1-D array."""
  pad = lambda s: tuple(s) + (None,) * (ndim - len(s))
  return pad(spec) == pad(expected)


def optimizer(update_every=1, damping='reference'):
  # KWNG direction, clipped, SGD: the published chain without adaptive
  # damping, so that the raw preconditioned update is compared.
  return optax.chain(
      kwng_jax.scale_by_kwng(num_basis=5, update_every=update_every, damping=damping),
      optax.clip_by_global_norm(1.0),
      optax.sgd(0.1),
  )


@functools.lru_cache
def single_device_updates(update_every, num_steps, damping='reference'):
  params, inputs, targets = make_problem()
  return run(optimizer(update_every, damping), params, inputs, targets, num_steps)[0]


@pytest.mark.parametrize('layout', ['batch', 'fsdp'])
@pytest.mark.parametrize('axis_type', ['auto', 'explicit'])
def test_sharded_update_equals_single_device_update(axis_type, layout):
  assert jax.device_count() == 8
  expected = single_device_updates(update_every=1, num_steps=2)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AXIS_TYPES[axis_type],))
  with jax.set_mesh(mesh):
    updates, state = run(optimizer(), *shard(mesh, *make_problem(), layout), num_steps=2)
  for step, (got, want) in enumerate(zip(updates, expected)):
    assert relative_difference(got, want) < 1e-5, (step, relative_difference(got, want))
  assert int(optax.tree_utils.tree_get(state, 'kwng_count')) == 2
  if axis_type == 'explicit':
    # In Explicit mode shardings are types: the update has the params' one.
    for name, leaf in updates[-1].items():
      assert same_spec(leaf.sharding.spec, LAYOUTS[layout][name], leaf.ndim), name


def test_metric_diagonal_probes_shard_like_the_kernel_cotangents():
  """The probes join T's batched VJP on an explicit FSDP mesh; same update as one device."""
  expected = single_device_updates(update_every=1, num_steps=2, damping='metric_diagonal')
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AXIS_TYPES['explicit'],))
  with jax.set_mesh(mesh):
    updates, _ = run(optimizer(damping='metric_diagonal'), *shard(mesh, *make_problem(), 'fsdp'),
                     num_steps=2)
  for step, (got, want) in enumerate(zip(updates, expected)):
    assert relative_difference(got, want) < 1e-5, (step, relative_difference(got, want))


@pytest.mark.usefixtures('enable_x64')
def test_sharded_update_equals_single_device_update_in_float64():
  """Beyond float32 roundoff: the sharded computation is the same one."""
  params, inputs, targets = make_problem(jnp.float64)
  opt = kwng_jax.scale_by_kwng(num_basis=5, epsilon=1e-3)
  expected, _ = run(opt, params, inputs, targets, num_steps=1)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    updates, _ = run(opt, *shard(mesh, params, inputs, targets, 'fsdp'), num_steps=1)
  assert relative_difference(updates[0], expected[0]) < 1e-10


def test_jacobian_factor_keeps_the_parameter_sharding():
  """T is params-shaped with a leading M axis and the rows of T̃ params-shaped,
  all sharded like the params: nothing of size M×P is gathered on one device."""
  params, inputs, _ = make_problem()
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params, inputs, _ = shard(mesh, params, inputs, inputs, 'fsdp')

    @jax.jit
    def jacobian_and_whitened(params, inputs):
      outputs_fn = functools.partial(apply, inputs=inputs)
      samples, vjp_fn = jax.vjp(outputs_fn, params)
      indices, coords = factors.select_basis(*samples.shape, 5, key=jax.random.key(0))
      basis = samples.at[indices].get(out_sharding=P())
      cross = factors.cross_derivatives(kernels.gaussian, basis, coords, samples, 1.0)
      jacobian = factors.jacobian_factor(vjp_fn, cross, samples.shape, samples.dtype)
      pre = kwng_jax.build_preconditioner(outputs_fn, params, key=jax.random.key(0))
      return jacobian, pre.whitened_rows, pre.damping

    jacobian, whitened, damping = jacobian_and_whitened(params, inputs)
  for name, spec in LAYOUTS['fsdp'].items():
    assert jacobian[name].shape == (5,) + params[name].shape
    assert jacobian[name].sharding.spec == P(None, *spec), name
    assert all(row[name].sharding.spec == spec for row in whitened), name
    assert damping[name].sharding.spec == spec, name


@pytest.mark.parametrize('axis_type', ['auto', 'explicit'])
def test_update_every_sharded_equals_single_device(axis_type):
  """Build, reuse, build again: the stored factors stay sharded like the
  params, and each update equals the single-device one."""
  expected = single_device_updates(update_every=2, num_steps=3)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AXIS_TYPES[axis_type],))
  with jax.set_mesh(mesh):
    updates, state = run(optimizer(2), *shard(mesh, *make_problem(), 'fsdp'), num_steps=3)
  for step, (got, want) in enumerate(zip(updates, expected)):
    assert relative_difference(got, want) < 1e-5, (step, relative_difference(got, want))
  stored = optax.tree_utils.tree_get(state, 'kwng_preconditioner')
  assert bool(stored.finite_samples)
  if axis_type == 'explicit':
    for name, spec in LAYOUTS['fsdp'].items():
      assert all(row[name].sharding.spec == spec for row in stored.whitened_rows), name


def test_published_chain_runs_fsdp_on_an_explicit_mesh_with_donated_state():
  """kwng_jax.kwng (adaptive damping included) on FSDP-sharded params: the
  damping's inner product accepts sharded leaves, the update equals the
  single-device one, and the whole state can be donated to jit (no buffer is
  shared between two of its leaves)."""
  opt = kwng_jax.kwng(learning_rate=0.1, num_basis=5, update_every=2)
  expected, _ = run(opt, *make_problem(), num_steps=3)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params, inputs, targets = shard(mesh, *make_problem(), 'fsdp')
    step = jax.jit(functools.partial(train_step, opt), donate_argnums=(0, 1))
    state = opt.init(params)
    updates = []
    for _ in range(3):
      update, params, state = step(params, state, inputs, targets)
      updates.append(update)
  for step_index, (got, want) in enumerate(zip(updates, expected)):
    assert relative_difference(got, want) < 1e-5, step_index
  assert int(optax.tree_utils.tree_get(state, 'damping_count')) == 3


@pytest.mark.parametrize('layout', ['batch', 'fsdp'])
def test_kwng_with_t_from_the_first_rows_sharded_equals_single_device(layout):
  """kwng()'s default with a batch_outputs_fn (T from 32 of the 128 samples,
  the first rows of a batch split over 8 devices) equals the single-device
  update, on an explicit mesh."""

  def first_rows_step(opt, params, state, inputs, targets):
    outputs_fn = kwng_jax.batch_outputs_fn(apply, inputs)
    loss_fn = lambda p: jnp.mean(jnp.square(outputs_fn(p) - targets))  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)[0]

  opt = kwng_jax.kwng(learning_rate=0.1)
  params, inputs, targets = make_problem()
  step = jax.jit(functools.partial(first_rows_step, opt))
  expected = step(params, opt.init(params), inputs, targets)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params, inputs, targets = shard(mesh, params, inputs, targets, layout)
    got = step(params, opt.init(params), inputs, targets)
  assert relative_difference(got, expected) < 1e-5
