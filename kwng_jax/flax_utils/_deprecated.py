"""The replay API of kwng_jax 0.2, deprecated: use :func:`value_grad_and_vjp`.

``replay_outputs_fn`` wrapped a VJP already computed in a ``custom_vjp`` so
that KWNG could run ``jax.vjp`` on it again; a replay cannot be
differentiated in forward mode, so :func:`kwng_jax.kwng` (which takes a
``jax.jvp``) could not use it. ``samples_and_vjp=`` replaces it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
import warnings

import jax

from kwng_jax.flax_utils import _helpers

PyTree = Any


def _warn(old: str, new: str) -> None:
  warnings.warn(
      f'flax_utils.{old} is deprecated since kwng_jax 0.3.0: use '
      f'flax_utils.{new} and pass samples_and_vjp= to the update.',
      DeprecationWarning,
      stacklevel=3,
  )


def replay_outputs_fn(
    samples: jax.Array, vjp_fn: Callable[[jax.Array], tuple[PyTree]]
) -> Callable[[PyTree], jax.Array]:
  """An ``outputs_fn`` that replays a forward pass already differentiated.

  ``outputs_fn(params)`` returns ``samples`` and back-propagates through
  ``vjp_fn``, the pair ``jax.vjp(f, params)`` returned: KWNG then reuses that
  forward pass instead of running ``f`` again. It is valid only at the
  ``params`` the pair was computed at, which is where an optimizer update
  evaluates it.

  Args:
    samples: ``f(params)``.
    vjp_fn: the VJP function of ``f`` at ``params``.

  Returns:
    ``outputs_fn(params) -> samples`` whose VJP is ``vjp_fn``; its cotangents
    take the pytree structure of the ``params`` it is called with (so the
    ``Variable`` wrappers of an NNX state may differ), with the same leaves.

  Deprecated: pass ``samples_and_vjp=(samples, vjp_fn)`` to the update.
  """
  _warn('replay_outputs_fn', 'value_grad_and_vjp')

  def outputs_fn(params: PyTree) -> jax.Array:
    treedef = jax.tree.structure(params)

    @jax.custom_vjp
    def replay(params_):
      del params_
      return samples

    def replay_fwd(params_):
      del params_
      return samples, None

    def replay_bwd(residuals, cotangent):
      del residuals
      (param_cotangent,) = vjp_fn(cotangent)
      leaves = jax.tree.leaves(param_cotangent)
      if len(leaves) != treedef.num_leaves:
        raise ValueError(
            'replay_outputs_fn was called with params of '
            f'{treedef.num_leaves} leaves, but its vjp_fn returns '
            f'{len(leaves)}: call it with the params the forward pass was '
            'differentiated at.'
        )
      called = [x.dtype for x in jax.tree.leaves(params)]
      replayed = [x.dtype for x in leaves]
      if called != replayed:
        # KWNG's jacobian_dtype casts the params: a replay would silently
        # differentiate the recorded float32 pass instead.
        raise ValueError(
            'replay_outputs_fn replays a forward pass recorded with params of '
            f'dtypes {sorted(set(map(str, replayed)))}; it was called with '
            f'{sorted(set(map(str, called)))}. With jacobian_dtype, pass '
            'jacobian_outputs_fn=lambda p: model(p, x), a function that runs '
            'the model in the dtype of its params.'
        )
      return (jax.tree.unflatten(treedef, leaves),)

    replay.defvjp(replay_fwd, replay_bwd)
    return replay(params)

  return outputs_fn


def value_grad_and_outputs_fn(
    *args: Any, **kwargs: Any
) -> tuple[Any, PyTree, Callable[[PyTree], jax.Array]]:
  """Deprecated: :func:`value_grad_and_vjp` (same arguments), with a replayed ``outputs_fn``."""
  _warn('value_grad_and_outputs_fn', 'value_grad_and_vjp')
  return _replayed(*_helpers.value_grad_and_vjp(*args, **kwargs))


def nnx_value_grad_and_outputs_fn(
    *args: Any, **kwargs: Any
) -> tuple[jax.Array, Any, Callable[[PyTree], jax.Array]]:
  """Deprecated: :func:`nnx_value_grad_and_vjp` (same arguments), with a replayed ``outputs_fn``."""
  _warn('nnx_value_grad_and_outputs_fn', 'nnx_value_grad_and_vjp')
  return _replayed(*_helpers.nnx_value_grad_and_vjp(*args, **kwargs))


def _replayed(
    loss: Any, grads: Any, samples_and_vjp: tuple[jax.Array, Callable[[jax.Array], tuple[PyTree]]]
) -> tuple[Any, Any, Callable[[PyTree], jax.Array]]:
  """The result of the 0.2 API: the pair ``(samples, vjp_fn)`` as a replay."""
  with warnings.catch_warnings():
    # Already warned about, under the name the caller used.
    warnings.simplefilter('ignore', DeprecationWarning)
    return loss, grads, replay_outputs_fn(*samples_and_vjp)
