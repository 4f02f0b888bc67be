"""Tests of KWNG with Flax: NNX optimizers, BatchNorm state, Linen, fused steps."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip('flax.nnx')
linen = pytest.importorskip('flax.linen')

import kwng_jax  # noqa: E402
from kwng_jax.examples import datasets  # noqa: E402
from kwng_jax import flax_utils  # noqa: E402
from kwng_jax.examples import models  # noqa: E402

NUM_CLASSES = 4


def _rngs(seed=0):
  # One-op 'rbg' PRNG: eager model initialization compiles less (see
  # tests/test_models.py).
  return nnx.Rngs(jax.random.key(seed, impl='rbg'))


def _data(batch=32, features=6, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  inputs = jax.random.normal(kx, (batch, features))
  labels = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)
  return inputs, labels


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class BatchNormNet(nnx.Module):
  """Dense → BatchNorm → ReLU → Dense: the smallest model with batch stats."""

  def __init__(self, rngs):
    self.dense1 = nnx.Linear(6, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    self.dense2 = nnx.Linear(8, NUM_CLASSES, rngs=rngs)

  def __call__(self, inputs):
    return self.dense2(jax.nn.relu(self.norm(self.dense1(inputs))))


def _leaves(tree):
  return [np.array(x) for x in jax.tree.leaves(nnx.as_pure(tree))]


def _assert_trees_equal(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _kwng_train_step(fused):
  """A jitted NNX KWNG step, with the two-pass or the fused forward."""

  @nnx.jit
  def step(model, optimizer, inputs, labels):
    if fused:
      loss, grads, samples_and_vjp = flax_utils.nnx_value_grad_and_vjp(
          lambda logits: _cross_entropy(logits, labels), model, inputs
      )
      forward = {'samples_and_vjp': samples_and_vjp}
    else:
      forward = {'outputs_fn': flax_utils.nnx_outputs_fn(model, inputs)}
      loss, grads = nnx.value_and_grad(
          lambda m: _cross_entropy(m(inputs), labels)
      )(model)
    optimizer.update(model, grads, value=loss, **forward)
    return loss

  return step


def test_nnx_optimizer_with_kwng_trains_and_matches_manual_optax_update():
  inputs, labels = _data()
  model = models.MLP(
      6, (16,), NUM_CLASSES,
      logit_scales=datasets.ill_conditioned_scales(NUM_CLASSES, -3.0, 0.0),
      rngs=_rngs(),
  )
  tx = kwng_jax.published_kwng(1.0)
  num_steps = 10

  # The pattern of plain Optax, on the pure state of the parameters.
  graphdef, params, constants = nnx.split(model, nnx.Param, ...)
  params = nnx.as_pure(params)

  def outputs_fn(p):
    return nnx.merge(graphdef, p, constants)(inputs)

  @jax.jit
  def manual_step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: _cross_entropy(outputs_fn(p), labels)
    )(params)
    updates, opt_state = tx.update(
        grads, opt_state, params, outputs_fn=outputs_fn, value=loss
    )
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(num_steps):
    params, opt_state = manual_step(params, opt_state)

  losses = {}
  for fused in (False, True):
    trained = nnx.clone(model)
    optimizer = nnx.Optimizer(trained, tx, wrt=nnx.Param)
    step = _kwng_train_step(fused)
    losses[fused] = [
        float(step(trained, optimizer, inputs, labels)) for _ in range(num_steps)
    ]
    assert int(optimizer.step[...]) == num_steps
    info = optax.tree_utils.tree_get(optimizer.opt_state, 'kwng_info')
    assert int(info.effective_rank) >= 1
    for x, y in zip(_leaves(nnx.state(trained, nnx.Param)), _leaves(params),
                    strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  assert np.all(np.isfinite(losses[False]))
  # Ten clipped steps of length 1: 1.38 to 1.21 with the basis draws of 0.4.
  assert losses[False][-1] < losses[False][0] - 0.1
  # One forward pass or two: the same steps.
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_nnx_outputs_fn_evaluates_at_given_params_without_mutating():
  inputs, _ = _data()
  model = BatchNormNet(_rngs())
  stats = _leaves(nnx.state(model, nnx.BatchStat))
  outputs_fn = flax_utils.nnx_outputs_fn(model, inputs)
  params = nnx.state(model, nnx.Param)
  np.testing.assert_allclose(outputs_fn(params), model(inputs), rtol=1e-6)
  # The model's own forward (train mode) moved the running averages; the
  # outputs_fn copy must not have.
  moved = _leaves(nnx.state(model, nnx.BatchStat))
  assert not np.allclose(moved[0], stats[0])
  outputs_fn(params)
  jax.jit(outputs_fn)(nnx.as_pure(params))
  _assert_trees_equal(nnx.state(model, nnx.BatchStat), moved)

  doubled = jax.tree.map(lambda x: 2 * x, nnx.as_pure(params))
  copy = nnx.clone(model)
  nnx.update(copy, doubled)
  np.testing.assert_allclose(outputs_fn(doubled), copy(inputs), rtol=1e-6)


def test_nnx_outputs_fn_runs_on_the_first_rows_for_kwng():
  """nnx_outputs_fn can run the model on the first rows alone (the model in
  eval mode, so that those rows are independent of the others)."""
  inputs, _ = _data()
  model = BatchNormNet(_rngs())
  model.eval()
  outputs_fn = flax_utils.nnx_outputs_fn(model, inputs)
  assert isinstance(outputs_fn, kwng_jax.BatchOutputsFn)
  assert outputs_fn.batch_size == inputs.shape[0]
  params = nnx.state(model, nnx.Param)
  np.testing.assert_allclose(outputs_fn.first_rows(5)(params), model(inputs)[:5], rtol=1e-5)


@pytest.mark.parametrize('fused', [False, True])
def test_batch_stats_after_kwng_step_equal_sgd_step(fused):
  inputs, labels = _data()
  kwng_model = BatchNormNet(_rngs())
  sgd_model = nnx.clone(kwng_model)
  reference = nnx.clone(kwng_model)

  kwng_optimizer = nnx.Optimizer(kwng_model, kwng_jax.published_kwng(0.1), wrt=nnx.Param)
  _kwng_train_step(fused)(kwng_model, kwng_optimizer, inputs, labels)

  sgd_optimizer = nnx.Optimizer(sgd_model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def sgd_step(model, optimizer):
    grads = nnx.grad(lambda m: _cross_entropy(m(inputs), labels))(model)
    optimizer.update(model, grads)

  sgd_step(sgd_model, sgd_optimizer)
  reference(inputs)  # one forward pass: the running averages move once.

  kwng_stats = nnx.state(kwng_model, nnx.BatchStat)
  for x, y in zip(_leaves(kwng_stats), _leaves(nnx.state(sgd_model, nnx.BatchStat))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  for x, y in zip(_leaves(kwng_stats), _leaves(nnx.state(reference, nnx.BatchStat))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # ... while the parameters did take a (different) KWNG step.
  assert not np.allclose(kwng_model.dense1.kernel[...], sgd_model.dense1.kernel[...])


def test_dropout_snapshot_replays_the_loss_forward_pass():
  class DropoutNet(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(6, NUM_CLASSES, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, inputs):
      return self.dropout(self.dense(inputs))

  inputs, _ = _data()
  model = DropoutNet(_rngs())
  outputs_fn = flax_utils.nnx_outputs_fn(model, inputs)
  logits = model(inputs)
  assert np.any(np.asarray(logits) == 0.0)
  np.testing.assert_array_equal(outputs_fn(nnx.state(model, nnx.Param)), logits)
  assert not np.array_equal(model(inputs), logits)  # the RNG stream moved on


@pytest.mark.parametrize('make_tx', [lambda: kwng_jax.published_kwng(0.1), kwng_jax.kwng])
def test_value_grad_and_vjp_matches_two_pass_update(mlp_problem, make_tx):
  """One forward pass gives the update of two: the preconditioner from the
  VJP, and (kwng) the displacement from its transpose."""
  params, outputs_fn, loss_fn = mlp_problem
  targets = jax.random.normal(jax.random.key(3), (32, 4))
  loss_from_outputs = lambda out: jnp.mean(jnp.square(out - targets))  # noqa: E731
  tx = make_tx()
  state = tx.init(params)

  @jax.jit
  def two_pass(params, state):
    loss, grads = jax.value_and_grad(
        lambda p: loss_from_outputs(outputs_fn(p))
    )(params)
    updates, _ = tx.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
    return loss, grads, updates

  @jax.jit
  def fused(params, state):
    loss, grads, samples_and_vjp = flax_utils.value_grad_and_vjp(
        loss_from_outputs, outputs_fn, params
    )
    updates, _ = tx.update(grads, state, params, samples_and_vjp=samples_and_vjp,
                           value=loss)
    return loss, grads, updates

  for x, y in zip(jax.tree.leaves(two_pass(params, state)),
                  jax.tree.leaves(fused(params, state)), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_samples_and_vjp_takes_the_structure_of_the_params():
  model = nnx.Linear(3, 2, rngs=_rngs())
  inputs = jnp.ones((5, 3))
  graphdef, params = nnx.split(model, nnx.Param)
  pure = nnx.as_pure(params)
  samples_and_vjp = jax.vjp(lambda p: nnx.merge(graphdef, p)(inputs), pure)
  tx = kwng_jax.scale_by_kwng(num_basis=3)
  grads = jax.tree.map(jnp.ones_like, params)  # Variable-wrapped
  updates, _ = tx.update(grads, tx.init(params), params, samples_and_vjp=samples_and_vjp)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  with pytest.raises(ValueError, match='returns 2 leaves for params of 1'):
    tx.update({'only': jnp.ones(3)}, tx.init({'only': jnp.ones(3)}), {'only': jnp.ones(3)},
              samples_and_vjp=samples_and_vjp)
  with pytest.raises(ValueError, match='samples_and_vjp must be the pair'):
    tx.update(grads, tx.init(params), params, samples_and_vjp=samples_and_vjp[0])


def test_samples_and_vjp_refuses_the_options_that_run_their_own_vjps(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  tx = kwng_jax.scale_by_kwng(num_basis=4, jacobian_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match='not samples_and_vjp'):
    tx.update(jax.grad(loss_fn)(params), tx.init(params), params,
              samples_and_vjp=jax.vjp(outputs_fn, params))


def test_the_replay_api_is_deprecated_and_still_works(mlp_problem):
  params, outputs_fn, _ = mlp_problem
  loss_from_outputs = lambda out: jnp.mean(jnp.square(out))  # noqa: E731
  with pytest.warns(DeprecationWarning, match='value_grad_and_vjp'):
    loss, grads, replay_fn = flax_utils.value_grad_and_outputs_fn(
        loss_from_outputs, outputs_fn, params)
  tx = kwng_jax.published_kwng(0.1)
  replayed, _ = tx.update(grads, tx.init(params), params, outputs_fn=replay_fn, value=loss)
  direct, _ = tx.update(grads, tx.init(params), params, outputs_fn=outputs_fn, value=loss)
  for x, y in zip(jax.tree.leaves(replayed), jax.tree.leaves(direct), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  with pytest.warns(DeprecationWarning, match='replay_outputs_fn'):
    flax_utils.replay_outputs_fn(*jax.vjp(outputs_fn, params))


class LinenNet(linen.Module):

  @linen.compact
  def __call__(self, inputs, train: bool = True):
    hidden = linen.Dense(8)(inputs)
    hidden = linen.BatchNorm(use_running_average=not train, momentum=0.5)(hidden)
    return linen.Dense(NUM_CLASSES)(jax.nn.relu(hidden))


class BatchStatsTrainState(flax_utils.KWNGTrainState):
  batch_stats: Any = None


def test_linen_kwng_train_state_matches_manual_update():
  inputs, labels = _data()
  model = LinenNet()
  variables = model.init(jax.random.key(1), inputs)
  tx = kwng_jax.published_kwng(0.3)
  state = BatchStatsTrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables['batch_stats'],
  )

  def forward(params, batch_stats):
    return model.apply({'params': params, 'batch_stats': batch_stats}, inputs,
                       mutable=['batch_stats'])

  @jax.jit
  def train_step(state):
    # KWNG's forward pass discards its batch-stats update: `[0]`.
    outputs_fn = lambda p: forward(p, state.batch_stats)[0]  # noqa: E731

    def loss_fn(params):
      logits, updates = forward(params, state.batch_stats)
      return _cross_entropy(logits, labels), updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, outputs_fn=outputs_fn, value=loss,
                                  batch_stats=batch_stats)
    return state, loss

  @jax.jit
  def manual_step(params, opt_state, batch_stats):
    outputs_fn = lambda p: forward(p, batch_stats)[0]  # noqa: E731

    def loss_fn(params):
      logits, updates = forward(params, batch_stats)
      return _cross_entropy(logits, labels), updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   outputs_fn=outputs_fn, value=loss)
    return optax.apply_updates(params, updates), opt_state, batch_stats

  params, opt_state, batch_stats = state.params, state.opt_state, state.batch_stats
  losses = []
  for _ in range(6):
    state, loss = train_step(state)
    losses.append(float(loss))
    params, opt_state, batch_stats = manual_step(params, opt_state, batch_stats)
  assert losses[-1] < losses[0]
  assert int(state.step) == 6
  for got, want in ((state.params, params), (state.batch_stats, batch_stats)):
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  # The plain TrainState passes no extra argument to tx.update.
  from flax.training import train_state
  with pytest.raises(ValueError, match='KWNGTrainState'):
    train_state.TrainState.apply_gradients(
        state, grads=state.params, value=losses[-1])
