"""The unrolled Threefry draws: the bits of jax.random, with no loop on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kwng_jax._src import threefry

KEYS = {
    'typed': lambda: jax.random.key(5),
    'raw': lambda: jax.random.PRNGKey(5),
    'rbg': lambda: jax.random.key(5, impl='rbg'),
}


def key_words(key):
  return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


@pytest.mark.parametrize('partitionable', [True, False])
@pytest.mark.parametrize('kind', sorted(KEYS))
@pytest.mark.parametrize('num_words', [1, 2, 7, 153])
def test_random_words_are_the_bits_of_jax_random(partitionable, kind, num_words):
  with jax.threefry_partitionable(partitionable):
    key = KEYS[kind]()
    expected = jax.random.bits(key, (num_words,), jnp.uint32)
    np.testing.assert_array_equal(threefry.random_words(key, num_words), expected)
    traced = jax.jit(threefry.random_words, static_argnums=1)(key, num_words)
    np.testing.assert_array_equal(traced, expected)


@pytest.mark.parametrize('partitionable', [True, False])
@pytest.mark.parametrize('kind', sorted(KEYS))
def test_fold_in_is_that_of_jax_random(partitionable, kind):
  with jax.threefry_partitionable(partitionable):
    key = KEYS[kind]()
    for data in (0, 1, 12345, 2**31 + 5):
      folded = threefry.fold_in(key, data)
      expected = jax.random.fold_in(key, data)
      assert folded.dtype == expected.dtype
      np.testing.assert_array_equal(key_words(folded), key_words(expected))
    # A traced step count, as an optimizer folds it in.
    folded = jax.jit(threefry.fold_in)(key, jnp.int32(77))
    np.testing.assert_array_equal(key_words(folded), key_words(jax.random.fold_in(key, 77)))


def test_a_batch_of_keys_or_of_data_gets_jax_randoms_error():
  keys = jax.random.split(jax.random.key(0), 2)
  with pytest.raises(ValueError, match='single key'):
    threefry.random_words(keys, 4)
  with pytest.raises(TypeError, match='scalar'):
    threefry.fold_in(jax.random.key(0), jnp.arange(2, dtype=jnp.uint32))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='jax.random loops only on CPU')
@pytest.mark.parametrize('make_key', [jax.random.key, jax.random.PRNGKey])
def test_a_step_key_and_its_words_compile_without_a_loop_on_cpu(make_key):
  """The reason for the module: jax.random lowers Threefry to a loop on CPU."""

  def draw(count, fold_in, words):
    return words(fold_in(make_key(0), count), 153)

  def hlo(fold_in, words):
    lowered = jax.jit(lambda c: draw(c, fold_in, words)).lower(jnp.int32(3))
    return lowered.compile().as_text()

  reference = hlo(jax.random.fold_in, lambda k, n: jax.random.bits(k, (n,), jnp.uint32))
  assert ' while(' in reference  # If this fails, jax.random no longer loops here.
  assert ' while(' not in hlo(threefry.fold_in, threefry.random_words)
