"""Amortized KWNG: update_every, T on a subsample, bf16 VJPs, state size."""

import functools
import json
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import kwng_jax
import references
from conftest import mlp_apply
from conftest import mlp_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def relative_error(a, b):
  a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def tree_nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def run_amortized(params, outputs_fn, loss_fn, update_every, num_steps, seed=5):
  """Trains with scale_by_kwng(update_every), clipping and SGD; returns, per
  step, the params it started from, the gradient, the KWNG direction and
  the state after it."""
  kwng = kwng_jax.scale_by_kwng(num_basis=5, update_every=update_every, seed=seed)
  tail = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05))

  @jax.jit
  def step(params, kwng_state, tail_state):
    grads = jax.grad(loss_fn)(params)
    direction, kwng_state = kwng.update(grads, kwng_state, params, outputs_fn=outputs_fn)
    updates, tail_state = tail.update(direction, tail_state, params)
    return optax.apply_updates(params, updates), kwng_state, tail_state, grads, direction

  kwng_state, tail_state = kwng.init(params), tail.init(params)
  history = []
  for _ in range(num_steps):
    start = params
    params, kwng_state, tail_state, grads, direction = step(params, kwng_state, tail_state)
    history.append((start, grads, direction, kwng_state))
  return history


@functools.partial(jax.jit, static_argnums=0, static_argnames='seed')
def fresh_direction(outputs_fn, params, grads, count, seed=5):
  """What scale_by_kwng(num_basis=5) returns with factors built afresh at
  ``params`` with the basis key of step ``count``."""
  key = jax.random.fold_in(jax.random.key(seed), count)
  pre = kwng_jax.build_preconditioner(outputs_fn, params, key=key, num_basis=5)
  direction, info = kwng_jax.apply_preconditioner(pre, grads, 1e-5)
  return kwng_jax._src.transform.safe_direction(grads, direction, info)


#: natural_gradient, compiled: eager dispatch of its many small ops is slower
#: than one compilation on the CPUs the tests run on.
natural_gradient = jax.jit(
    kwng_jax.natural_gradient,
    static_argnums=1,
    static_argnames=('num_basis', 'damping', 'bandwidth', 'jacobian_samples',
                     'jacobian_dtype', 'jacobian_outputs_fn'),
)


def test_update_every_rebuilds_exactly_every_k_steps(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  k = 3
  history = run_amortized(params, outputs_fn, loss_fn, update_every=k, num_steps=7)
  for t, (_, grads, direction, state) in enumerate(history):
    stored = state.kwng_preconditioner
    built_at = t - t % k
    start_of_build = history[built_at][0]
    # The direction is the stored preconditioner, built from the params and
    # the basis key of step built_at, applied to the current gradient.
    expected = fresh_direction(outputs_fn, start_of_build, grads, built_at)
    assert relative_error(direction, expected) < 1e-4, t
    if t % k:
      previous = history[t - 1][3].kwng_preconditioner
      jax.tree.map(np.testing.assert_array_equal, stored, previous)
      # Reuse is visible: the factors of the current params differ.
      assert relative_error(direction, fresh_direction(outputs_fn, history[t][0], grads, t)) > 1e-3
    elif t:
      previous = history[t - 1][3].kwng_preconditioner
      assert not np.array_equal(stored.damping['w1'], previous.damping['w1']), t
    assert bool(stored.finite_samples)


def test_first_step_always_builds(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.scale_by_kwng(num_basis=5, update_every=4)
  state = opt.init(params)
  assert not bool(state.kwng_preconditioner.finite_samples)
  assert all(float(jnp.abs(w).max()) == 0.0 for w in jax.tree.leaves(state.kwng_preconditioner.whitened_rows))
  # Even a state whose count is not a multiple of k (a restored one, say)
  # builds at its first update: the placeholder is marked as not built.
  state = state._replace(kwng_count=jnp.asarray(2, jnp.int32))
  grads = jax.grad(loss_fn)(params)
  update = jax.jit(opt.update, static_argnames='outputs_fn')
  direction, state = update(grads, state, params, outputs_fn=outputs_fn)
  assert bool(state.kwng_preconditioner.finite_samples)
  expected = fresh_direction(outputs_fn, params, grads, count=2, seed=0)
  assert relative_error(direction, expected) < 1e-4


def test_nonfinite_samples_at_a_build_are_rebuilt_next_step(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = kwng_jax.scale_by_kwng(num_basis=5, update_every=10)
  grads = jax.grad(loss_fn)(params)
  bad_outputs = lambda p: outputs_fn(p).at[0, 0].set(jnp.nan)
  update = jax.jit(opt.update, static_argnames='outputs_fn')
  direction, state = update(grads, opt.init(params), params, outputs_fn=bad_outputs)
  assert all(bool(jnp.all(d == 0)) for d in jax.tree.leaves(direction))
  assert not bool(state.kwng_preconditioner.finite_samples)
  direction, state = update(grads, state, params, outputs_fn=outputs_fn)
  assert bool(state.kwng_preconditioner.finite_samples)
  assert bool(state.kwng_info.finite_inputs)
  assert relative_error(direction, fresh_direction(outputs_fn, params, grads, count=1, seed=0)) < 1e-4


@pytest.mark.parametrize('convolution_in', ['outputs_fn', 'jacobian_outputs_fn', None])
def test_update_every_warns_of_convolutions_on_cpu(convolution_in):
  """XLA:CPU runs convolutions inside lax.cond (the rebuild) far slower: the
  trace warns with update_every > 1 on CPU when the function the rebuild
  differentiates (jacobian_outputs_fn if given) holds one."""
  assert jax.default_backend() == 'cpu'
  images = jnp.ones((16, 6, 6, 1))
  params = {'w': jnp.ones((3, 3, 1, 2)) / 9.0}

  def convolutional(p):
    features = jax.lax.conv_general_dilated(
        images, p['w'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return features.mean(axis=(1, 2))

  def dense(p):
    return (images[..., :1] * p['w'][0, 0, 0][None, None, None, :]).mean(axis=(1, 2))

  functions = {
      'outputs_fn': convolutional if convolution_in == 'outputs_fn' else dense,
      'jacobian_outputs_fn': (
          convolutional if convolution_in == 'jacobian_outputs_fn' else dense),
  }
  opt = kwng_jax.scale_by_kwng(num_basis=2, update_every=2)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(lambda s: opt.update(grads, s, params, **functions))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    update.lower(opt.init(params))
  messages = [str(w.message) for w in caught if 'jax-ml/jax#12868' in str(w.message)]
  # A convolution in outputs_fn alone is not differentiated by the rebuild.
  assert len(messages) == int(convolution_in == 'jacobian_outputs_fn')
  # Without jacobian_outputs_fn, the rebuild differentiates outputs_fn.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    jax.jit(lambda s: opt.update(grads, s, params, outputs_fn=functions['outputs_fn'])).lower(
        opt.init(params))
  messages = [str(w.message) for w in caught if 'jax-ml/jax#12868' in str(w.message)]
  assert len(messages) == int(convolution_in == 'outputs_fn')
  # update_every=1 has no conditional, and no warning.
  plain = kwng_jax.scale_by_kwng(num_basis=2)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    jax.jit(lambda s: plain.update(grads, s, params, outputs_fn=convolutional)).lower(
        plain.init(params))


def test_default_state_stores_no_factors(mlp_problem):
  params, _, _ = mlp_problem
  state = kwng_jax.scale_by_kwng().init(params)
  assert state.kwng_preconditioner is None
  # Scalars only: count, epsilon and its setting, and the diagnostics.
  leaves = jax.tree.leaves(state)
  assert len(leaves) == 3 + len(kwng_jax.KWNGInfo._fields)
  assert all(leaf.shape == () for leaf in leaves)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_state_size_matches_the_formula(dtype):
  """update_every > 1 stores T̃ (M×P) and D (P) in at least float32, the
  M×M matrix T̃DT̃ᵀ, and five scalars; the default state is 32 bytes."""
  num_basis = 5
  params = mlp_params(jax.random.key(0), dims=(7, 6, 3), dtype=dtype)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  assert num_params == 7 * 6 + 6 + 6 * 3 + 3
  small = kwng_jax.scale_by_kwng(num_basis).init(params)
  # count, epsilon and its setting (int32, float32, float32); info:
  # bandwidth, rank, alignment, squared gradient norm (4 bytes each), and
  # four bool flags.
  assert tree_nbytes(small) == 4 + 4 + 4 + 4 * 4 + 4
  stored = kwng_jax.scale_by_kwng(num_basis, update_every=4).init(params)
  factor_bytes = 4  # float32 even for bfloat16 params
  # T̃ and D, the M×M matrix, bandwidth and rank, and three bool flags.
  formula = (num_basis + 1) * num_params * factor_bytes + num_basis**2 * 4 + 4 + 4 + 3
  assert tree_nbytes(stored) - tree_nbytes(small) == formula
  shapes = jax.eval_shape(
      kwng_jax.scale_by_kwng(num_basis, update_every=4).init,
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  assert jax.tree.structure(shapes) == jax.tree.structure(stored)
  assert tree_nbytes(shapes) == tree_nbytes(stored)


def test_stored_state_matches_a_built_preconditioner(mlp_problem):
  """The placeholder has the shapes and dtypes a build gives (else the
  lax.cond of update_every could not take either branch)."""
  params, outputs_fn, _ = mlp_problem
  empty = kwng_jax.Preconditioner.empty(params, 5)
  built = kwng_jax.build_preconditioner(outputs_fn, params, key=jax.random.key(0))
  same_type = lambda a, b: a.shape == b.shape and a.dtype == b.dtype
  assert jax.tree.all(jax.tree.map(same_type, empty, built))


def test_bad_amortization_options_fail_early():
  with pytest.raises(ValueError, match='update_every'):
    kwng_jax.scale_by_kwng(update_every=0)
  with pytest.raises(ValueError, match='jacobian_samples'):
    kwng_jax.scale_by_kwng(jacobian_samples=0)
  with pytest.raises(ValueError, match='jacobian_dtype'):
    kwng_jax.scale_by_kwng(jacobian_dtype=jnp.int32)


def test_too_many_jacobian_samples_are_named(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError, match=r'jacobian_samples=33.*N=32'):
    natural_gradient(grads, outputs_fn, params, key=jax.random.key(0),
                              jacobian_samples=33)
  with pytest.raises(ValueError, match='first jacobian_samples=8 rows'):
    natural_gradient(grads, outputs_fn, params, key=jax.random.key(0),
                              jacobian_samples=8, jacobian_outputs_fn=outputs_fn)


def subsample_problem(num_samples=64, num_rows=16):
  params = mlp_params(jax.random.key(0))
  inputs = jax.random.normal(jax.random.key(1), (num_samples, 3))
  targets = jax.random.normal(jax.random.key(2), (num_samples, 4))
  outputs_fn = lambda p: mlp_apply(p, inputs.astype(p['w1'].dtype))
  rows_fn = lambda p: mlp_apply(p, inputs[:num_rows].astype(p['w1'].dtype))
  grads = jax.grad(lambda p: jnp.mean(jnp.square(outputs_fn(p) - targets)))(params)
  return params, outputs_fn, rows_fn, grads


def test_jacobian_samples_of_the_whole_batch_is_the_default_path(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  grads = jax.grad(loss_fn)(params)
  key = jax.random.key(3)
  expected, _ = natural_gradient(grads, outputs_fn, params, key=key)
  got, _ = natural_gradient(grads, outputs_fn, params, key=key, jacobian_samples=32)
  assert relative_error(got, expected) < 1e-6


def test_subsample_is_the_sub_batch_estimate_with_the_batch_basis():
  """T, W and Q from the first n samples: with the basis among them and a
  fixed bandwidth, this is exactly KWNG on the sub-batch alone."""
  params, outputs_fn, rows_fn, grads = subsample_problem()
  indices, coords = kwng_jax.factors.select_basis(16, 4, 5, key=jax.random.key(0))
  pinned = dict(basis_indices=indices, basis_coords=coords, bandwidth=1.3, epsilon=1e-3)
  expected, _ = natural_gradient(grads, rows_fn, params, **pinned)
  sliced, _ = natural_gradient(grads, outputs_fn, params, jacobian_samples=16, **pinned)
  # The fast path: the VJPs run through a function of the 16 samples alone.
  fast, _ = natural_gradient(grads, outputs_fn, params, jacobian_outputs_fn=rows_fn,
                                      **pinned)
  assert relative_error(sliced, expected) < 1e-5
  assert relative_error(fast, expected) < 1e-5
  full, _ = natural_gradient(grads, outputs_fn, params, **pinned)
  assert relative_error(full, expected) > 1e-2  # the subsample did change T


def test_scale_by_kwng_passes_jacobian_outputs_fn_through():
  params, outputs_fn, rows_fn, grads = subsample_problem()
  opt = kwng_jax.scale_by_kwng(jacobian_samples=16, seed=1)
  update = jax.jit(opt.update, static_argnames=('outputs_fn', 'jacobian_outputs_fn'))
  sliced, _ = update(grads, opt.init(params), params, outputs_fn=outputs_fn)
  fast, _ = update(grads, opt.init(params), params, outputs_fn=outputs_fn,
                   jacobian_outputs_fn=rows_fn)
  assert relative_error(fast, sliced) < 1e-5


def test_bfloat16_vjps_differentiate_in_bfloat16_and_solve_in_float32():
  params, outputs_fn, _, grads = subsample_problem()
  seen = []

  def recording_fn(p):
    seen.append(p['w1'].dtype)
    return outputs_fn(p)

  pre = kwng_jax.build_preconditioner(recording_fn, params, key=jax.random.key(0),
                                      jacobian_dtype=jnp.bfloat16)
  assert jnp.bfloat16 in seen and jnp.float32 in seen  # VJP in bf16, samples in f32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(pre.whitened_rows))
  assert pre.gram.dtype == jnp.float32
  direction, _ = kwng_jax.apply_preconditioner(pre, grads, 1e-5)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(direction))


def test_bfloat16_vjps_are_close_to_the_float32_direction():
  """Stated tolerance: median relative error 2e-2 over bases (measured:
  about 5e-3, the worst of five about 4e-2)."""
  params, outputs_fn, _, grads = subsample_problem(num_samples=256)
  errors = []
  for seed in range(5):
    kw = dict(key=jax.random.key(seed), num_basis=5)
    exact_path, _ = natural_gradient(grads, outputs_fn, params, **kw)
    low, _ = natural_gradient(grads, outputs_fn, params, jacobian_dtype=jnp.bfloat16, **kw)
    errors.append(relative_error(low, exact_path))
  assert np.median(errors) < 2e-2, errors
  assert max(errors) < 1e-1, errors


CHOLESKY_ROWS, CHOLESKY_COLS = np.tril_indices(2)


@functools.partial(jax.jit, static_argnames=('jacobian_samples', 'jacobian_dtype'))
def cholesky_gaussian_direction(grads, theta, noise, key, **options):
  def outputs_fn(th):
    lower = jnp.zeros((2, 2), th.dtype).at[CHOLESKY_ROWS, CHOLESKY_COLS].set(th[2:])
    return th[:2][None, :] + noise.astype(th.dtype) @ lower.T

  return kwng_jax.natural_gradient(
      grads, outputs_fn, theta, key=key, num_basis=64, epsilon=1e-5,
      damping='identity', **options)


def test_amortized_paths_against_the_exact_wasserstein_gradient():
  """SPEC §1.5 Cholesky Gaussian, float32, N = 4096, M = 64: the target is
  (G_W + εI)⁻¹g. Stated tolerance 0.15 on the median over three draws
  (measured: full batch 0.04, T from 1024 samples 0.06, bf16 VJPs 0.06)."""
  num_samples, epsilon = 4096, 1e-5
  mu, a = np.array([0.3, -0.5]), np.array([[1.0, 0.0], [0.5, 0.8]])
  theta = jnp.asarray(np.concatenate([mu, a[CHOLESKY_ROWS, CHOLESKY_COLS]]), jnp.float32)
  g = np.random.default_rng(0).normal(size=theta.size)
  metric = references.cholesky_gaussian_metric(mu, a)
  target = np.linalg.solve(metric + epsilon * np.eye(theta.size), g)
  options = {'sub': dict(jacobian_samples=num_samples // 4),
             'bf16': dict(jacobian_dtype=jnp.bfloat16)}
  errors = {name: [] for name in options}
  for seed in range(3):
    noise = jax.random.normal(jax.random.key(seed), (num_samples, 2))
    for name, opts in options.items():
      direction, info = cholesky_gaussian_direction(
          jnp.asarray(g, jnp.float32), theta, noise, jax.random.key(100 + seed), **opts)
      assert not bool(info.fallback)
      errors[name].append(np.linalg.norm(np.asarray(direction) - target) / np.linalg.norm(target))
  for name, errs in errors.items():
    assert np.median(errs) < 0.15, (name, errs)


def test_amortization_benchmark_quick_writes_json(tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'amortization.py'), '--quick',
       '--out', str(tmp_path)],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads((tmp_path / 'amortization.json').read_text())
  methods = {row['name'] for row in data['methods']}
  assert {'sgd', 'kwng', 'kwng_update_every', 'kwng_subsample', 'kwng_bf16'} <= methods
  for row in data['methods']:
    assert row['step_ms'] > 0 and row['compile_s'] > 0
  assert data['memory']['factor_bytes'] == 5 * data['memory']['num_params'] * 4
  assert (tmp_path / 'amortization.png').stat().st_size > 0
