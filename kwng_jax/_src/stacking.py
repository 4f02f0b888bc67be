r"""One backward pass for the gradient and T: :func:`value_grad_and_update`.

A KWNG step needs :math:`g = J^\top \nabla_X \ell` and the M rows of T, each
:math:`J^\top` applied to a kernel cotangent. Stacked, the M + 1 cotangents
go through one batched backward pass (on accelerators) or share one forward
pass (on CPUs, where the VJPs run as a loop). The transformation must know
its basis before the gradient exists, so the helper draws it with the
transformation's own options and key, and hands the built preconditioner to
its update.

References:
  Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
  ICLR 2020 (arXiv 1910.09652).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any
import weakref

import jax
import optax
import optax.tree_utils as otu

from kwng_jax._src import from_vjp
from kwng_jax._src import options as options_lib
from kwng_jax._src import outputs as outputs_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Stacking:
  """What :func:`value_grad_and_update` needs of a KWNG transformation."""

  options: options_lib.EstimatorOptions
  seed: int


# The transformations that can take a stacked step, by their update function
# (a chain or wrapper around one KWNG transformation registers itself too).
_REGISTRY: weakref.WeakKeyDictionary[Callable[..., Any], Stacking] = (
    weakref.WeakKeyDictionary())


def register(transformation: optax.GradientTransformation, stacking: Stacking) -> None:
  """Marks ``transformation`` as one whose single KWNG step can be stacked."""
  _REGISTRY[transformation.update] = stacking


def stacking_of(transformation: optax.GradientTransformation) -> Stacking | None:
  return _REGISTRY.get(transformation.update)


def value_grad_and_update(
    loss_fn: Callable[..., Any],
    outputs_fn: Callable[[PyTree], Any],
    tx: optax.GradientTransformation,
    params: PyTree,
    opt_state: optax.OptState,
    *,
    has_aux: bool = False,
    **extra_args: Any,
) -> tuple[Any, PyTree, PyTree, optax.OptState]:
  r"""The loss, its gradient and the optimizer's update, from one forward pass.

  With samples :math:`X = f(\theta)` (``outputs_fn``) and a loss
  :math:`L = \ell(X, \theta)` (``loss_fn``, which may also use parameters
  directly, e.g. a learned noise scale), the gradient is
  :math:`\nabla_\theta L = J_f^\top \nabla_X \ell + \partial_\theta \ell`.
  For :func:`kwng_jax.kwng`, :func:`kwng_jax.published_kwng` and
  :func:`kwng_jax.scale_by_kwng` (without ``update_every``,
  ``jacobian_samples`` or ``jacobian_dtype``), :math:`\nabla_X \ell` is
  stacked with the M kernel cotangents of T: one batched backward pass
  (``jacobian_batching='vmap'``) gives the gradient and T together. Any
  other transformation gets the same ``(grads, updates)`` from an ordinary
  backward pass; its update gets ``outputs_fn``, ``samples_and_vjp``,
  ``value`` and ``extra_args``.

  Args:
    loss_fn: ``(samples, params) -> loss``.
    outputs_fn: ``params -> samples`` of shape ``(N, ...)``, or ``params ->
      (samples, aux)`` with ``has_aux=True`` (e.g. Linen's ``apply(...,
      mutable=['batch_stats'])``), as for
      :func:`kwng_jax.flax_utils.value_grad_and_vjp`.
    tx: the optimizer.
    params: the parameters.
    opt_state: ``tx``'s state.
    has_aux: whether ``outputs_fn`` returns an auxiliary output.
    **extra_args: more keyword arguments of ``tx.update``, e.g.
      ``jacobian_outputs_fn`` for ``jacobian_samples``.

  Returns:
    ``(value, grads, updates, opt_state)``, with ``value`` the loss, or
    ``(loss, aux)`` with ``has_aux``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kwng_jax
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> y = jnp.sin(x[:, :1])
    >>> params = {'w': jnp.zeros((3, 1)), 'log_sigma': jnp.zeros(())}
    >>> outputs_fn = lambda p: jnp.tanh(x @ p['w'])
    >>> def loss_fn(samples, p):  # a Gaussian likelihood with a learned scale
    ...   sigma2 = jnp.exp(2 * p['log_sigma'])
    ...   return jnp.mean((samples - y) ** 2) / (2 * sigma2) + p['log_sigma']
    >>> tx = kwng_jax.kwng()
    >>> state = tx.init(params)
    >>> loss, grads, updates, state = kwng_jax.value_grad_and_update(
    ...     loss_fn, outputs_fn, tx, params, state)
    >>> params = optax.apply_updates(params, updates)
    >>> float(grads['log_sigma'])  # the direct dependence counts: 1 - 2 L_data
    0.6...

  References:
    Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
    ICLR 2020 (arXiv 1910.09652).
  """
  if has_aux:
    samples, vjp_fn, aux = jax.vjp(outputs_fn, params, has_aux=True)
  else:
    samples, vjp_fn = jax.vjp(outputs_fn, params)
  loss, (loss_cotangent, direct) = jax.value_and_grad(loss_fn, argnums=(0, 1))(samples, params)
  stacking = stacking_of(tx)
  # The update's outputs_fn returns the samples alone.
  samples_fn = _samples_of(outputs_fn) if has_aux else outputs_fn
  extra = dict(extra_args, outputs_fn=samples_fn)
  if stacking is not None and stacking.options.jacobian_samples == 'auto':
    resolved, _ = outputs_lib.resolve_jacobian_rows(stacking.options, samples_fn, None)
    if resolved.jacobian_samples is not None:
      # T from the first rows alone costs less than its rows of the whole batch.
      stacking = None
  if stacking is None:
    (through_samples,) = vjp_fn(loss_cotangent)
  else:
    count = otu.tree_get(opt_state, 'kwng_count')
    preconditioner, through_samples = from_vjp.from_vjp_with_pullback(
        samples, vjp_fn, stacking.options, loss_cotangent,
        key=from_vjp.basis_key(stacking.seed, count),
        diagonal_average=otu.tree_get(opt_state, 'kwng_metric_diagonal'),
        # The grads below: the KWNG step comes first in tx and sees them.
        direct_grads=direct)
    extra['preconditioner'] = preconditioner
  grads = jax.tree.map(lambda a, b: a + b, through_samples, direct)
  updates, opt_state = optax.with_extra_args_support(tx).update(
      grads, opt_state, params, samples_and_vjp=(samples, vjp_fn), value=loss, **extra)
  return ((loss, aux) if has_aux else loss), grads, updates, opt_state


def _samples_of(outputs_fn: Callable[[PyTree], Any]) -> Callable[[PyTree], Any]:
  """``params -> samples`` of an ``outputs_fn`` that returns ``(samples, aux)``.

  A :class:`kwng_jax.BatchOutputsFn` stays one, so that T can still come
  from the first rows of the batch.
  """
  if isinstance(outputs_fn, outputs_lib.BatchOutputsFn):
    apply_fn = outputs_fn.apply_fn
    return outputs_lib.BatchOutputsFn(
        lambda params, *inputs, **kwargs: apply_fn(params, *inputs, **kwargs)[0],
        outputs_fn.inputs, outputs_fn.kwargs)
  return lambda params: outputs_fn(params)[0]
