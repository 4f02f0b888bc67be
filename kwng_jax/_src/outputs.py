"""The user's ``outputs_fn`` and ``params``: checks, and the masked-leaves adapter.

KWNG differentiates a function ``outputs_fn: params -> samples`` written by
the user. This module turns what commonly goes wrong with it into errors
that name the fix (a tuple of outputs, integer samples, an empty batch, an
NNX model mutated from inside a transformation), detects samples that do not
depend on the params, and lets the transformations run inside
``optax.masked`` and ``optax.multi_transform``, which hand them params whose
masked leaves are ``optax.MaskedNode``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kwng_jax._src import options as options_lib

PyTree = Any
OutputsFn = Callable[[PyTree], jax.Array]


class BatchOutputsFn:
  """``outputs_fn`` of one batch that can also run on the batch's first rows.

  Built by :func:`kwng_jax.batch_outputs_fn` (and
  :func:`kwng_jax.flax_utils.nnx_outputs_fn`); see there.
  """

  def __init__(self, apply_fn: Callable[..., Any], inputs: tuple[Any, ...],
               kwargs: dict[str, Any]):
    if not callable(apply_fn):
      raise ValueError(
          'batch_outputs_fn needs apply_fn, a function (params, *inputs) -> samples '
          f'of shape (N, ...); got {type(apply_fn).__name__}.')
    self.apply_fn = apply_fn
    self.inputs = inputs
    self.kwargs = kwargs
    batched = [x for x in inputs if getattr(x, 'ndim', 0) >= 1]
    if not batched:
      raise ValueError(
          'batch_outputs_fn needs the batch among its positional inputs: an array '
          'whose leading axis indexes the samples (e.g. the images).')
    #: N, the leading axis of the first array input.
    self.batch_size = int(batched[0].shape[0])

  def __call__(self, params: PyTree) -> Any:
    return self.apply_fn(params, *self.inputs, **self.kwargs)

  def first_rows(self, num_rows: int) -> 'BatchOutputsFn':
    """The same function of the first ``num_rows`` samples of the batch.

    Each positional input whose leading axis is the batch's (N) is cut to
    its first ``num_rows`` entries; other inputs and the keyword arguments
    are passed as they are.
    """
    if not 1 <= num_rows <= self.batch_size:
      raise ValueError(
          f'first_rows({num_rows}) needs 1 <= num_rows <= N={self.batch_size}.')
    inputs = tuple(
        x[:num_rows] if getattr(x, 'ndim', 0) >= 1 and x.shape[0] == self.batch_size else x
        for x in self.inputs)
    return BatchOutputsFn(self.apply_fn, inputs, self.kwargs)


def batch_outputs_fn(apply_fn: Callable[..., Any], *inputs: Any, **kwargs: Any) -> BatchOutputsFn:
  r"""``outputs_fn`` for a model applied to a batch: ``params -> apply_fn(params, *inputs)``.

  Use it in place of ``lambda p: apply_fn(p, *inputs)``: it computes the
  same samples, and it can also run on the first n samples of the batch
  alone, so that :func:`kwng_jax.kwng` (``jacobian_samples='auto'``)
  computes its M vector–Jacobian products on 32 samples instead of the
  whole batch. A plain function works too, at the cost of the whole batch.

  Each positional input whose leading axis is the batch's (that of the first
  array among them) is cut to its first n rows; other inputs (a PRNG key,
  a flag) and the keyword arguments are passed as they are. The rows of
  the batch must be independent for the cut to give the same function of
  those rows: with BatchNorm in train mode the first n samples are
  normalized with their own statistics.

  Args:
    apply_fn: ``(params, *inputs, **kwargs) -> samples`` of shape ``(N, ...)``.
    *inputs: the batch (and any other positional inputs).
    **kwargs: keyword arguments passed to ``apply_fn``.

  Returns:
    A callable ``params -> samples``, with ``first_rows(n)`` and
    ``batch_size`` (N).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import kwng_jax
    >>> x = jax.random.normal(jax.random.key(0), (128, 3))
    >>> apply = lambda p, x: jnp.tanh(x @ p['w'])
    >>> outputs_fn = kwng_jax.batch_outputs_fn(apply, x)
    >>> params = {'w': jnp.ones((3, 4))}
    >>> outputs_fn(params).shape, outputs_fn.first_rows(32)(params).shape
    ((128, 4), (32, 4))
  """
  return BatchOutputsFn(apply_fn, inputs, kwargs)


def resolve_jacobian_rows(
    opts: Any, outputs_fn: Any, jacobian_outputs_fn: OutputsFn | None
) -> tuple[Any, OutputsFn | None]:
  """Which rows T comes from, and the function that computes them alone.

  ``'auto'`` becomes ``options.AUTO_JACOBIAN_SAMPLES`` (32) when
  ``outputs_fn`` can run on its first rows (:class:`BatchOutputsFn`) and
  the batch is larger, else None (the whole batch); a ``jacobian_outputs_fn``
  given by the user sets n itself. A number n with no
  ``jacobian_outputs_fn`` takes ``outputs_fn.first_rows(n)`` when there is
  one. Returns the options with ``jacobian_samples`` an int or None, and
  the function for T (None: ``outputs_fn`` itself).
  """
  requested = opts.jacobian_samples
  rows_fn = getattr(outputs_fn, 'first_rows', None)
  batch_size = getattr(outputs_fn, 'batch_size', None)
  if isinstance(requested, str):
    requested = None
    if (jacobian_outputs_fn is None and rows_fn is not None
        and isinstance(batch_size, int) and batch_size > options_lib.AUTO_JACOBIAN_SAMPLES):
      requested = options_lib.AUTO_JACOBIAN_SAMPLES
  if (requested is not None and jacobian_outputs_fn is None and rows_fn is not None
      and isinstance(batch_size, int) and requested < batch_size):
    jacobian_outputs_fn = rows_fn(requested)
  return dataclasses.replace(opts, jacobian_samples=requested), jacobian_outputs_fn


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def has_masked_leaves(tree: PyTree) -> bool:
  """Whether ``tree`` holds ``optax.MaskedNode`` leaves (inside ``optax.masked``)."""
  return any(_is_masked(x) for x in jax.tree.leaves(tree, is_leaf=_is_masked))


def unmasked_outputs_fn(
    outputs_fn: OutputsFn, params: PyTree, full_params: PyTree | None, who: str
) -> OutputsFn:
  """``outputs_fn`` as a function of the leaves ``optax.masked`` left in ``params``.

  Outside ``optax.masked`` (no ``MaskedNode`` in ``params``) returns
  ``outputs_fn`` itself. Inside it, returns ``sub -> outputs_fn(full)``,
  where ``full`` is ``full_params`` with the unmasked leaves taken from
  ``sub``: the model runs whole, and only the unmasked leaves are
  differentiated (the natural gradient on that subset of the parameters).

  Args:
    outputs_fn: the user's ``params -> samples``, of all the params.
    params: the params the transformation was given.
    full_params: all the params (the extra argument ``full_params=``).
    who: the transformation's name, for the error message.

  Returns:
    A function of ``params``.

  Raises:
    ValueError: when ``params`` is masked and ``full_params`` is missing,
      masked too, or not shaped like ``params``.
  """
  if not has_masked_leaves(params):
    return outputs_fn
  if full_params is None:
    raise ValueError(
        f'{who} runs inside optax.masked or optax.multi_transform, which '
        'hides the other parameters from it, but outputs_fn needs all of '
        'them: pass them as the extra argument full_params=params, e.g. '
        'opt.update(grads, state, params, outputs_fn=outputs_fn, '
        'full_params=params).'
    )
  if has_masked_leaves(full_params):
    raise ValueError(
        'full_params holds masked leaves: pass the whole params, and leave '
        'optax.masked(..., mask_compatible_extra_args=False), its default.'
    )

  def filled(sub: PyTree) -> PyTree:
    # A MaskedNode may stand for a whole subtree (a label given to a prefix
    # of the params in multi_transform): it takes that subtree whole.
    return jax.tree.map(
        lambda s, f: f if _is_masked(s) else s, sub, full_params, is_leaf=_is_masked
    )

  try:
    filled(params)
  except ValueError:
    raise ValueError(
        'full_params must have the structure of the params given to the '
        'update (all of them, before masking).'
    ) from None

  def outputs_of_unmasked(sub: PyTree) -> jax.Array:
    return outputs_fn(filled(sub))

  return outputs_of_unmasked


def check_samples_and_vjp(
    samples_and_vjp: Any, params: PyTree, who: str
) -> tuple[jax.Array, Callable[[jax.Array], tuple[PyTree]]]:
  """Checks ``samples_and_vjp=jax.vjp(outputs_fn, params)``; returns its parts.

  The VJP's cotangents are given the structure of ``params`` (the pytree
  the optimizer was given may wrap the same leaves differently, e.g. the
  ``Variable`` wrappers of an NNX state).

  Raises:
    ValueError: for anything but a pair ``(samples, vjp_fn)`` whose VJP
      returns one leaf per leaf of ``params``, or inside ``optax.masked``.
  """
  if not (isinstance(samples_and_vjp, tuple) and len(samples_and_vjp) == 2
          and callable(samples_and_vjp[1])):
    raise ValueError(
        'samples_and_vjp must be the pair jax.vjp(outputs_fn, params) '
        f'returns, (samples, vjp_fn); got {type(samples_and_vjp).__name__}.'
    )
  if has_masked_leaves(params):
    raise ValueError(
        f'{who} inside optax.masked or optax.multi_transform cannot use '
        'samples_and_vjp (its VJP covers all the params): pass outputs_fn '
        'and full_params=params instead.'
    )
  samples, vjp_fn = samples_and_vjp
  samples = as_samples(samples)
  treedef = jax.tree.structure(params)
  num_leaves = len(jax.tree.leaves(params))

  def vjp_like_params(cotangent: jax.Array) -> tuple[PyTree]:
    leaves = jax.tree.leaves(vjp_fn(cotangent))
    if len(leaves) != num_leaves:
      raise ValueError(
          f'The vjp_fn of samples_and_vjp returns {len(leaves)} leaves for '
          f'params of {num_leaves}: it must be the VJP of the outputs '
          'at the params given to the update.'
      )
    return (jax.tree.unflatten(treedef, leaves),)

  return samples, vjp_like_params


def check_params(params: PyTree) -> None:
  """Raises a ValueError unless ``params`` is a non-empty pytree of float arrays."""
  if params is None:
    raise ValueError(
        'KWNG needs the current params to differentiate outputs_fn: pass '
        'params to the update, opt.update(grads, state, params, ...).'
    )
  leaves_with_paths = jax.tree_util.tree_leaves_with_path(params)
  if not leaves_with_paths:
    raise ValueError(
        'params is empty: KWNG has no parameter to precondition. Inside '
        'optax.masked or optax.multi_transform, give KWNG at least one leaf.'
    )
  for path, leaf in leaves_with_paths:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f'params{jax.tree_util.keystr(path)} has dtype {dtype}: KWNG '
          'differentiates every leaf of params, so all must be floating. '
          'Keep integer state (step counters, indices) out of params, or '
          'apply KWNG to the floating leaves only with optax.masked(opt, '
          'mask) and pass full_params=params to the update.'
      )


def as_samples(raw: Any) -> jax.Array:
  """What ``outputs_fn`` returned, checked: a floating array of shape (N, ...).

  Raises:
    ValueError: for a tuple, list or dict, a scalar, an empty batch or
      sample, or non-floating (integer, complex) samples.
  """
  if isinstance(raw, (tuple, list, dict)) or not hasattr(raw, 'dtype'):
    raise ValueError(
        'outputs_fn must return one array of samples of shape (N, ...); it '
        f'returned a {type(raw).__name__}. Return the model output KWNG should '
        'see (e.g. the logits), or concatenate several along the last axis.'
    )
  samples = jnp.asarray(raw)
  if jnp.issubdtype(samples.dtype, jnp.complexfloating):
    raise ValueError(
        f'outputs_fn returned complex samples ({samples.dtype}); KWNG needs '
        'real ones: return jnp.stack([z.real, z.imag], axis=-1).'
    )
  if not jnp.issubdtype(samples.dtype, jnp.floating):
    raise ValueError(
        f'outputs_fn returned {samples.dtype} samples; KWNG needs floating '
        'samples that depend on params (e.g. the logits, not their argmax).'
    )
  if samples.ndim == 0:
    raise ValueError(
        'outputs_fn must return samples with a leading batch axis, shape '
        '(N, ...); it returned a scalar (a loss?). Return the per-sample '
        'model outputs, e.g. the logits.'
    )
  if samples.size == 0:
    raise ValueError(
        f'outputs_fn returned an empty array of shape {samples.shape}: KWNG '
        'needs a non-empty batch of non-empty samples.'
    )
  return samples


@contextlib.contextmanager
def explained_errors() -> Iterator[None]:
  """Re-raises errors of ``outputs_fn`` that have a known fix, with the fix."""
  try:
    yield
  except Exception as error:
    # Matched by name: flax is an optional dependency.
    if type(error).__name__ == 'TraceContextError':
      raise ValueError(
          'outputs_fn mutated the state of an NNX model from inside a JAX '
          'transformation (BatchNorm statistics, RNG counters); KWNG '
          'differentiates outputs_fn with jax.vjp, where the model cannot be '
          'mutated. Build it with kwng_jax.flax_utils.nnx_outputs_fn(model, '
          'x), which runs a copy of the model and discards what the copy '
          'mutates.'
      ) from error
    raise


def depends_on_input(closed_jaxpr: Any) -> bool:
  """Whether any output of a ``ClosedJaxpr`` depends on any of its inputs.

  Conservative: an equation with a dependent input is taken to make all its
  outputs dependent, so False is certain and True is not.
  """
  jaxpr = closed_jaxpr.jaxpr
  # Literals (constants) carry a value; variables do not.
  is_var = lambda v: not hasattr(v, 'val')  # noqa: E731
  dependent = set(jaxpr.invars)
  for eqn in jaxpr.eqns:
    if any(is_var(v) and v in dependent for v in eqn.invars):
      dependent.update(eqn.outvars)
  return any(is_var(v) and v in dependent for v in jaxpr.outvars)


def backward_pass(outputs_fn):
  """``params -> VJP of outputs_fn at params``: what a rebuild runs."""

  def backward(params):
    outputs, vjp_fn = jax.vjp(outputs_fn, params)
    return vjp_fn(outputs)

  return backward


def warn_if_convolutions_on_cpu(backward, example) -> None:
  """Warns, at trace time, of XLA:CPU's slow convolutions inside ``lax.cond``.

  The rebuild of ``update_every`` runs under ``lax.cond``; XLA:CPU gives the
  convolutions of a conditional branch a generic loop (jax-ml/jax#12868),
  which made the digits CNN's rebuild ~10x slower than outside the branch.
  ``backward`` is the backward pass the rebuild runs (a VJP function, or
  :func:`backward_pass` of ``outputs_fn``); it is traced once more, on its
  ``example`` argument, for this check, on CPU only.
  """
  if jax.default_backend() != 'cpu':
    return
  if has_convolution(jax.make_jaxpr(backward)(example).jaxpr):
    warnings.warn(
        'scale_by_kwng(update_every > 1) on CPU with a convolutional model: '
        'XLA:CPU runs convolutions inside lax.cond (the rebuild) much slower '
        'than outside it (jax-ml/jax#12868), so this is likely slower than '
        'update_every=1. On CPU, use update_every with dense models.',
        RuntimeWarning,
        stacklevel=4,
    )


def has_convolution(jaxpr) -> bool:
  """Whether a jaxpr, or any jaxpr nested in it, holds a convolution."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      return True
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr holds a Jaxpr
        if hasattr(sub, 'eqns') and has_convolution(sub):
          return True
  return False
