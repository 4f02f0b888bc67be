"""What goes wrong with outputs_fn and params gets an error that names the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import pytest

import kwng_jax
from kwng_jax._src import outputs


def one_step(opt, params, outputs_fn, loss_fn, *, use_jit=True, **extra):
  state = opt.init(params)

  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss, **extra)

  return (jax.jit(step) if use_jit else step)(params, state)


@pytest.mark.parametrize('make_outputs, words', [
    (lambda out, p: (out, p['b1']), 'tuple'),
    (lambda out, p: {'logits': out}, 'dict'),
    (lambda out, p: [out], 'list'),
    (lambda out, p: jnp.sum(out), 'scalar'),
    (lambda out, p: out[:0], 'empty'),
    (lambda out, p: out[:, :0], 'empty'),
    (lambda out, p: jnp.argmax(out, axis=1), 'floating'),
    (lambda out, p: out.astype(jnp.complex64), 'complex'),
])
@pytest.mark.parametrize('use_jit', [False, True])
def test_bad_samples_are_named(mlp_problem, make_outputs, words, use_jit):
  params, outputs_fn, loss_fn = mlp_problem
  with pytest.raises(ValueError, match=f'outputs_fn.*{words}|{words}.*outputs_fn'):
    one_step(kwng_jax.kwng(), params, lambda p: make_outputs(outputs_fn(p), p),
             loss_fn, use_jit=use_jit)


def test_integer_leaf_is_named_with_its_path(mlp_problem):
  params, _, _ = mlp_problem
  with pytest.raises(ValueError, match=r"params\['step'\].*int32.*optax.masked"):
    kwng_jax.kwng().init({**params, 'step': jnp.zeros((), jnp.int32)})


def test_empty_params_are_named():
  with pytest.raises(ValueError, match='params is empty'):
    kwng_jax.kwng().init({})


def test_grads_not_shaped_like_params_are_named(mlp_problem):
  params, outputs_fn, _ = mlp_problem
  opt = kwng_jax.scale_by_kwng()
  with pytest.raises(ValueError, match='grads must be shaped like params'):
    opt.update({'w1': params['w1']}, opt.init(params), params, outputs_fn=outputs_fn)


def test_kernel_returning_a_vector_is_named(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  with pytest.raises(ValueError, match='kernel must return a scalar'):
    one_step(kwng_jax.kwng(kernel=lambda x, y: x - y), params, outputs_fn, loss_fn)


def test_value_must_be_a_scalar(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.kwng()
  with pytest.raises(ValueError, match='value must be the scalar loss'):
    opt.update(jax.grad(loss_fn)(params), opt.init(params), params,
               outputs_fn=outputs_fn, value=jnp.ones(3))


def test_linen_train_state_points_to_the_kwng_train_state(mlp_problem):
  from flax.training import train_state
  params, outputs_fn, loss_fn = mlp_problem
  state = train_state.TrainState.create(
      apply_fn=None, params=params, tx=kwng_jax.kwng())
  with pytest.raises(ValueError, match='KWNGTrainState'):
    state.apply_gradients(grads=jax.grad(loss_fn)(params), outputs_fn=outputs_fn)
  no_adaptive = train_state.TrainState.create(
      apply_fn=None, params=params, tx=kwng_jax.kwng(adaptive=False))
  with pytest.raises(ValueError, match='KWNGTrainState'):
    no_adaptive.apply_gradients(grads=jax.grad(loss_fn)(params))


@pytest.mark.parametrize('use_jit', [False, True])
def test_hand_written_nnx_outputs_fn_with_batch_norm_points_to_nnx_outputs_fn(use_jit):
  from flax import nnx

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 2, rngs=rngs)
      self.norm = nnx.BatchNorm(2, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.linear(x))

  x = jax.random.normal(jax.random.key(0), (16, 3))
  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, kwng_jax.kwng(), wrt=nnx.Param)

  def hand_written(params):
    nnx.update(model, params)
    return model(x)

  def train_step(model, optimizer):
    value, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads, outputs_fn=hand_written, value=value)

  with pytest.raises(ValueError, match='nnx_outputs_fn'):
    (nnx.jit(train_step) if use_jit else train_step)(model, optimizer)


def test_outputs_fn_independent_of_params_warns_and_is_flagged(mlp_problem):
  params, _, loss_fn = mlp_problem
  constant = jax.random.normal(jax.random.key(3), (32, 4))
  with pytest.warns(RuntimeWarning, match='do not depend on params'):
    updates, state = one_step(kwng_jax.kwng(), params, lambda p: constant, loss_fn)
  info = otu.tree_get(state, 'kwng_info')
  assert not bool(info.depends_on_params)
  # The step is then the damped gradient: finite and a descent direction.
  grads = jax.grad(loss_fn)(params)
  assert float(otu.tree_vdot(grads, updates)) < 0


def test_outputs_fn_that_depends_on_params_is_not_flagged(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  _, state = one_step(kwng_jax.kwng(), params, outputs_fn, loss_fn)
  assert bool(otu.tree_get(state, 'kwng_info').depends_on_params)


def test_depends_on_input_reads_the_jaxpr():
  x = jnp.ones((4, 3))
  assert outputs.depends_on_input(jax.make_jaxpr(lambda w: x @ w)(jnp.ones((3, 2))))
  assert not outputs.depends_on_input(jax.make_jaxpr(lambda w: x)(jnp.ones((3, 2))))
  assert not outputs.depends_on_input(jax.make_jaxpr(lambda w: 0.0 * x.sum() + jnp.zeros(2))(1.0))


def test_unmasked_outputs_fn_fills_the_masked_leaves(mlp_problem):
  params, outputs_fn, _ = mlp_problem
  masked = {k: (v if k.startswith('w') else optax.MaskedNode()) for k, v in params.items()}
  restricted = outputs.unmasked_outputs_fn(outputs_fn, masked, params, 'test')
  np.testing.assert_array_equal(restricted(masked), outputs_fn(params))
  assert outputs.unmasked_outputs_fn(outputs_fn, params, None, 'test') is outputs_fn
  with pytest.raises(ValueError, match='full_params=params'):
    outputs.unmasked_outputs_fn(outputs_fn, masked, None, 'test')
  with pytest.raises(ValueError, match='full_params holds masked leaves'):
    outputs.unmasked_outputs_fn(outputs_fn, masked, masked, 'test')
  with pytest.raises(ValueError, match='structure'):
    outputs.unmasked_outputs_fn(outputs_fn, masked, {'w1': params['w1']}, 'test')
