"""Property-based tests: for any batch, M, sample shape, dtype and scale, the
update is finite and typed like the params, the state keeps its shapes,
dtypes and shardings, and jit equals eager (up to rounding amplified by the
conditioning of the Gram matrix; see that test).

Few examples, drawn deterministically, over a handful of shapes, so that
the compilations stay within about two minutes of CI time.
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kwng_jax
from kwng_jax import factors
from kwng_jax import kernels

from conftest import jax_option

SETTINGS = hypothesis.settings(
    max_examples=12, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=list(hypothesis.HealthCheck),
)

TAILS = [(), (3,), (2, 2, 2)]  # samples (N,), (N, d), (N, C, H, W)


@st.composite
def problems(draw, dtypes=(jnp.bfloat16, jnp.float16, jnp.float32)):
  num_samples = draw(st.sampled_from([8, 16]))
  return {
      'num_samples': num_samples,
      'num_basis': draw(st.integers(1, 6)),
      'tail': draw(st.sampled_from(TAILS)),
      'dtype': draw(st.sampled_from(dtypes)),
      'scale': 10.0 ** draw(st.integers(-8, 8)),
      'optimizer': draw(st.sampled_from(['kwng', 'published_kwng'])),
  }


def build(problem, with_outputs_fn=False):
  """(opt, params, step[, outputs_fn]) of a problem: a KWNG step of a tanh regression."""
  dtype, tail = problem['dtype'], problem['tail']
  width = int(np.prod(tail)) if tail else 1
  n = problem['num_samples']
  x = jax.random.normal(jax.random.key(0), (n, 3)).astype(dtype)
  y = jax.random.normal(jax.random.key(1), (n, width)).astype(dtype)
  params = {'w': (0.5 * jax.random.normal(jax.random.key(2), (3, width))).astype(dtype),
            'b': jnp.zeros((width,), dtype)}
  scale = jnp.asarray(problem['scale'], dtype)

  def outputs_fn(p):
    out = scale * jnp.tanh(x @ p['w'] + p['b'][None, :])
    return out.reshape((n,) + tail)

  def loss_fn(p):
    residual = jnp.tanh(x @ p['w'] + p['b'][None, :]) - y
    return jnp.mean(jnp.square(residual.astype(jnp.float32)))

  epsilon = problem.get('epsilon', 1e-5)
  if problem['optimizer'] == 'kwng':
    opt = kwng_jax.kwng(num_basis=problem['num_basis'], epsilon=epsilon)
  else:
    opt = kwng_jax.published_kwng(0.1, num_basis=problem['num_basis'], epsilon=epsilon)

  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)

  if with_outputs_fn:
    return opt, params, step, outputs_fn
  return opt, params, step


def signature(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)


def check_step(problem):
  opt, params, step = build(problem)
  state = opt.init(params)
  updates, new_state = jax.jit(step)(params, state)
  for update, param in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert update.dtype == param.dtype
    assert bool(jnp.all(jnp.isfinite(update.astype(jnp.float32))))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert signature(new_state) == signature(state)
  # A second step from the new state: the state is reusable as it is.
  updates, _ = jax.jit(step)(optax.apply_updates(params, updates), new_state)
  assert all(bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))
             for u in jax.tree.leaves(updates))
  return updates


@SETTINGS
@hypothesis.given(problems())
def test_update_is_finite_typed_like_params_and_state_is_stable(problem):
  check_step(problem)


@SETTINGS
@hypothesis.given(problems(dtypes=(jnp.float64,)))
def test_float64_under_x64(problem):
  with jax_option('jax_enable_x64', True):
    check_step(problem)


def gram_condition_number(problem, params, outputs_fn):
  """κ(Q) of the first step's basis (the key scale_by_kwng derives at step 0)."""
  samples = factors.as_sample_matrix(outputs_fn(params)).astype(jnp.float32)
  indices, coords = factors.select_basis(
      samples.shape[0], samples.shape[1], problem['num_basis'],
      key=jax.random.fold_in(jax.random.key(0), 0))
  basis = samples[indices]
  bandwidth = kernels.select_bandwidth('mean_distance', basis, samples, jnp.zeros(()))
  gram = factors.basis_gradient_gram(
      factors.cross_derivatives(kernels.gaussian, basis, coords, samples, bandwidth))
  eigenvalues = np.linalg.eigvalsh(np.asarray(gram, np.float64))
  return eigenvalues.max() / max(eigenvalues.min(), 1e-300)


@hypothesis.settings(SETTINGS, max_examples=6)
@hypothesis.given(problems(dtypes=(jnp.float32,)))
def test_jit_equals_eager_in_float32(problem):
  """To 1e-5 relative, plus float32 rounding amplified by κ(Q).

  The whitening by Q^{-1/2} amplifies rounding by the condition number of
  the M×M Gram Q (close basis points in one dimension give κ of 1e4–1e7),
  and jit and eager round differently (XLA fuses and reorders); measured,
  the difference stays below 10 ε_32 κ(Q).
  """
  opt, params, step, outputs_fn = build(problem, with_outputs_fn=True)
  state = opt.init(params)
  jitted, _ = jax.jit(step)(params, state)
  eager, _ = step(params, state)
  flat_jit = jnp.concatenate([u.ravel() for u in jax.tree.leaves(jitted)])
  flat_eager = jnp.concatenate([u.ravel() for u in jax.tree.leaves(eager)])
  error = float(jnp.linalg.norm(flat_jit - flat_eager))
  size = float(jnp.linalg.norm(flat_eager))
  kappa = gram_condition_number(problem, params, outputs_fn)
  tolerance = 1e-5 + 100 * float(jnp.finfo(jnp.float32).eps) * kappa
  assert error <= tolerance * size + 1e-30, (error / size, kappa)
