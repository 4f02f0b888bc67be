"""Clipping to a global norm computed without overflow."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kwng_jax import solve
from kwng_jax._src import options


def entry_scale(tree) -> jax.Array:
  """The largest ``|entry|`` of a pytree, in at least float32; 1 if all are 0.

  Dividing by it before squaring keeps squares and their sums from
  overflowing or underflowing, whatever the dtype and the units.
  """
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  dtype = solve.at_least_float32(*(x.dtype for x in leaves))
  largest = jnp.max(jnp.stack(
      [jnp.max(jnp.abs(x), initial=0).astype(dtype) for x in leaves]))
  return jnp.where(largest > 0, largest, jnp.ones_like(largest))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  r"""Scales updates down to global norm ``max_norm``, computed without overflow.

  Like ``optax.clip_by_global_norm``, but the norm is accumulated in at
  least float32 after dividing by the largest entry, and the scaling is
  applied in at least float32. In float16, the KWNG direction (norms of
  1e3–1e4) squared overflows; so does a float32 loss scaled by 1e15. With
  ``optax.clip_by_global_norm`` both give a zero update.

  Args:
    max_norm: the largest global norm of an update, > 0.

  Returns:
    An ``optax.GradientTransformation`` (stateless).

  Example:
    >>> import jax.numpy as jnp
    >>> import kwng_jax
    >>> clip = kwng_jax.clip_by_global_norm(1.0)
    >>> updates, _ = clip.update({'w': jnp.full(4, 1e4, jnp.float16)}, clip.init(None))
    >>> updates['w'].tolist()
    [0.5, 0.5, 0.5, 0.5]
  """
  options.check_positive('max_norm', max_norm)

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    dtype = solve.at_least_float32(*(u.dtype for u in leaves))
    safe_largest = entry_scale(updates)
    norm = safe_largest * jnp.sqrt(sum(
        jnp.sum(jnp.square(u.astype(dtype) / safe_largest)) for u in leaves))
    scale = jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
    updates = jax.tree.map(
        lambda u: (u.astype(dtype) * scale).astype(u.dtype), updates)
    return updates, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
