"""The dampings (zero columns of T̃, the samples' metric diagonal) and the damped solve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kwng_jax
import references
from kwng_jax import factors
from kwng_jax import probes
from kwng_jax import solve

from conftest import mlp_apply
from conftest import mlp_params


def problem_with_unused_parameter(dtype=jnp.float32):
  """An MLP regression with a noise scale the loss uses and the samples do not."""
  k_params, k_inputs, k_targets = jax.random.split(jax.random.key(0), 3)
  params = {**mlp_params(k_params, dtype=dtype), 'log_scale': jnp.zeros((), dtype)}
  inputs = jax.random.normal(k_inputs, (32, 3), dtype)
  targets = jax.random.normal(k_targets, (32, 4), dtype)

  def outputs_fn(p):
    return mlp_apply(p, inputs)

  def loss_fn(p):
    residual = outputs_fn(p) - targets
    return jnp.mean(jnp.square(residual)) * jnp.exp(-2 * p['log_scale']) + 2 * p['log_scale']

  return params, outputs_fn, loss_fn


@pytest.mark.usefixtures('enable_x64')
@pytest.mark.parametrize('damping', ['safe', 'reference'])
def test_zero_column_direction_equals_dense_float64_transcription(damping):
  params, outputs_fn, loss_fn = problem_with_unused_parameter(jnp.float64)
  samples = np.asarray(outputs_fn(params))
  flat, unravel = ravel_pytree(params)
  jacobian = np.asarray(jax.jacrev(lambda v: outputs_fn(unravel(v)))(flat))
  grads = jax.grad(loss_fn)(params)
  indices, coords = factors.select_basis(32, 4, 6, key=jax.random.key(0))
  t, q, k, _ = references.factors(samples, jacobian, np.asarray(indices), np.asarray(coords))
  g = np.asarray(ravel_pytree(grads)[0])
  marker = {name: jnp.full_like(x, name == 'log_scale') for name, x in params.items()}
  column = int(jnp.argmax(ravel_pytree(marker)[0]))
  assert np.all(t[:, column] == 0) and np.all(np.any(t != 0, axis=0)[np.arange(t.shape[1]) != column])
  direct, woodbury = references.natural_gradient(t, q, k, g, kind=damping, epsilon=1e-3)
  np.testing.assert_allclose(direct, woodbury, rtol=1e-7, atol=1e-9)

  direction, _ = kwng_jax.natural_gradient(
      grads, outputs_fn, params, epsilon=1e-3, damping=damping,
      basis_indices=indices, basis_coords=coords)
  np.testing.assert_allclose(ravel_pytree(direction)[0], direct, rtol=1e-7, atol=1e-9)


def test_safe_damping_bounds_the_step_of_an_unseen_parameter():
  params, outputs_fn, loss_fn = problem_with_unused_parameter()
  grads = jax.grad(loss_fn)(params)
  key = jax.random.key(1)
  directions = {}
  for damping in ('reference', 'safe'):
    preconditioner = kwng_jax.build_preconditioner(
        outputs_fn, params, key=key, num_basis=5, damping=damping)
    directions[damping], _ = kwng_jax.apply_preconditioner(preconditioner, grads, 1e-5)
  # 'reference' gives the zero column D = 1e8: a step 1e8 g / eps there.
  np.testing.assert_allclose(directions['reference']['log_scale'],
                             1e8 * grads['log_scale'] / 1e-5, rtol=1e-4)
  # 'safe': g / (c^2 + eps c), c the RMS norm of the seen columns.
  norms = np.concatenate([
      np.sqrt(np.sum([np.asarray(row[name], np.float64).reshape(-1) ** 2
                      for row in preconditioner.whitened_rows], axis=0))
      for name in preconditioner.damping if name != 'log_scale'])
  typical = np.sqrt(np.mean(norms**2))
  np.testing.assert_allclose(directions['safe']['log_scale'],
                             grads['log_scale'] / (typical**2 + 1e-5 * typical), rtol=1e-4)
  # The seen parameters do not couple to a zero column: both dampings agree there.
  for name in ('w1', 'b1', 'w2', 'b2'):
    np.testing.assert_allclose(directions['safe'][name], directions['reference'][name],
                               rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(directions['reference'][name]))))


def test_safe_equals_reference_without_zero_columns(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  key = jax.random.key(2)
  safe, _ = kwng_jax.natural_gradient(grads, outputs_fn, params, key=key, damping='safe')
  reference, _ = kwng_jax.natural_gradient(grads, outputs_fn, params, key=key,
                                           damping='reference')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), safe, reference)


def test_samples_that_see_no_parameter_give_a_scaled_gradient():
  params = {'w': jnp.arange(3.0)}
  grads = {'w': jnp.ones(3)}
  constant = jnp.ones((16, 2))
  direction, info = kwng_jax.natural_gradient(
      grads, lambda p: constant + 0.0 * p['w'][0], params, key=jax.random.key(0),
      damping='safe', epsilon=1e-2)
  # No column seen: c = 1, so the direction is g / (1 + eps).
  np.testing.assert_allclose(direction['w'], 1.0 / 1.01, rtol=1e-6)


@pytest.mark.parametrize('damping', ['safe', 'metric_diagonal'])
def test_stored_preconditioner_holds_the_unseen_curvature(damping):
  params = {'w': jnp.zeros((3, 2)), 'b': jnp.zeros(2)}
  empty = kwng_jax.Preconditioner.empty(params, 4, damping=damping)
  assert jax.tree.structure(empty.unseen) == jax.tree.structure(params)
  assert kwng_jax.Preconditioner.empty(params, 4).unseen is None
  params, outputs_fn, loss_fn = problem_with_unused_parameter()
  opt = kwng_jax.scale_by_kwng(num_basis=4, damping=damping, update_every=2)
  state = opt.init(params)
  grads = jax.grad(loss_fn)(params)
  step = jax.jit(lambda s: opt.update(grads, s, params, outputs_fn=outputs_fn))
  first, state = step(state)
  second, state = step(state)  # reuses the stored factors
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), first, second)
  assert float(state.kwng_preconditioner.unseen['log_scale']) > 0
  assert np.isfinite(float(first['log_scale']))


def test_unknown_damping_is_named():
  with pytest.raises(ValueError, match="'safe'"):
    solve.check_damping('floored')


@pytest.mark.parametrize('num_rows', [5, solve.GRAM_PAIRED_MIN_ROWS])
@pytest.mark.parametrize('columns', [300 * 7, 5 * solve.GRAM_BLOCK_COLUMNS + 4,
                                     14 * solve.GRAM_BLOCK_COLUMNS])
def test_damped_gram_equals_float64_product(num_rows, columns):
  """T̃ D T̃ᵀ from the rows; the wide leaf is summed block by block on CPU
  (5 blocks and 4 columns, or 14 blocks and none; with many rows, two
  blocks an iteration)."""
  assert columns % 7 == 0  # The leaf is (columns // 7, 7).
  key_t, key_d = jax.random.split(jax.random.key(0))
  whitened = {'w': jax.random.normal(key_t, (num_rows, columns // 7, 7)),
              'b': jax.random.normal(key_d, (num_rows, 7))}
  damping = {'w': jax.random.uniform(key_d, (columns // 7, 7)), 'b': jax.random.uniform(key_t, (7,))}
  rows = [jax.tree.map(lambda t, m=m: t[m], whitened) for m in range(num_rows)]
  gram = jax.jit(solve.damped_gram)(rows, damping)
  expected = sum((np.asarray(whitened[n], np.float64).reshape(num_rows, -1)
                  * np.asarray(damping[n], np.float64).reshape(-1))
                 @ np.asarray(whitened[n], np.float64).reshape(num_rows, -1).T for n in ('w', 'b'))
  np.testing.assert_allclose(np.asarray(gram), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the blocked loop runs on CPU only')
@pytest.mark.parametrize('num_rows', [solve.GRAM_PAIRED_MIN_ROWS - 1, solve.GRAM_PAIRED_MIN_ROWS])
def test_damped_gram_takes_two_blocks_an_iteration_from_the_row_threshold(num_rows):
  """Below GRAM_PAIRED_MIN_ROWS one product per loop iteration, from it on two."""
  columns = 4 * solve.GRAM_BLOCK_COLUMNS
  rows = [jnp.ones(columns) for _ in range(num_rows)]
  jaxpr = jax.make_jaxpr(solve.damped_gram)(rows, jnp.ones(columns))
  # fori_loop with static bounds traces to a scan.
  (loop,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ('scan', 'while')]
  body = loop.params['jaxpr' if loop.primitive.name == 'scan' else 'body_jaxpr'].jaxpr
  products = [e for e in body.eqns if e.primitive.name == 'dot_general']
  assert len(products) == (2 if num_rows >= solve.GRAM_PAIRED_MIN_ROWS else 1)


def test_damped_natural_gradient_is_the_damped_metric_inverse():
  """The Woodbury solve on the rows of T̃ equals (T̃ᵀT̃ + diag(v) + εD⁻¹)⁻¹ g
  in float64, unseen columns (zero in T̃, v > 0) included."""
  keys = jax.random.split(jax.random.key(3), 4)
  whitened = jax.random.normal(keys[0], (3, 12)).at[:, -2:].set(0.0)
  damping = jax.random.uniform(keys[1], (12,), minval=0.1, maxval=10.0)
  unseen = jnp.zeros(12).at[-2:].set(jnp.array([0.5, 2.0]))
  grads = jax.random.normal(keys[2], (12,))
  epsilon = 0.3
  rows = [whitened[m] for m in range(3)]
  got = solve.damped_natural_gradient(grads, rows, damping, solve.damped_gram(rows, damping),
                                      jnp.asarray(epsilon), unseen)
  t, d, v, g = (np.asarray(x, np.float64) for x in (whitened, damping, unseen, grads))
  metric = t.T @ t + np.diag(v + epsilon / d)
  np.testing.assert_allclose(np.asarray(got), np.linalg.solve(metric, g), rtol=1e-4)


def test_damped_natural_gradient_on_a_wide_leaf_equals_float64_woodbury():
  """A leaf of more than two Gram blocks takes the path of M inner products
  (no M×P stack on CPU); it gives the float64 Woodbury direction, unseen
  columns included."""
  columns = 2 * solve.GRAM_BLOCK_COLUMNS + 5
  keys = jax.random.split(jax.random.key(4), 3)
  whitened = jax.random.normal(keys[0], (3, columns)).at[:, :7].set(0.0)
  damping = jax.random.uniform(keys[1], (columns,), minval=0.1, maxval=10.0)
  unseen = jnp.zeros(columns).at[:7].set(0.5)
  grads = jax.random.normal(keys[2], (columns,))
  epsilon = 0.3
  rows = [whitened[m] for m in range(3)]
  got = jax.jit(solve.damped_natural_gradient)(
      grads, rows, damping, solve.damped_gram(rows, damping), jnp.asarray(epsilon), unseen)
  t, d, v, g = (np.asarray(x, np.float64) for x in (whitened, damping, unseen, grads))
  c = np.linalg.solve((t * d) @ t.T + epsilon * np.eye(3), t @ (d * g))
  want = d * (g - t.T @ c) / epsilon
  # Where T̃ is zero the metric's diagonal is v + eps / D.
  want[:7] = g[:7] / (v[:7] + epsilon / d[:7])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('columns', [63, 2 * solve.GRAM_BLOCK_COLUMNS + 5])
def test_gram_and_products_equal_float64_in_one_pass(columns):
  """T̃ D T̃ᵀ and T̃ D g from the blocks with g as one more row, a wide leaf
  (fori_loop over blocks on CPU) and a small one; the solve given those
  products gives the direction it computes without them."""
  keys = jax.random.split(jax.random.key(5), 4)
  whitened = jax.random.normal(keys[0], (4, columns)).at[:, :3].set(0.0)
  damping = {'w': jax.random.uniform(keys[1], (columns,), minval=0.1, maxval=10.0),
             'b': jax.random.uniform(keys[2], (2,), minval=0.1, maxval=10.0)}
  rows = [{'w': whitened[m], 'b': whitened[m, 5:7]} for m in range(4)]
  grads = {'w': jax.random.normal(keys[3], (columns,)), 'b': jnp.array([1.0, -2.0])}
  gram, products = jax.jit(solve.damped_gram_and_products)(rows, damping, grads)
  t = np.concatenate([np.asarray(whitened, np.float64), np.asarray(whitened[:, 5:7], np.float64)], 1)
  d = np.concatenate([np.asarray(damping['w'], np.float64), np.asarray(damping['b'], np.float64)])
  g = np.concatenate([np.asarray(grads['w'], np.float64), np.asarray(grads['b'], np.float64)])
  np.testing.assert_allclose(np.asarray(gram), (t * d) @ t.T, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(np.asarray(products), t @ (d * g), rtol=1e-5, atol=1e-3)
  unseen = {'w': jnp.zeros(columns).at[:3].set(0.5), 'b': jnp.zeros(2)}
  solve_fn = jax.jit(solve.damped_natural_gradient)
  with_products = solve_fn(grads, rows, damping, gram, jnp.asarray(0.3), unseen,
                           gradient_products=products)
  without = solve_fn(grads, rows, damping, gram, jnp.asarray(0.3), unseen)
  for got, want in zip(jax.tree.leaves(with_products), jax.tree.leaves(without)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=1e-6)


def test_mean_over_support_counts_positive_entries_and_keeps_nan():
  """The mean over the positive entries of the support; 1 with none; a NaN
  stays NaN (not 1); bfloat16 entries are counted in float32."""
  values = {'a': jnp.array([[2.0, 0.0], [4.0, 0.0]]), 'b': jnp.array([3.0])}
  np.testing.assert_allclose(solve.mean_over_support(values, values), 3.0)
  zeros = {'a': jnp.zeros((2, 2))}
  np.testing.assert_allclose(solve.mean_over_support(zeros, zeros), 1.0)
  with_nan = {'a': jnp.array([jnp.nan, 1.0, 0.0])}
  assert np.isnan(solve.mean_over_support(with_nan, with_nan))
  half = {'a': jnp.array([2.0, 0.0, 4.0], jnp.bfloat16)}
  np.testing.assert_allclose(solve.mean_over_support(half, half).astype(jnp.float32), 3.0)


@pytest.mark.usefixtures('enable_x64')
def test_mean_over_support_counts_float64_entries_below_float32_range():
  tiny = {'a': jnp.array([1e-50, 0.0, 4.0], jnp.float64)}
  np.testing.assert_allclose(solve.mean_over_support(tiny, tiny), 2.0)


def test_metric_diagonal_damping_is_the_inverse_diagonal_and_bounds_unseen_ones():
  whitened = {'seen': jnp.array([[3.0, 4.0], [0.0, 0.0]]), 'unseen': jnp.zeros((2, 1))}
  metric = {'seen': jnp.array([2.0, 6.0]), 'unseen': jnp.zeros(1)}
  squared_norms = solve.column_squared_norms([jax.tree.map(lambda t, m=m: t[m], whitened)
                                              for m in range(2)])
  damping, curvature = probes.metric_diagonal_damping(metric, squared_norms)
  np.testing.assert_allclose(damping['seen'], [0.5, 1 / 6.0])
  np.testing.assert_allclose(curvature['seen'], [0.0, 0.0])
  # Unseen: D⁻¹ the mean seen diagonal (4), curvature the mean seen squared
  # column norm of T̃ ((9 + 16) / 2).
  np.testing.assert_allclose(damping['unseen'], [0.25])
  np.testing.assert_allclose(curvature['unseen'], [12.5])
  with pytest.raises(ValueError, match='metric_diagonal_damping'):
    solve.damping_diagonal(squared_norms, 'metric_diagonal')


def test_metric_diagonal_damping_gives_no_curvature_to_a_column_t_sees():
  """Probes that cancel give s_j = 0 on a column T̃ sees: D⁻¹ is the typical
  one there, but no extra curvature, since T̃ already holds that column's."""
  metric = {'w': jnp.array([2.0, 0.0, 0.0])}
  squared_norms = {'w': jnp.array([1.0, 3.0, 0.0])}
  damping, curvature = probes.metric_diagonal_damping(metric, squared_norms)
  np.testing.assert_allclose(damping['w'], [0.5, 0.5, 0.5])
  # The typical curvature: the mean over the columns T̃ or the probes see.
  np.testing.assert_allclose(curvature['w'], [0.0, 0.0, 2.0])


def test_metric_diagonal_damping_of_a_total_and_its_divisor_is_that_of_the_quotient():
  """An average's total and weight give the D and v of total / weight: floored
  entries, unseen ones and probe-cancelled ones included."""
  total = {'kernel': jnp.array([[3.0, 1e-8], [1e-6, 2e-8], [0.0, 0.0]]),
           'bias': jnp.array([0.7, 0.0])}
  squared_norms = {'kernel': jnp.full((3, 2), 2.0).at[2].set(0.0),
                   'bias': jnp.array([1.0, 3.0])}
  weight = jnp.asarray(0.271, jnp.float32)
  damping, curvature = probes.metric_diagonal_damping(total, squared_norms, divisor=weight)
  want_damping, want_curvature = probes.metric_diagonal_damping(
      jax.tree.map(lambda t: t / weight, total), squared_norms)
  for got, want in [(damping, want_damping), (curvature, want_curvature)]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  # Not the D of the total itself.
  assert not np.allclose(damping['kernel'], probes.metric_diagonal_damping(
      total, squared_norms)[0]['kernel'])
  # Nothing seen: D = 1, as for the quotient, not w.
  zeros = jax.tree.map(jnp.zeros_like, total)
  damping, _ = probes.metric_diagonal_damping(zeros, zeros, divisor=weight)
  jax.tree.map(lambda d: np.testing.assert_allclose(d, 1.0, rtol=1e-6), damping)


def test_metric_diagonal_is_floored_per_unit_and_keeps_its_zeros():
  """A barely moved entry of a kernel gets at least 1e-2 of its unit's mean; vectors are not floored."""
  # Column 0: mean 1, so 1e-6 is floored to 1e-2 (the zero stays unseen);
  # column 1: mean 1e-8, every entry within 1e2 of it, so none moves.
  kernel = jnp.array([[3.0, 1e-8], [1e-6, 2e-8], [0.0, 0.0]])
  metric = {'kernel': kernel, 'bias': jnp.array([1.0, 1e-9])}
  # T̃'s columns are zero where the metric is (an unseen parameter).
  squared_norms = {'kernel': jnp.full((3, 2), 2.0).at[2].set(0.0), 'bias': jnp.full((2,), 2.0)}
  damping, curvature = probes.metric_diagonal_damping(metric, squared_norms)
  floor = probes.METRIC_DIAGONAL_FLOOR
  np.testing.assert_allclose(damping['kernel'][:2], 1.0 / np.array([[3.0, 1e-8], [floor, 2e-8]]),
                             rtol=1e-6)
  np.testing.assert_allclose(damping['bias'], [1.0, 1e9], rtol=1e-6)
  # The zero entries are unseen: the typical seen diagonal and curvature.
  assert float(damping['kernel'][2, 0]) == float(damping['kernel'][2, 1]) > 0
  assert float(curvature['kernel'][2, 0]) > 0 and float(curvature['kernel'][0, 0]) == 0


def test_metric_diagonal_is_covariant_under_rescaling_a_parameter():
  """θ_j -> θ_j / a: the direction in θ' is the direction in θ times a, to roundoff."""
  params, outputs_fn, loss_fn = problem_with_unused_parameter()
  scale = jnp.array([1e-3, 1.0, 10.0, 1e2, 1.0])
  rescaled = {**params, 'w2': params['w2'] / scale[None, :4]}
  rescaled_fn = lambda p: outputs_fn({**p, 'w2': p['w2'] * scale[None, :4]})  # noqa: E731
  key = jax.random.key(3)
  kwargs = dict(key=key, num_basis=4, epsilon=1e-3, damping='metric_diagonal')
  direction, _ = kwng_jax.natural_gradient(jax.grad(loss_fn)(params), outputs_fn, params, **kwargs)
  grads = jax.grad(lambda p: loss_fn({**p, 'w2': p['w2'] * scale[None, :4]}))(rescaled)
  rescaled_direction, _ = kwng_jax.natural_gradient(grads, rescaled_fn, rescaled, **kwargs)
  np.testing.assert_allclose(rescaled_direction['w2'] * scale[None, :4], direction['w2'],
                             rtol=1e-3, atol=1e-6 * float(jnp.max(jnp.abs(direction['w2']))))
  # The published damping is not covariant.
  kwargs['damping'] = 'safe'
  direction, _ = kwng_jax.natural_gradient(jax.grad(loss_fn)(params), outputs_fn, params, **kwargs)
  rescaled_direction, _ = kwng_jax.natural_gradient(grads, rescaled_fn, rescaled, **kwargs)
  assert not np.allclose(rescaled_direction['w2'] * scale[None, :4], direction['w2'], rtol=0.1)
