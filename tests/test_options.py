"""Every option is validated when the optimizer is built, whatever its type."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kwng_jax
from kwng_jax._src import options

NEGATIVE = [-1.0, np.float32(-1), jnp.array(-1.0)]


@pytest.mark.parametrize('value', NEGATIVE + [0.0, float('nan'), '1e-5', jnp.ones(2)])
def test_epsilon_must_be_a_finite_positive_scalar(value):
  with pytest.raises(ValueError, match='epsilon'):
    kwng_jax.kwng(epsilon=value)
  with pytest.raises(ValueError, match='epsilon'):
    kwng_jax.scale_by_kwng(epsilon=value)


@pytest.mark.parametrize('value', NEGATIVE + [0.0])
def test_published_max_norm_must_be_positive(value):
  # A negative max_norm would flip the step into gradient ascent.
  with pytest.raises(ValueError, match='max_norm'):
    kwng_jax.published_kwng(0.1, max_norm=value)


@pytest.mark.parametrize('name, value', [
    ('ridge', -1.0), ('ridge', np.float32(-1)), ('ridge', jnp.array(-1.0)),
    ('rcond', -0.1), ('rcond', 1.5), ('rcond', jnp.array(-1.0)),
    ('bandwidth', -1.0), ('bandwidth', jnp.array(0.0)), ('bandwidth', float('inf')),
    ('bandwidth', 'widest'), ('log_bandwidth', float('nan')),
    ('log_bandwidth', jnp.array(jnp.inf)), ('damping', 'strong'), ('kernel', 'laplace'),
    ('kernel', 42), ('seed', 1.5), ('update_every', 0), ('update_every', jnp.array(2)),
    ('jacobian_samples', 0), ('jacobian_samples', 2.5), ('jacobian_dtype', jnp.int32),
])
def test_bad_options_name_themselves_at_construction(name, value):
  with pytest.raises(ValueError, match=name):
    kwng_jax.kwng(**{name: value})


@pytest.mark.parametrize('value', [2.5, 0, -1, '5', True, jnp.array(5)])
def test_num_basis_must_be_a_python_int(value):
  with pytest.raises(ValueError, match='num_basis'):
    kwng_jax.scale_by_kwng(num_basis=value)


def test_num_basis_accepts_numpy_integers():
  kwng_jax.scale_by_kwng(num_basis=np.int64(5))


@pytest.mark.parametrize('value', [-1.0, float('nan'), '1', jnp.array(-0.1)])
def test_learning_rate_must_be_positive_or_a_schedule(value):
  with pytest.raises(ValueError, match='learning_rate'):
    kwng_jax.kwng(value)
  with pytest.raises(ValueError, match='learning_rate'):
    kwng_jax.published_kwng(value)


def test_a_schedule_is_a_valid_learning_rate():
  kwng_jax.kwng(optax.cosine_decay_schedule(1.0, 100))


def test_inject_hyperparams_without_static_num_basis_names_static_args(mlp_problem):
  params, outputs_fn, loss_fn = mlp_problem
  opt = optax.inject_hyperparams(kwng_jax.kwng)(learning_rate=0.5, num_basis=5)
  with pytest.raises(ValueError, match='static_args'):
    state = opt.init(params)
    jax.jit(lambda s: opt.update(
        jax.grad(loss_fn)(params), s, params, outputs_fn=outputs_fn,
        value=loss_fn(params)))(state)


def test_adaptive_damping_options_are_checked():
  inner = kwng_jax.scale_by_kwng()
  for name, value in [('window', 0), ('factor', 1.5), ('ratio_scale', -1.0),
                      ('min_epsilon', 0.0)]:
    with pytest.raises(ValueError, match=name):
      kwng_jax.adaptive_damping(inner, **{name: value})


def test_traced_options_are_checked_inside_the_computation():
  valid = jax.jit(lambda e, r, c: options.traced_options_valid(
      epsilon=e, ridge=r, rcond=c))
  assert bool(valid(1e-3, 0.0, 0.5))
  assert not bool(valid(-1e-3, 0.0, 0.5))
  assert not bool(valid(1e-3, -1.0, 0.5))
  assert not bool(valid(1e-3, 0.0, 1.0))
  assert not bool(valid(jnp.nan, 0.0, 0.5))


@pytest.mark.parametrize('function', ['natural_gradient', 'build_preconditioner',
                                      'preconditioner_from_vjp'])
def test_estimator_functions_check_their_keyword_options(function):
  x = jnp.ones((8, 2))
  params = {'w': jnp.ones((2, 3))}
  outputs_fn = lambda p: x @ p['w']
  samples, vjp_fn = jax.vjp(outputs_fn, params)
  first = {'natural_gradient': (params, outputs_fn, params),
           'build_preconditioner': (outputs_fn, params),
           'preconditioner_from_vjp': (samples, vjp_fn)}[function]
  call = getattr(kwng_jax, function)
  # A misspelt option names the function and lists the valid ones.
  with pytest.raises(TypeError, match=rf"{function}\(\) got an unexpected keyword argument "
                     r"'num_basi'; its options are \['num_basis'"):
    call(*first, key=jax.random.key(0), num_basi=2)
  # A bad value is checked by the one shared validation, naming the option.
  with pytest.raises(ValueError, match='ridge'):
    call(*first, key=jax.random.key(0), ridge=-1.0)
  # And a good one reaches the estimator: the basis size sets the factor's rows.
  result = call(*first, key=jax.random.key(0), num_basis=3)
  if function == 'natural_gradient':
    assert result[0]['w'].shape == (2, 3)
  else:
    assert len(result.whitened_rows) == 3
