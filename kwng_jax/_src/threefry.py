"""``jax.random.bits`` and ``jax.random.fold_in`` of Threefry keys, unrolled.

On CPU, JAX lowers the Threefry-2x32 hash to a loop of five iterations.
KWNG's draws are small (N + M + a few dozen words a step, after folding
the step count into the key), so the loops cost more than their
arithmetic: the fold and the draw alone took 24 μs (dispatch included)
and 0.18 s to compile on a 2-core CPU. Written out in ``jnp``, each
hash's 20 rounds fuse into one elementwise kernel: 6 μs and 0.09 s. In
the digits MLP's step that is 0.06 ms less. The results are bit for bit those of ``jax.random`` (under
either value of ``jax_threefry_partitionable``, for draws of fewer than
2^32 words), so seeds keep their meaning. Keys of other implementations,
batches of keys, larger draws and non-scalar data go to ``jax.random``,
which also raises its own errors for them.

References:
  Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
  SC 2011 (Threefry-2x32, 20 rounds).
"""

import jax
import jax.numpy as jnp
import numpy as np

_U32 = np.uint32
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = _U32(0x1BD11BDA)


def _threefry_2x32(
    key_words: jax.Array, x0: jax.Array, x1: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 hash (20 rounds) of the counters ``(x0, x1)``."""
  k0, k1 = key_words[0], key_words[1]
  schedule = (k0, k1, k0 ^ k1 ^ _KEY_PARITY)
  x0, x1 = x0 + schedule[0], x1 + schedule[1]
  for block in range(5):
    for rotation in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = x0 ^ ((x1 << _U32(rotation)) | (x1 >> _U32(32 - rotation)))
    x0 = x0 + schedule[(block + 1) % 3]
    x1 = x1 + schedule[(block + 2) % 3] + _U32(block + 1)
  return x0, x1


def _threefry_key_words(key: jax.Array) -> jax.Array | None:
  """A single Threefry key's two uint32 words; None for anything else."""
  typed = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
  if typed.shape or str(jax.random.key_impl(typed)) != 'threefry2x32':
    return None
  return jax.random.key_data(typed)


def random_words(key: jax.Array, num_words: int) -> jax.Array:
  """``jax.random.bits(key, (num_words,), jnp.uint32)``, as one fused kernel for Threefry keys."""
  key_words = _threefry_key_words(key)
  if key_words is None or num_words >= 2**32:
    return jax.random.bits(key, (num_words,), jnp.uint32)
  counters = jnp.arange(num_words, dtype=jnp.uint32)
  if jax.threefry_partitionable.value:
    # The counter of word i is the 64-bit integer i: high word 0, low word i.
    high, low = _threefry_2x32(key_words, jnp.zeros_like(counters), counters)
    return high ^ low
  # The counters 0..n-1 (padded with a 0 to even length) split in halves.
  if num_words % 2:
    counters = jnp.concatenate([counters, jnp.zeros((1,), jnp.uint32)])
  half = counters.shape[0] // 2
  first, second = _threefry_2x32(key_words, counters[:half], counters[half:])
  return jnp.concatenate([first, second])[:num_words]


def fold_in(key: jax.Array, data: int | jax.Array) -> jax.Array:
  """``jax.random.fold_in(key, data)``, as one fused kernel for Threefry keys."""
  key_words = _threefry_key_words(key)
  if key_words is None or np.ndim(data):
    return jax.random.fold_in(key, data)
  # fold_in hashes the 64-bit seed of ``data``: high word 0, low word data.
  low = jnp.uint32(data)[None]
  first, second = _threefry_2x32(key_words, jnp.zeros_like(low), low)
  words = jnp.concatenate([first, second])
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(words, impl=jax.random.key_impl(key))
  return words
