r"""Adaptive damping: the Levenberg–Marquardt rule of the published optimizer.

:func:`adaptive_damping` wraps a whole Optax chain that contains
:func:`kwng_jax.scale_by_kwng` and adapts its :math:`\epsilon` (the state
field ``kwng_epsilon``) from the loss passed as ``value=``:

.. math:: \rho_t = \frac{2 (L_{t-1} - L_t)}{\mathrm{lr}\,\langle g_{t-1}, \hat g_{t-1}\rangle}

the ratio of the actual decrease of the loss to the decrease a first-order
model predicted for the previous step. Over a window of steps the largest
:math:`\rho` is kept; at the end of the window :math:`\epsilon` grows
(divided by 0.85) if it is below 0.25 and shrinks (times 0.85) if it is above
0.75, within :math:`[10^{-10}, 10^5]`.

Where the learning rate comes from. The rule needs
:math:`\mathrm{lr}\,\langle g, \hat g\rangle`, and the learning rate sits
later in the chain than the KWNG transform (and may be a schedule, or be
followed by momentum). The wrapper therefore sees the chain's final update
:math:`u` and uses the predicted decrease :math:`-\langle g, u\rangle`, which
is exactly :math:`\mathrm{lr}\,\langle g, \hat g\rangle` for the published
chain (SGD after clipping) and the right first-order prediction for any
other chain. No learning rate has to be passed twice. With momentum after
the direction, :math:`u` can point uphill (:math:`\langle g, u\rangle > 0`);
such a step counts as failed, so :math:`\epsilon` grows. A chain that
records :math:`\langle g, u\rangle` in its state can hand it over instead
(``predicted_decrease``), which saves the pass over u at the end of the
step; :func:`kwng_jax.kwng` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from kwng_jax._src import options
from kwng_jax._src import sharding
from kwng_jax._src import forward_pass

PyTree = Any

#: Name of the state field of :func:`kwng_jax.scale_by_kwng` that is adapted.
EPSILON_FIELD = 'kwng_epsilon'


class AdaptiveDampingState(NamedTuple):
  """State of :func:`adaptive_damping`.

  Attributes:
    inner_state: the state of the wrapped chain.
    damping_count: number of updates so far.
    damping_previous_loss: the loss passed at the previous update.
    damping_predicted_decrease: :math:`-\\langle g, u\\rangle` of the previous
      update.
    damping_best_ratio: the largest reduction ratio seen in this window.
  """

  inner_state: Any
  damping_count: jax.Array
  damping_previous_loss: jax.Array
  damping_predicted_decrease: jax.Array
  damping_best_ratio: jax.Array


def adaptive_damping(
    inner: optax.GradientTransformation,
    *,
    window: int = 5,
    ratio_scale: float = 2.0,
    factor: float = 0.85,
    lower_ratio: float = 0.25,
    upper_ratio: float = 0.75,
    min_epsilon: float = 1e-10,
    max_epsilon: float = 1e5,
    predicted_decrease: Callable[[Any, jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adapts the :math:`\epsilon` of the KWNG transform inside ``inner``.

  Its update needs the current loss as the keyword ``value``; all extra
  arguments (``outputs_fn`` …) are passed on to ``inner``.

  Args:
    inner: a transformation (usually a chain) holding one
      :func:`kwng_jax.scale_by_kwng`.
    window: number of steps between two changes of :math:`\epsilon`
      (published: 5; 1 adapts at every step).
    ratio_scale: the ratio is ``ratio_scale`` times the actual decrease over
      the predicted one (published: 2, so that an exact Newton step on a
      quadratic scores 1; 1 compares with the first-order prediction).
    factor: :math:`\epsilon` is divided by ``factor`` when the best ratio of
      the window is below ``lower_ratio`` and multiplied by it when above
      ``upper_ratio``.
    lower_ratio: threshold below which :math:`\epsilon` grows.
    upper_ratio: threshold above which :math:`\epsilon` shrinks.
    min_epsilon: lower bound of :math:`\epsilon`.
    max_epsilon: upper bound of :math:`\epsilon`.
    predicted_decrease: ``(inner_state, count) -> -<g, u>``, the predicted
      decrease read from ``inner``'s new state at the count-th update, for
      a chain that records it (:func:`kwng_jax.kwng` passes one); None sums
      :math:`-\langle g, u\rangle` over the leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AdaptiveDampingState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kwng_jax
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> loss_fn = lambda p: jnp.mean((x @ p - 1.0) ** 2)
    >>> opt = kwng_jax.adaptive_damping(optax.chain(
    ...     kwng_jax.scale_by_kwng(), kwng_jax.clip_by_global_norm(1.0),
    ...     optax.sgd(0.1)))
    >>> params = jnp.zeros((3, 2))
    >>> state = opt.init(params)
    >>> for _ in range(5):  # the update needs the loss as value=
    ...   loss, grads = jax.value_and_grad(loss_fn)(params)
    ...   updates, state = opt.update(grads, state, params,
    ...                               outputs_fn=lambda p: x @ p, value=loss)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params) < loss_fn(jnp.zeros((3, 2))))
    True

  References:
    Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
    ICLR 2020 (arXiv 1910.09652), and its published implementation.
  """
  window = options.check_count('window', window, '1 adapts at every step.')
  options.check_positive('ratio_scale', ratio_scale)
  options.check_positive('factor', factor)
  if not factor < 1:
    raise ValueError(f'factor={factor} must lie in (0, 1).')
  options.check_positive('min_epsilon', min_epsilon)
  options.check_positive('max_epsilon', max_epsilon)
  if not min_epsilon <= max_epsilon:
    raise ValueError(
        f'min_epsilon={min_epsilon} must be at most max_epsilon={max_epsilon}.'
    )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    if otu.tree_get(inner_state, EPSILON_FIELD) is None:
      raise ValueError(
          'adaptive_damping adapts the epsilon of kwng_jax.scale_by_kwng, but '
          'the wrapped transformation holds none: wrap a chain that contains '
          'scale_by_kwng.'
      )
    # A fresh array per field, so that the state can be donated to jit.
    return AdaptiveDampingState(
        inner_state=inner_state,
        damping_count=jnp.zeros((), jnp.int32),
        damping_previous_loss=jnp.zeros((), jnp.float32),
        damping_predicted_decrease=jnp.zeros((), jnp.float32),
        damping_best_ratio=jnp.zeros((), jnp.float32),
    )

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    if value is None:
      raise ValueError(
          'adaptive_damping needs the current loss: pass value=loss to the '
          'update (e.g. loss, grads = jax.value_and_grad(loss_fn)(params)). '
          + forward_pass.MISSING_EXTRA_ARGS_HINT
      )
    if jnp.shape(value) != ():
      raise ValueError(
          'value must be the scalar loss of the batch; got shape '
          f'{jnp.shape(value)}. Reduce it first, e.g. value=jnp.mean(losses).'
      )
    loss = jnp.asarray(value).astype(jnp.float32)
    has_previous = state.damping_count > 0
    ratio = (
        ratio_scale
        * (state.damping_previous_loss - loss)
        / state.damping_predicted_decrease
    )
    # A zero predicted decrease or a non-finite loss tells nothing. A step
    # that the first-order model predicted to increase the loss failed,
    # whatever the loss then did: only momentum (or another transformation
    # after the direction) can send one, and counting a rise of the loss
    # over a predicted rise as success would shrink epsilon while the loss
    # diverges.
    observed = has_previous & jnp.isfinite(ratio)
    ratio = jnp.where(state.damping_predicted_decrease < 0, -jnp.inf, ratio)
    best = jnp.where(
        observed, jnp.maximum(state.damping_best_ratio, ratio),
        state.damping_best_ratio,
    )
    count = optax.safe_increment(state.damping_count)
    window_ends = has_previous & (count % window == 0)

    epsilon = otu.tree_get(state.inner_state, EPSILON_FIELD)
    grown = jnp.where(best < lower_ratio, epsilon / factor, epsilon)
    adapted = jnp.where(best > upper_ratio, epsilon * factor, grown)
    adapted = jnp.clip(adapted, min_epsilon, max_epsilon).astype(epsilon.dtype)
    epsilon = jnp.where(window_ends, adapted, epsilon)
    best = jnp.where(window_ends, jnp.zeros_like(best), best)
    inner_state = otu.tree_set(state.inner_state, **{EPSILON_FIELD: epsilon})

    new_updates, inner_state = inner.update(
        updates, inner_state, params, value=value, **extra_args
    )
    if predicted_decrease is None:
      # sharding.tree_vdot, unlike jnp.vdot, accepts FSDP-sharded leaves.
      decrease = -sharding.tree_vdot(updates, new_updates)
    else:
      decrease = jnp.asarray(predicted_decrease(inner_state, state.damping_count), jnp.float32)
    return new_updates, AdaptiveDampingState(
        inner_state=inner_state,
        damping_count=count,
        damping_previous_loss=loss,
        damping_predicted_decrease=decrease,
        damping_best_ratio=best,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
