"""clip_by_global_norm: the global norm without overflow, in any dtype."""

import jax.numpy as jnp
import numpy as np
import pytest

import kwng_jax


@pytest.mark.parametrize('dtype, value', [
    (jnp.float16, 1e4),    # squares overflow float16
    (jnp.float32, 1e20),   # squares overflow float32
    (jnp.float32, 1e-25),  # squares underflow float32
])
def test_clips_to_the_global_norm_without_overflow(dtype, value):
  clip = kwng_jax.clip_by_global_norm(1.0)
  updates = {'a': jnp.full((3,), value, dtype), 'b': jnp.full((1,), -value, dtype)}
  clipped, _ = clip.update(updates, clip.init(None))
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(u, np.float64))) for u in clipped.values()))
  expected = min(1.0, 2.0 * value)  # the norm of four entries of size value
  assert all(u.dtype == dtype for u in clipped.values())
  np.testing.assert_allclose(norm, expected, rtol=1e-2)
  np.testing.assert_array_equal(np.sign(np.asarray(clipped['b'], np.float32)), [-1.0])


def test_small_updates_pass_unchanged():
  clip = kwng_jax.clip_by_global_norm(1.0)
  updates = {'a': jnp.array([0.1, -0.2]), 'b': jnp.array([0.3])}
  clipped, _ = clip.update(updates, clip.init(None))
  for key in updates:
    np.testing.assert_array_equal(clipped[key], updates[key])


def test_max_norm_must_be_positive():
  with pytest.raises(ValueError, match='max_norm'):
    kwng_jax.clip_by_global_norm(-1.0)
