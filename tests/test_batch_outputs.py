"""batch_outputs_fn, and T from the first rows of the batch (jacobian_samples='auto')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kwng_jax
from kwng_jax._src import options

from conftest import mlp_apply, mlp_params


def problem(num_samples=96):
  keys = jax.random.split(jax.random.key(0), 3)
  params = mlp_params(keys[0])
  inputs = jax.random.normal(keys[1], (num_samples, 3))
  targets = jax.random.normal(keys[2], (num_samples, 4))

  def loss_fn(p):
    return jnp.mean(jnp.square(mlp_apply(p, inputs) - targets))

  return params, inputs, loss_fn


def update(opt, params, loss_fn, extra):
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return opt.update(grads, state, params, value=loss, **extra(params))

  return step(params, state)[0]


def close(a, b, rtol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7), a, b)


def test_batch_outputs_fn_cuts_the_batch_inputs_only():
  x = jnp.arange(24.0).reshape(8, 3)
  table = jnp.ones((5, 3))   # not the batch: another leading axis
  apply = lambda p, x, table, scale, *, shift: (x @ table.T) * scale * p + shift  # noqa: E731
  outputs_fn = kwng_jax.batch_outputs_fn(apply, x, table, 2.0, shift=1.0)
  assert outputs_fn.batch_size == 8
  np.testing.assert_allclose(outputs_fn(3.0), apply(3.0, x, table, 2.0, shift=1.0))
  rows = outputs_fn.first_rows(3)
  assert rows.batch_size == 3
  np.testing.assert_allclose(rows(3.0), apply(3.0, x[:3], table, 2.0, shift=1.0))
  with pytest.raises(ValueError, match='num_rows'):
    outputs_fn.first_rows(9)


@pytest.mark.parametrize('inputs, words', [((), 'batch'), ((2.0,), 'batch')])
def test_batch_outputs_fn_without_a_batch_is_named(inputs, words):
  with pytest.raises(ValueError, match=words):
    kwng_jax.batch_outputs_fn(lambda p, *a: p, *inputs)
  with pytest.raises(ValueError, match='apply_fn'):
    kwng_jax.batch_outputs_fn(None, jnp.ones((4, 2)))


def test_auto_takes_t_from_32_rows_when_outputs_fn_can_run_on_them():
  """kwng()'s default equals jacobian_samples=32 with the first rows' own
  function, and differs from the whole batch's T."""
  params, inputs, loss_fn = problem()
  batch_fn = kwng_jax.batch_outputs_fn(mlp_apply, inputs)
  auto = update(kwng_jax.kwng(), params, loss_fn, lambda p: {'outputs_fn': batch_fn})
  explicit = update(
      kwng_jax.kwng(jacobian_samples=options.AUTO_JACOBIAN_SAMPLES), params, loss_fn,
      lambda p: {'outputs_fn': lambda q: mlp_apply(q, inputs),
                 'jacobian_outputs_fn': lambda q: mlp_apply(q, inputs[:32])})
  whole = update(kwng_jax.kwng(jacobian_samples=None), params, loss_fn,
                 lambda p: {'outputs_fn': batch_fn})
  close(auto, explicit)
  difference = max(float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(whole)))
  assert difference > 1e-4


def test_auto_uses_the_whole_batch_for_a_plain_function():
  params, inputs, loss_fn = problem()
  plain = update(kwng_jax.kwng(), params, loss_fn,
                 lambda p: {'outputs_fn': lambda q: mlp_apply(q, inputs)})
  whole = update(kwng_jax.kwng(jacobian_samples=None), params, loss_fn,
                 lambda p: {'outputs_fn': lambda q: mlp_apply(q, inputs)})
  close(plain, whole)


def test_auto_differentiates_only_the_first_rows():
  """The VJPs of T run on a function of 32 rows: the model is traced on them."""
  params, inputs, loss_fn = problem()
  seen = []

  def recording_apply(p, x):
    seen.append(x.shape[0])
    return mlp_apply(p, x)

  update(kwng_jax.kwng(), params, loss_fn,
         lambda p: {'outputs_fn': kwng_jax.batch_outputs_fn(recording_apply, inputs)})
  assert 32 in seen and 96 in seen


def test_forward_pass_already_run_and_first_rows_give_the_same_update():
  """samples_and_vjp (the loss's forward pass) with a batch_outputs_fn: samples
  from that pass, T from the first rows; the same as outputs_fn alone."""
  params, inputs, loss_fn = problem()
  batch_fn = kwng_jax.batch_outputs_fn(mlp_apply, inputs)
  alone = update(kwng_jax.kwng(), params, loss_fn, lambda p: {'outputs_fn': batch_fn})
  fused = update(kwng_jax.kwng(), params, loss_fn,
                 lambda p: {'outputs_fn': batch_fn,
                            'samples_and_vjp': jax.vjp(batch_fn, p)})
  close(alone, fused)


def test_small_batches_and_explicit_numbers():
  """A batch of at most 32 uses all of it; a number n takes the first rows'
  function too; a number above the batch is refused."""
  params, inputs, loss_fn = problem(num_samples=24)
  batch_fn = kwng_jax.batch_outputs_fn(mlp_apply, inputs)
  auto = update(kwng_jax.kwng(), params, loss_fn, lambda p: {'outputs_fn': batch_fn})
  whole = update(kwng_jax.kwng(jacobian_samples=None), params, loss_fn,
                 lambda p: {'outputs_fn': batch_fn})
  close(auto, whole)
  by_rows = update(kwng_jax.kwng(jacobian_samples=16), params, loss_fn,
                   lambda p: {'outputs_fn': batch_fn})
  padded = update(kwng_jax.kwng(jacobian_samples=16), params, loss_fn,
                  lambda p: {'outputs_fn': lambda q: mlp_apply(q, inputs)})
  close(by_rows, padded, rtol=1e-4)
  with pytest.raises(ValueError, match='jacobian_samples=40'):
    update(kwng_jax.kwng(jacobian_samples=40), params, loss_fn,
           lambda p: {'outputs_fn': batch_fn})


def test_value_grad_and_update_runs_t_on_the_first_rows():
  """value_grad_and_update with a batch_outputs_fn: the ordinary backward
  pass and T from 32 rows, the same update as opt.update."""
  params, inputs, _ = problem()
  targets = jax.random.normal(jax.random.key(5), (96, 4))
  batch_fn = kwng_jax.batch_outputs_fn(mlp_apply, inputs)
  opt = kwng_jax.kwng()
  state = opt.init(params)
  loss_of = lambda samples, p: jnp.mean(jnp.square(samples - targets))  # noqa: E731
  _, grads, updates, _ = jax.jit(lambda p, s: kwng_jax.value_grad_and_update(
      loss_of, batch_fn, opt, p, s))(params, state)
  expected = update(opt, params, lambda p: loss_of(batch_fn(p), p),
                    lambda p: {'outputs_fn': batch_fn})
  close(updates, expected, rtol=1e-4)
  close(grads, jax.grad(lambda p: loss_of(batch_fn(p), p))(params), rtol=1e-5)


def test_an_unknown_jacobian_samples_names_the_valid_values():
  with pytest.raises(ValueError, match="jacobian_samples='half'.*'auto'"):
    kwng_jax.kwng(jacobian_samples='half')


def test_value_grad_and_update_with_aux_runs_t_on_the_first_rows():
  """outputs_fn returning (samples, aux) (has_aux=True) as a batch_outputs_fn:
  the aux comes back, and T still comes from the first 32 rows."""
  params, inputs, _ = problem()
  targets = jax.random.normal(jax.random.key(5), (96, 4))
  with_aux = kwng_jax.batch_outputs_fn(lambda p, x: (mlp_apply(p, x), x.shape[0]), inputs)
  opt = kwng_jax.kwng()
  loss_of = lambda samples, p: jnp.mean(jnp.square(samples - targets))  # noqa: E731
  (_, aux), _, updates, _ = jax.jit(lambda p, s: kwng_jax.value_grad_and_update(
      loss_of, with_aux, opt, p, s, has_aux=True))(params, opt.init(params))
  assert int(aux) == 96
  batch_fn = kwng_jax.batch_outputs_fn(mlp_apply, inputs)
  expected = update(opt, params, lambda p: loss_of(batch_fn(p), p),
                    lambda p: {'outputs_fn': batch_fn})
  close(updates, expected, rtol=1e-4)
