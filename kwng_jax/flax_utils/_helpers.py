r"""Training Flax models with KWNG: NNX optimizers, Linen train states, fused steps.

KWNG's update needs, besides the gradient, ``outputs_fn``: a function
``params -> samples`` (a classifier's logits on the batch) that it
differentiates once with ``jax.vjp``. This module builds that function for
Flax models and threads it through Flax's training APIs:

* NNX: ``nnx.Optimizer(model, kwng_jax.kwng(...), wrt=nnx.Param)`` works as
  is, since ``Optimizer.update(model, grads, **kwargs)`` forwards its keyword
  arguments to the Optax update; :func:`nnx_outputs_fn` builds
  ``outputs_fn`` in one line. It runs the model on a copy of its state, so
  BatchNorm statistics (and RNG counters) are never updated twice.
* Linen: ``TrainState.apply_gradients`` forwards nothing to ``tx.update``;
  :class:`KWNGTrainState` does.
* One forward pass instead of two: :func:`value_grad_and_outputs_fn` and
  :func:`nnx_value_grad_and_outputs_fn` compute the loss, its gradient and a
  *replay* ``outputs_fn`` from a single ``jax.vjp``. Under ``jax.jit``, XLA
  usually merges the two identical forward passes anyway (common
  subexpression elimination; ``benchmarks/fused_forward.py`` measures it);
  the fused form guarantees it, and also holds eagerly and for stochastic
  forward passes.

Needs Flax (``pip install "kwng_jax[flax]"``); ``import kwng_jax`` does not
import this module.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

from flax import nnx
from flax.training import train_state
import jax
import optax

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
    ``wrt`` state of the model (with or without its ``Variable`` wrappers).

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
  graphdef, _, rest = nnx.split(model, wrt, ...)
  # Plain arrays, not the model's Variables: merge then builds fresh
  # Variables, whose mutation (inside jax.vjp) cannot reach the model.
  rest = nnx.as_pure(rest)

  def outputs_fn(params: PyTree) -> jax.Array:
    copy = nnx.merge(graphdef, nnx.as_pure(params), rest)
    return copy(*args, **kwargs)

  return outputs_fn


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

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kwng_jax import flax_utils
    >>> f = lambda p: jnp.tanh(p['w'])
    >>> params = {'w': jnp.arange(3.0)}
    >>> samples, vjp_fn = jax.vjp(f, params)
    >>> replay = flax_utils.replay_outputs_fn(samples, vjp_fn)
    >>> bool(jnp.allclose(jax.grad(lambda p: replay(p).sum())(params)['w'],
    ...                   jax.grad(lambda p: f(p).sum())(params)['w']))
    True
  """

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
    loss_from_outputs: Callable[[jax.Array], jax.Array],
    outputs_fn: Callable[[PyTree], Any],
    params: PyTree,
    *,
    has_aux: bool = False,
) -> tuple[Any, PyTree, Callable[[PyTree], jax.Array]]:
  r"""The loss, its gradient and KWNG's ``outputs_fn`` from one forward pass.

  With :math:`X = f(\theta)` (``outputs_fn``) and :math:`L = \ell(X)`
  (``loss_from_outputs``), runs ``jax.vjp`` of :math:`f` once and returns
  :math:`L`, :math:`\nabla_\theta L = J_f^\top \nabla_X \ell` and
  :func:`replay_outputs_fn` of that VJP: an optimizer update with it
  differentiates the samples without a second forward pass.

  The replay supports reverse-mode differentiation only: use it with an
  optimizer that differentiates ``outputs_fn`` by ``jax.vjp`` alone, such as
  :func:`kwng_jax.published_kwng` or a chain of :func:`kwng_jax.scale_by_kwng`
  without :func:`kwng_jax.scale_by_displacement`. :func:`kwng_jax.kwng` also
  takes a ``jax.jvp`` of ``outputs_fn``; give it a plain ``outputs_fn``.

  Args:
    loss_from_outputs: ``samples -> scalar loss`` (the labels closed over).
    outputs_fn: ``params -> samples``, or ``params -> (samples, aux)`` with
      ``has_aux=True`` (e.g. Linen's ``apply(..., mutable=['batch_stats'])``).
    params: where to differentiate.
    has_aux: whether ``outputs_fn`` returns an auxiliary output.

  Returns:
    ``(loss, grads, replay_fn)``; with ``has_aux``, ``((loss, aux), grads,
    replay_fn)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import kwng_jax
    >>> from kwng_jax import flax_utils
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> outputs_fn = lambda p: x @ p
    >>> loss_from_outputs = lambda out: jnp.mean((out - 1.0) ** 2)
    >>> opt = kwng_jax.published_kwng(learning_rate=0.5)
    >>> @jax.jit
    ... def train_step(params, state):
    ...   loss, grads, replay_fn = flax_utils.value_grad_and_outputs_fn(
    ...       loss_from_outputs, outputs_fn, params)
    ...   updates, state = opt.update(grads, state, params,
    ...                               outputs_fn=replay_fn, value=loss)
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
  replay_fn = replay_outputs_fn(samples, vjp_fn)
  return ((loss, aux) if has_aux else loss), grads, replay_fn


def nnx_value_grad_and_outputs_fn(
    loss_from_outputs: Callable[[jax.Array], jax.Array],
    model: nnx.Module,
    *args: Any,
    wrt: Any = nnx.Param,
    **kwargs: Any,
) -> tuple[jax.Array, nnx.State, Callable[[PyTree], jax.Array]]:
  """:func:`value_grad_and_outputs_fn` for an NNX model, updating its state once.

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
    ``(loss, grads, replay_fn)``: ``grads`` is the ``wrt`` state of the
    gradient, as ``nnx.grad`` returns it; pass ``outputs_fn=replay_fn`` to
    ``nnx.Optimizer.update``.

  As for :func:`value_grad_and_outputs_fn`, the replay supports
  reverse-mode differentiation only: pair it with
  :func:`kwng_jax.published_kwng` (or a chain without
  :func:`kwng_jax.scale_by_displacement`), and give :func:`kwng_jax.kwng`
  :func:`nnx_outputs_fn` instead.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import kwng_jax
    >>> from kwng_jax import flax_utils
    >>> model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, kwng_jax.published_kwng(0.1), wrt=nnx.Param)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> y = jnp.arange(16) % 4
    >>> loss_from_logits = lambda logits: (
    ...     optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    >>> @nnx.jit
    ... def train_step(model, optimizer):
    ...   loss, grads, replay_fn = flax_utils.nnx_value_grad_and_outputs_fn(
    ...       loss_from_logits, model, x)
    ...   optimizer.update(model, grads, outputs_fn=replay_fn, value=loss)
    ...   return loss
    >>> losses = [float(train_step(model, optimizer)) for _ in range(5)]
    >>> losses[-1] < losses[0]
    True
  """
  graphdef, params, rest = nnx.split(model, wrt, ...)
  rest = nnx.as_pure(rest)

  def forward(pure_params):
    copy = nnx.merge(graphdef, pure_params, rest)
    outputs = copy(*args, **kwargs)
    _, _, new_rest = nnx.split(copy, wrt, ...)
    return outputs, nnx.as_pure(new_rest)

  loss, pure_grads, replay_fn = value_grad_and_outputs_fn(
      loss_from_outputs, forward, nnx.as_pure(params), has_aux=True
  )
  loss, new_rest = loss
  nnx.update(model, new_rest)
  # Back into Variable wrappers (nnx.Param, ...), so that the optimizer's
  # `wrt` filter finds the gradient.
  grads = jax.tree.unflatten(
      jax.tree.structure(params), jax.tree.leaves(pure_grads)
  )
  return loss, grads, replay_fn


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
