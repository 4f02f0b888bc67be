"""How an update gets the forward pass that its preconditioner is built from.

:func:`kwng_jax.scale_by_kwng` takes ``outputs_fn`` (a function of the
params), ``samples_and_vjp`` (a forward pass already run), or both, and
perhaps ``jacobian_outputs_fn`` or an ``outputs_fn`` that can run on the
first rows of the batch (:func:`kwng_jax.batch_outputs_fn`). :func:`builder`
checks what it was given and returns how to build from it.
"""

from __future__ import annotations

import dataclasses

import jax

from kwng_jax._src import estimator
from kwng_jax._src import from_vjp
from kwng_jax._src import options as options_lib
from kwng_jax._src import outputs as outputs_lib


#: How to pass the extra arguments when a training loop's helper drops them.
MISSING_EXTRA_ARGS_HINT = (
    "Flax Linen's TrainState.apply_gradients does not pass extra arguments "
    'to the optimizer: use kwng_jax.flax_utils.KWNGTrainState, or call '
    'tx.update(grads, state.opt_state, state.params, outputs_fn=outputs_fn, '
    'value=loss) yourself.'
)


def builder(opts, key_fn, params, *, outputs_fn, jacobian_outputs_fn, full_params,
             samples_and_vjp, diagonal_average):
  """Checks the forward pass of an update; returns how to build from it.

  ``key_fn()`` gives the basis key inside the build, so that steps reusing
  stored factors skip its hash too.

  Returns ``(build, warn_if_convolutions)``: ``build(grads=None)`` gives
  the preconditioner (holding :math:`\tilde T D g` for ``grads``, if
  given), ``warn_if_convolutions()`` warns if its backward pass, run
  inside ``lax.cond``, would be slow (``outputs.warn_if_convolutions_on_cpu``).
  """
  if outputs_fn is None and samples_and_vjp is None:
    raise ValueError(
        'scale_by_kwng needs the keyword outputs_fn: '
        'opt.update(grads, state, params, outputs_fn=lambda p: model(p, x)), '
        'a function params -> samples of shape (N, ...) (or samples_and_vjp='
        'jax.vjp(outputs_fn, params), a forward pass already run). '
        + MISSING_EXTRA_ARGS_HINT
    )
  outputs_lib.check_params(params)
  if outputs_fn is not None:
    opts, jacobian_outputs_fn = outputs_lib.resolve_jacobian_rows(
        opts, outputs_fn, jacobian_outputs_fn)
  elif opts.jacobian_samples == 'auto':
    opts = dataclasses.replace(opts, jacobian_samples=None)
  own_vjps = opts.jacobian_samples is not None or opts.jacobian_dtype is not None
  if samples_and_vjp is not None and (not own_vjps or outputs_fn is None):
    if own_vjps:
      raise ValueError(
          'jacobian_samples and jacobian_dtype run their own VJPs: pass '
          'outputs_fn (and jacobian_outputs_fn), not samples_and_vjp, whose '
          'VJP is that of the whole batch in the params\' dtype.'
      )
    samples, vjp_fn = outputs_lib.check_samples_and_vjp(
        samples_and_vjp, params, 'scale_by_kwng'
    )
    return (lambda grads=None: from_vjp.from_vjp_of_options(
                samples, vjp_fn, opts, key=key_fn(), diagonal_average=diagonal_average,
                grads=grads),
            lambda: outputs_lib.warn_if_convolutions_on_cpu(vjp_fn, samples))
  if (samples_and_vjp is not None and jacobian_outputs_fn is not None
      and opts.jacobian_dtype is None):
    # The samples of the forward pass already run, T from the first rows alone.
    samples, _ = outputs_lib.check_samples_and_vjp(samples_and_vjp, params, 'scale_by_kwng')

    def build_from_rows(grads=None):
      with outputs_lib.explained_errors():
        rows, rows_vjp_fn = jax.vjp(jacobian_outputs_fn, params)
      rows = outputs_lib.as_samples(rows)
      estimator.check_jacobian_rows(rows, samples, options_lib.fixed_rows(opts.jacobian_samples))
      return from_vjp.from_vjp_of_options(
          samples, rows_vjp_fn, dataclasses.replace(opts, jacobian_samples=rows.shape[0]),
          key=key_fn(), diagonal_average=diagonal_average, grads=grads)

    return (build_from_rows,
            lambda: outputs_lib.warn_if_convolutions_on_cpu(
                outputs_lib.backward_pass(jacobian_outputs_fn), params))
  outputs_fn = outputs_lib.unmasked_outputs_fn(
      outputs_fn, params, full_params, 'scale_by_kwng'
  )
  if jacobian_outputs_fn is not None:
    jacobian_outputs_fn = outputs_lib.unmasked_outputs_fn(
        jacobian_outputs_fn, params, full_params, 'scale_by_kwng'
    )
  return (lambda grads=None: estimator.build(
                outputs_fn, params, opts, key=key_fn(),
                jacobian_outputs_fn=jacobian_outputs_fn,
                diagonal_average=diagonal_average, grads=grads),
          lambda: outputs_lib.warn_if_convolutions_on_cpu(
              outputs_lib.backward_pass(jacobian_outputs_fn or outputs_fn), params))
