"""The Flax helpers; import them from :mod:`kwng_jax.flax_utils`."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

from flax import nnx
from flax.training import train_state
import jax
import optax

import kwng_jax

PyTree = Any


def nnx_outputs_fn(
    model: nnx.Module, *args: Any, wrt: Any = nnx.Param, **kwargs: Any
) -> Callable[[PyTree], jax.Array]:
  """``outputs_fn`` for an NNX model: ``params -> model(*args, **kwargs)``.

  Snapshots the model's non-``wrt`` state (BatchNorm statistics, RNG
  counters, constants) and returns a pure function of the ``wrt`` state, the
  ``params`` that ``nnx.Optimizer.update`` passes to the Optax update. Each
  call rebuilds a copy of the model with ``nnx.merge`` and discards whatever
  that copy mutates, so the KWNG forward pass never updates BatchNorm running
  averages: after a step they are those of the loss's forward pass alone.

  Call it *before* the loss's forward pass: the snapshot then holds the RNG
  counters that pass starts from, so a stochastic model (dropout) gives KWNG
  the same samples the loss saw. BatchNorm in train mode normalizes with the
  batch statistics, so the snapshot's running averages do not change the
  samples.

  Args:
    model: the NNX model, in the mode (``model.train()`` / ``model.eval()``)
      the loss uses.
    *args: the inputs of the batch, passed to ``model``.
    wrt: the filter of the trained variables; must match the optimizer's
      ``wrt``.
    **kwargs: keyword arguments passed to ``model``.

  Returns:
    ``outputs_fn(params) -> model(*args, **kwargs)``, where ``params`` is the
    ``wrt`` state of the model (with or without its ``Variable`` wrappers):
    a :class:`kwng_jax.BatchOutputsFn`, which can also run the model on the
    first rows of the batch alone (``kwng_jax.kwng()`` computes T from 32).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import kwng_jax
    >>> from kwng_jax import flax_utils
    >>> model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, kwng_jax.published_kwng(0.1), wrt=nnx.Param)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> y = jnp.arange(16) % 4
    >>> def loss_fn(model):
    ...   logits = model(x)
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    >>> @nnx.jit
    ... def train_step(model, optimizer):
    ...   outputs_fn = flax_utils.nnx_outputs_fn(model, x)
    ...   loss, grads = nnx.value_and_grad(loss_fn)(model)
    ...   optimizer.update(model, grads, outputs_fn=outputs_fn, value=loss)
    ...   return loss
    >>> losses = [float(train_step(model, optimizer)) for _ in range(5)]
    >>> losses[-1] < losses[0]
    True
  """
  graphdef, _, rest = _split_pure(model, wrt)

  def apply(params: PyTree, *inputs: Any, **keywords: Any) -> jax.Array:
    copy = nnx.merge(graphdef, nnx.as_pure(params), rest)
    return copy(*inputs, **keywords)

  return kwng_jax.batch_outputs_fn(apply, *args, **kwargs)


def _split_pure(model: Any, wrt: Any) -> tuple[Any, Any, Any]:
  """The model's graph, its ``wrt`` state, and the rest of its state as plain arrays.

  Plain arrays, not the model's Variables: ``nnx.merge`` then builds fresh
  Variables, whose mutation (inside ``jax.vjp``) cannot reach the model.
  """
  graphdef, params, rest = nnx.split(model, wrt, ...)  # type: ignore[misc]
  return graphdef, params, nnx.as_pure(rest)


def value_grad_and_vjp(
    loss_from_outputs: Callable[[jax.Array], jax.Array],
    outputs_fn: Callable[[PyTree], Any],
    params: PyTree,
    *,
    has_aux: bool = False,
) -> tuple[Any, PyTree, tuple[jax.Array, Callable[[jax.Array], tuple[PyTree]]]]:
  r"""The loss, its gradient and the forward pass KWNG needs, from one ``jax.vjp``.

  With :math:`X = f(\theta)` (``outputs_fn``) and :math:`L = \ell(X)`
  (``loss_from_outputs``), runs ``jax.vjp`` of :math:`f` once and returns
  :math:`L`, :math:`\nabla_\theta L = J_f^\top \nabla_X \ell` and the pair
  ``(samples, vjp_fn)``. Pass it to the update as ``samples_and_vjp=``:
  KWNG then builds its preconditioner from this forward pass
  (:func:`kwng_jax.preconditioner_from_vjp`) instead of running the model
  again, and :func:`kwng_jax.scale_by_displacement` gets :math:`J u` by
  transposing ``vjp_fn``.

  Args:
    loss_from_outputs: ``samples -> scalar loss`` (the labels closed over).
    outputs_fn: ``params -> samples``, or ``params -> (samples, aux)`` with
      ``has_aux=True`` (e.g. Linen's ``apply(..., mutable=['batch_stats'])``).
    params: where to differentiate.
    has_aux: whether ``outputs_fn`` returns an auxiliary output.

  Returns:
    ``(loss, grads, (samples, vjp_fn))``; with ``has_aux``, ``((loss, aux),
    grads, (samples, vjp_fn))``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kwng_jax
    >>> from kwng_jax import flax_utils
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> y = (x[:, 0] > 0).astype(jnp.int32)
    >>> outputs_fn = lambda p: x @ p
    >>> loss_from_outputs = lambda logits: (
    ...     optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    >>> opt = kwng_jax.kwng()
    >>> @jax.jit
    ... def train_step(params, state):
    ...   loss, grads, samples_and_vjp = flax_utils.value_grad_and_vjp(
    ...       loss_from_outputs, outputs_fn, params)
    ...   updates, state = opt.update(grads, state, params,
    ...                               samples_and_vjp=samples_and_vjp, value=loss)
    ...   return params + updates, state, loss
    >>> params = jnp.zeros((3, 2))
    >>> state = opt.init(params)
    >>> losses = []
    >>> for _ in range(5):
    ...   params, state, loss = train_step(params, state)
    ...   losses.append(float(loss))
    >>> losses[-1] < losses[0]
    True
  """
  if has_aux:
    samples, vjp_fn, aux = jax.vjp(outputs_fn, params, has_aux=True)
  else:
    samples, vjp_fn = jax.vjp(outputs_fn, params)
  loss, loss_cotangent = jax.value_and_grad(loss_from_outputs)(samples)
  (grads,) = vjp_fn(loss_cotangent)
  return ((loss, aux) if has_aux else loss), grads, (samples, vjp_fn)


def nnx_value_grad_and_vjp(
    loss_from_outputs: Callable[[jax.Array], jax.Array],
    model: nnx.Module,
    *args: Any,
    wrt: Any = nnx.Param,
    **kwargs: Any,
) -> tuple[jax.Array, nnx.State, tuple[jax.Array, Callable[[jax.Array], Any]]]:
  """:func:`value_grad_and_vjp` for an NNX model, updating its state once.

  Runs ``model(*args, **kwargs)`` once under ``jax.vjp`` and writes the state
  that forward pass changed (BatchNorm statistics, RNG counters) back into
  ``model``, as ``nnx.value_and_grad`` would.

  Args:
    loss_from_outputs: ``outputs -> scalar loss`` (the labels closed over).
    model: the NNX model.
    *args: its inputs.
    wrt: the filter of the trained variables; must match the optimizer's.
    **kwargs: keyword arguments passed to ``model``.

  Returns:
    ``(loss, grads, samples_and_vjp)``: ``grads`` is the ``wrt`` state of the
    gradient, as ``nnx.grad`` returns it; pass
    ``samples_and_vjp=samples_and_vjp`` to ``nnx.Optimizer.update``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import kwng_jax
    >>> from kwng_jax import flax_utils
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=rngs), nnx.relu,
    ...                        nnx.Linear(8, 4, rngs=rngs))
    >>> optimizer = nnx.Optimizer(model, kwng_jax.kwng(), wrt=nnx.Param)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> y = jnp.arange(16) % 4
    >>> loss_from_logits = lambda logits: (
    ...     optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    >>> @nnx.jit
    ... def train_step(model, optimizer):
    ...   loss, grads, samples_and_vjp = flax_utils.nnx_value_grad_and_vjp(
    ...       loss_from_logits, model, x)
    ...   optimizer.update(model, grads, samples_and_vjp=samples_and_vjp,
    ...                    value=loss)
    ...   return loss
    >>> losses = [float(train_step(model, optimizer)) for _ in range(5)]
    >>> losses[-1] < losses[0]
    True
  """
  graphdef, params, rest = _split_pure(model, wrt)

  def forward(pure_params):
    copy = nnx.merge(graphdef, pure_params, rest)
    outputs = copy(*args, **kwargs)
    _, _, new_rest = nnx.split(copy, wrt, ...)
    return outputs, nnx.as_pure(new_rest)

  (loss, new_rest), pure_grads, samples_and_vjp = value_grad_and_vjp(
      loss_from_outputs, forward, nnx.as_pure(params), has_aux=True
  )
  nnx.update(model, new_rest)
  # Back into Variable wrappers (nnx.Param, ...), so that the optimizer's
  # `wrt` filter finds the gradient.
  grads = jax.tree.unflatten(
      jax.tree.structure(params), jax.tree.leaves(pure_grads)
  )
  return loss, grads, samples_and_vjp


class KWNGTrainState(train_state.TrainState):
  """A Linen ``TrainState`` whose ``apply_gradients`` forwards extra arguments.

  ``flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)``
  treats every keyword as a field to replace, so ``outputs_fn`` and
  ``value`` never reach ``tx.update``. Here keywords that name a field of the
  state (``params``, or ``batch_stats`` in a subclass) are replaced as before,
  and all others are passed to ``tx.update``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import kwng_jax
    >>> from kwng_jax import flax_utils
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> y = jnp.arange(16) % 4
    >>> model = nn.Dense(4)
    >>> state = flax_utils.KWNGTrainState.create(
    ...     apply_fn=model.apply, tx=kwng_jax.kwng(0.1),
    ...     params=model.init(jax.random.key(1), x)['params'])
    >>> @jax.jit
    ... def train_step(state):
    ...   outputs_fn = lambda p: state.apply_fn({'params': p}, x)
    ...   loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    ...       outputs_fn(p), y).mean()
    ...   loss, grads = jax.value_and_grad(loss_fn)(state.params)
    ...   return state.apply_gradients(grads=grads, outputs_fn=outputs_fn,
    ...                                value=loss), loss
    >>> losses = []
    >>> for _ in range(5):
    ...   state, loss = train_step(state)
    ...   losses.append(float(loss))
    >>> losses[-1] < losses[0]
    True
  """

  def apply_gradients(self, *, grads: PyTree, **kwargs: Any) -> 'KWNGTrainState':
    """Applies one ``tx`` update; see the class docstring for ``kwargs``.

    Args:
      grads: gradients shaped like ``params``.
      **kwargs: fields of the state to replace, and extra arguments of
        ``tx.update`` (``outputs_fn=``, ``value=``).

    Returns:
      The state with ``step`` incremented and ``params`` and ``opt_state``
      updated.
    """
    field_names = {field.name for field in dataclasses.fields(self)}
    replacements = {k: v for k, v in kwargs.items() if k in field_names}
    extra_args = {k: v for k, v in kwargs.items() if k not in field_names}
    updates, new_opt_state = self.tx.update(
        grads, self.opt_state, self.params, **extra_args
    )
    return self.replace(
        step=self.step + 1,
        params=optax.apply_updates(self.params, updates),
        opt_state=new_opt_state,
        **replacements,
    )
