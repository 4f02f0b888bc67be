"""value_grad_and_update: the gradient and T from one stacked backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import pytest

import kwng_jax
from kwng_jax._src import stacking

from conftest import mlp_apply
from conftest import mlp_params


def _problem():
  """An MLP regression with a Gaussian likelihood whose scale is a parameter
  the samples do not depend on (the loss uses it directly)."""
  k_params, k_inputs, k_targets = jax.random.split(jax.random.key(0), 3)
  params = {**mlp_params(k_params), 'log_sigma': jnp.asarray(0.3)}
  inputs = jax.random.normal(k_inputs, (32, 3))
  targets = jax.random.normal(k_targets, (32, 4))

  def outputs_fn(p):
    return mlp_apply(p, inputs)

  def loss_fn(samples, p):
    residual = jnp.mean(jnp.sum(jnp.square(samples - targets), axis=1))
    return residual / (2 * jnp.exp(2 * p['log_sigma'])) + 4 * p['log_sigma']

  return params, outputs_fn, loss_fn


def _unstacked(loss_fn, outputs_fn, tx, params, state):
  """The same step the long way: jax.value_and_grad, then tx.update."""
  value, grads = jax.value_and_grad(lambda p: loss_fn(outputs_fn(p), p))(params)
  updates, state = tx.update(grads, state, params, outputs_fn=outputs_fn, value=value)
  return value, grads, updates, state


def _assert_trees_close(a, b, rtol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize('make', [
    lambda: kwng_jax.kwng(0.5, damping='safe'),
    lambda: kwng_jax.kwng(0.5, jacobian_batching='vmap'),
    lambda: kwng_jax.kwng(0.5, jacobian_batching='map', num_basis=3),
    lambda: kwng_jax.published_kwng(0.1),
    lambda: kwng_jax.scale_by_kwng(epsilon=1e-3, damping='safe'),
], ids=['kwng', 'kwng-vmap', 'kwng-map', 'published', 'scale_by_kwng'])
def test_stacked_step_equals_the_unstacked_one(make, request):
  params, outputs_fn, loss_fn = _problem()
  tx = make()
  assert stacking.stacking_of(tx) is not None
  stacked_state = unstacked_state = tx.init(params)
  step = jax.jit(lambda p, s: kwng_jax.value_grad_and_update(loss_fn, outputs_fn, tx, p, s))
  reference = jax.jit(lambda p, s: _unstacked(loss_fn, outputs_fn, tx, p, s))
  for _ in range(3):
    value, grads, updates, stacked_state = step(params, stacked_state)
    value_ref, grads_ref, updates_ref, unstacked_state = reference(params, unstacked_state)
    assert float(value) == pytest.approx(float(value_ref), rel=1e-6)
    # The parameter outside outputs_fn gets its direct gradient, the others
    # theirs through the samples.
    _assert_trees_close(grads, grads_ref, rtol=1e-5)
    _assert_trees_close(updates, updates_ref, rtol=1e-3)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert float(jnp.abs(grads['log_sigma'])) > 0.01
    _assert_trees_close(stacked_state, unstacked_state, rtol=1e-3)
    if 'scale_by_kwng' not in request.node.name:  # alone it gives a direction, not a step
      params = optax.apply_updates(params, updates)


def test_other_optimizers_get_the_full_gradient_and_the_forward_pass():
  params, outputs_fn, loss_fn = _problem()
  for tx in (optax.sgd(0.1), kwng_jax.kwng(update_every=3),
             kwng_jax.kwng(jacobian_samples=16)):
    assert stacking.stacking_of(tx) is None
    state = tx.init(params)
    value, grads, updates, state = kwng_jax.value_grad_and_update(
        loss_fn, outputs_fn, tx, params, state)
    value_ref, grads_ref, updates_ref, _ = _unstacked(
        loss_fn, outputs_fn, tx, params, tx.init(params))
    _assert_trees_close(grads, grads_ref, rtol=1e-5)
    _assert_trees_close(updates, updates_ref, rtol=1e-4)


def test_has_aux_returns_the_auxiliary_output_of_outputs_fn():
  params, outputs_fn, loss_fn = _problem()
  tx = kwng_jax.kwng()
  (loss, aux), grads, updates, _ = kwng_jax.value_grad_and_update(
      loss_fn, lambda p: (outputs_fn(p), {'mean': jnp.mean(outputs_fn(p))}), tx, params,
      tx.init(params), has_aux=True)
  assert float(aux['mean']) == pytest.approx(float(jnp.mean(outputs_fn(params))), rel=1e-6)
  value, grads_ref, updates_ref, _ = kwng_jax.value_grad_and_update(
      loss_fn, outputs_fn, tx, params, tx.init(params))
  assert float(loss) == pytest.approx(float(value), rel=1e-6)
  _assert_trees_close(updates, updates_ref, rtol=1e-5)


def test_a_chain_that_changes_the_gradient_first_is_not_stacked():
  # Clipping before KWNG would see only part of the gradient: unregistered.
  tx = optax.chain(optax.clip(1.0), kwng_jax.scale_by_kwng())
  assert stacking.stacking_of(tx) is None


def test_stacked_step_draws_the_basis_of_the_transformation():
  """The helper reads the step count from the state: another count, another basis."""
  params, outputs_fn, loss_fn = _problem()
  tx = kwng_jax.scale_by_kwng(epsilon=1e-3)
  state = tx.init(params)
  later = otu.tree_set(state, kwng_count=jnp.asarray(7, jnp.int32))
  _, _, now, _ = kwng_jax.value_grad_and_update(loss_fn, outputs_fn, tx, params, state)
  _, _, then, _ = kwng_jax.value_grad_and_update(loss_fn, outputs_fn, tx, params, later)
  _, _, reference, _ = _unstacked(loss_fn, outputs_fn, tx, params, later)
  _assert_trees_close(then, reference, rtol=1e-3)
  assert not np.allclose(np.asarray(now['w1']), np.asarray(then['w1']))


def test_preconditioner_argument_is_checked():
  params, outputs_fn, _ = _problem()
  tx = kwng_jax.scale_by_kwng(update_every=2)
  grads = jax.tree.map(jnp.ones_like, params)
  pre = kwng_jax.build_preconditioner(outputs_fn, params, key=jax.random.key(0))
  with pytest.raises(ValueError, match='update_every'):
    tx.update(grads, tx.init(params), params, preconditioner=pre)
  tx = kwng_jax.scale_by_kwng()
  with pytest.raises(ValueError, match='kwng_jax.Preconditioner'):
    tx.update(grads, tx.init(params), params, preconditioner=(1, 2))


def _count_dots(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == 'dot_general'
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          count += _count_dots(sub)
  return count


def test_the_gradient_costs_no_backward_pass_of_its_own():
  """Stacked, the step has one VJP's matrix products fewer than the same step
  fed by a separate backward pass for g (both reuse one forward pass)."""
  params, outputs_fn, loss_fn = _problem()
  tx = kwng_jax.kwng(jacobian_batching='vmap')
  state = tx.init(params)

  def separate(p, s):
    samples, vjp_fn = jax.vjp(outputs_fn, p)
    value, (cotangent, direct) = jax.value_and_grad(loss_fn, argnums=(0, 1))(samples, p)
    (pulled,) = vjp_fn(cotangent)
    grads = jax.tree.map(lambda a, b: a + b, pulled, direct)
    return tx.update(grads, s, p, samples_and_vjp=(samples, vjp_fn), value=value)

  def stacked(p, s):
    return kwng_jax.value_grad_and_update(loss_fn, outputs_fn, tx, p, s)

  samples, vjp_fn = jax.vjp(outputs_fn, params)
  one_backward_pass = _count_dots(jax.make_jaxpr(vjp_fn)(samples).jaxpr)
  assert one_backward_pass > 0
  assert (_count_dots(jax.make_jaxpr(stacked)(params, state).jaxpr)
          == _count_dots(jax.make_jaxpr(separate)(params, state).jaxpr) - one_backward_pass)


def test_stacked_build_hands_the_solve_the_products_of_the_full_gradient(solved_products):
  """The stacked build's T̃ D g is that of g = Jᵀ(loss cotangent) + the
  direct gradient (here of log_sigma), the g the KWNG step then solves for."""
  params, outputs_fn, loss_fn = _problem()
  tx = kwng_jax.kwng(0.5)
  _, grads, _, _ = kwng_jax.value_grad_and_update(loss_fn, outputs_fn, tx, params, tx.init(params))
  (products, want, solved_for), = solved_products
  assert products is not None
  assert float(jnp.abs(grads['log_sigma'])) > 0
  _assert_trees_close(solved_for, grads, 1e-6)
  np.testing.assert_allclose(products, want, rtol=1e-4, atol=1e-6)
