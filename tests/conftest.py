"""Test configuration: strict JAX numerics and several fake CPU devices.

The device count must be set before JAX initialises its backends, so it is
done here, at import time of the test session.
"""

import contextlib
import importlib
import os
import pathlib

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_numpy_dtype_promotion', 'strict')
jax.config.update('jax_numpy_rank_promotion', 'raise')


@contextlib.contextmanager
def jax_option(name, value):
  """Sets a jax.config option for a block, restoring the previous value."""
  previous = jax.config.read(name)
  jax.config.update(name, value)
  try:
    yield
  finally:
    jax.config.update(name, previous)


@pytest.fixture
def enable_x64():
  """Runs a test with float64 enabled."""
  with jax_option('jax_enable_x64', True):
    yield


@pytest.fixture
def fast_compile():
  """For compile-bound smoke runs of the benchmarks: skips XLA's optimization passes."""
  with jax_option('jax_disable_most_optimizations', True):
    yield


@pytest.fixture
def bench(monkeypatch):
  """Imports a module of benchmarks/ (they import their sibling ``common``)."""
  benchmarks = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'
  monkeypatch.syspath_prepend(str(benchmarks))
  return importlib.import_module


@pytest.fixture
def standard_promotion():
  """Standard dtype promotion, for tests that run third-party code (optax's
  Adam bias correction, MultiSteps) that strict promotion rejects; kwng_jax's
  own code is checked under strict promotion everywhere else."""
  with jax.numpy_dtype_promotion('standard'):
    yield


def mlp_apply(params, inputs):
  """A two-layer tanh MLP: the small model the estimator tests differentiate."""
  hidden = jax.numpy.tanh(inputs @ params['w1'] + params['b1'][None, :])
  return hidden @ params['w2'] + params['b2'][None, :]


def mlp_params(key, dims=(3, 5, 4), dtype=jax.numpy.float32):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  d_in, d_hidden, d_out = dims
  return {
      'w1': jax.random.normal(k1, (d_in, d_hidden), dtype) / d_in**0.5,
      'b1': 0.1 * jax.random.normal(k2, (d_hidden,), dtype),
      'w2': jax.random.normal(k3, (d_hidden, d_out), dtype) / d_hidden**0.5,
      'b2': 0.1 * jax.random.normal(k4, (d_out,), dtype),
  }


@pytest.fixture
def solved_products(monkeypatch):
  """Records, for each call of solve.damped_natural_gradient, the
  ``gradient_products`` it got, T̃ D g recomputed from its rows, damping and
  grads, and those grads."""
  import kwng_jax  # pylint: disable=g-import-not-at-top
  jnp = jax.numpy
  received = []
  solve_fn = kwng_jax.solve.damped_natural_gradient

  def spy(g, rows, damping, gram, epsilon, unseen=None, *, gradient_products=None):
    want = jnp.stack([sum(jnp.vdot(r, d * x) for r, d, x in zip(
        jax.tree.leaves(row), jax.tree.leaves(damping), jax.tree.leaves(g))) for row in rows])
    received.append((gradient_products, want, g))
    return solve_fn(g, rows, damping, gram, epsilon, unseen, gradient_products=gradient_products)

  monkeypatch.setattr(kwng_jax.solve, 'damped_natural_gradient', spy)
  return received


@pytest.fixture
def mlp_problem():
  """(params, outputs_fn, grads) of a small MLP regression, in float32."""
  key = jax.random.key(0)
  k_params, k_inputs, k_targets = jax.random.split(key, 3)
  params = mlp_params(k_params)
  inputs = jax.random.normal(k_inputs, (32, 3))
  targets = jax.random.normal(k_targets, (32, 4))

  def outputs_fn(p):
    return mlp_apply(p, inputs.astype(p['w1'].dtype))

  def loss_fn(p):
    return jax.numpy.mean(jax.numpy.square(outputs_fn(p) - targets.astype(p['w1'].dtype)))

  return params, outputs_fn, loss_fn
