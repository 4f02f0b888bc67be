r"""Heavy-ball momentum on the capped KWNG steps, restarted when it turns uphill.

:func:`kwng_jax.kwng` averages its capped steps :math:`s_t` with heavy-ball
momentum in its averaging form, :math:`m_t = (1 - \beta) s_t + \beta
m_{t-1}`, so that an update :math:`-\eta m_t` moves the samples by about
:math:`\eta` at most, like one capped step. Averaging removes much of the
noise of the minibatch and of the random basis, but on a deterministic
problem it carries the parameters past a minimum the natural-gradient step
would have stopped at, and the Levenberg–Marquardt rule, which only shrinks
the next direction, cannot take back the velocity already gathered. So the
momentum is dropped (:math:`m_{t-1} \leftarrow 0`) when the new gradient
:math:`g_t` says that continuing along it goes uphill faster than the new
step goes down:

.. math:: \langle g_t, m_{t-1}\rangle < -c \, \langle g_t, s_t\rangle,
   \qquad c = 0.3.

The update is :math:`-\eta m`, so :math:`-\langle g_t, m_{t-1}\rangle` is
the first-order rate at which the old velocity raises the loss and
:math:`\langle g_t, s_t\rangle` the rate at which the new step lowers it.
This is the gradient scheme of adaptive restart with a margin. Both sides pair
a gradient with a step, so the test does not depend on how the model is
parametrized (a Euclidean cosine would). The margin keeps restarts for clear
reversals: a minibatch gradient makes :math:`\langle g_t, m_{t-1}\rangle`
slightly negative often, but rarely by a third of a step's descent.

References:
  O'Donoghue, Candès, *Adaptive Restart for Accelerated Gradient Schemes*,
  Foundations of Computational Mathematics 15 (2015), Section 3.2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from kwng_jax._src import sharding

PyTree = Any

#: c of the restart test. Measured with momentum 0.9 and the damping 'safe'
#: on the ill-conditioned digits CNN (10 seeds, 30 epochs): without
#: restarts, 0.640 test accuracy at learning rate 3 and 0.55 ± 0.22 at 10
#: (some runs blow up); with c = 0.1, 0.2, 0.3, 0.5, 1 at 3: 0.655, 0.663,
#: 0.684, 0.667, 0.673. On a deterministic least-squares problem the
#: restarts halve the steps to the optimum or better (kwng's docstring
#: example: 140 steps against 433); the digits MLP barely notices them
#: (0.961 without, 0.958 with c = 0.3).
RESTART_RATIO = 0.3


class RestartedMomentumState(NamedTuple):
  """State of :func:`restarted_momentum`.

  Attributes:
    inner_state: the state of the wrapped transformation.
    momentum: :math:`m_{t-1}`, shaped like the updates.
    momentum_restarts: how many times the momentum was dropped (int32).
    momentum_gradient_product: :math:`\\langle g_t, u_t\\rangle` of the last
      update :math:`u_t` and the gradient passed with it (float32), from
      the restart test's two products: no pass over the update.
  """

  inner_state: Any
  momentum: PyTree
  momentum_restarts: jax.Array
  momentum_gradient_product: jax.Array


def restarted_momentum(
    inner: optax.GradientTransformationExtraArgs,
    decay: float | jax.Array,
    *,
    nesterov: bool = False,
    gradient_step_product: Callable[[Any], jax.Array] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Heavy-ball momentum on ``inner``'s updates, restarted when it turns uphill.

  Returns :math:`m_t = (1 - \beta) s_t + \beta m_{t-1}` (with ``nesterov``,
  :math:`(1 - \beta) s_t + \beta m_t`), with :math:`s_t` the update of ``inner`` and
  :math:`m_{t-1}` dropped first when the gradient passed to ``update``
  turns against it (see the module docstring). It wraps ``inner`` rather
  than following it in a chain because the test needs the gradient, which
  ``inner`` has already turned into a step.

  Args:
    inner: the transformation whose updates are averaged.
    decay: :math:`\beta \in [0, 1)`.
    nesterov: use Nesterov's momentum.
    gradient_step_product: ``inner_state -> <g, s_t>``, read from
      ``inner``'s new state (:func:`capped_kwng_step_product`); None sums
      the products over the leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`RestartedMomentumState`.
  """

  def init_fn(params):
    return RestartedMomentumState(
        inner_state=inner.init(params),
        momentum=otu.tree_zeros_like(params),
        momentum_restarts=jnp.zeros((), jnp.int32),
        momentum_gradient_product=jnp.zeros((), jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    steps, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    # Where the inner step is zero because its inputs were unusable (NaN or
    # Inf gradient or samples, a traced option out of range), the update
    # stays zero and the momentum waits: old velocity must not carry the
    # parameters through a step the diagnostics call void.
    # KWNG's diagnostics already say it; another inner transformation costs
    # one more pass over the gradient.
    info = otu.tree_get(inner_state, 'kwng_info')
    if info is not None:
      usable = info.usable
    else:
      usable = jnp.isfinite(sharding.tree_vdot(updates, updates))
    if gradient_step_product is None:
      step_product = sharding.tree_vdot(updates, steps)
    else:
      step_product = gradient_step_product(inner_state)
    momentum_product = sharding.tree_vdot(updates, state.momentum)
    restart = momentum_product < -RESTART_RATIO * step_product
    # <g, m_t> and <g, u_t> by linearity, from the two products.
    new_momentum_product = (1 - decay) * step_product + decay * jnp.where(
        restart, 0.0, momentum_product)
    update_product = ((1 - decay) * step_product + decay * new_momentum_product
                      if nesterov else new_momentum_product)

    def accumulate(s, m):
      return ((1 - decay) * s + decay * jnp.where(restart, jnp.zeros_like(m), m)).astype(m.dtype)

    # The update is read from the stored momentum, not recomputed from
    # m_{t-1}: then nothing reads m_{t-1} after the store, which XLA can
    # write in place over the donated state (670k-parameter MLP, M = 5, on
    # 2 cores: a copy of the momentum per step less, 12.5 against 13.1 ms).
    momentum = jax.tree.map(
        lambda new, old: jnp.where(usable, new, old),
        jax.tree.map(accumulate, steps, state.momentum), state.momentum)
    if nesterov:
      new_updates = jax.tree.map(lambda s, m: ((1 - decay) * s + decay * m).astype(s.dtype),
                                 steps, momentum)
    else:
      new_updates = momentum
    return (
        jax.tree.map(lambda u: jnp.where(usable, u, jnp.zeros_like(u)), new_updates),
        RestartedMomentumState(
            inner_state=inner_state,
            momentum=momentum,
            momentum_restarts=state.momentum_restarts + (usable & restart).astype(jnp.int32),
            momentum_gradient_product=jnp.where(usable, update_product, 0.0).astype(jnp.float32),
        ),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def capped_kwng_step_product(inner_state: Any) -> jax.Array:
  r""":math:`\langle g, s_t\rangle` of :func:`kwng_jax.kwng`'s capped step, from its state.

  The step of ``chain(scale_by_kwng, scale_by_displacement(mode='cap'))``
  is the cap's factor times :math:`\hat g`, or times g where KWNG fell
  back to it, or zero where its inputs were unusable; KWNG's diagnostics
  hold :math:`\langle g, \hat g\rangle` and :math:`\langle g, g\rangle`.
  So the restart test costs no pass over the step, which would sit between
  the displacement's JVP and the update (670k-parameter MLP, M = 5, on 2
  cores: 0.17 ± 0.05 ms less per step, paired over 15 rounds). On a
  fallback with :math:`\|g\|` beyond float32's range (1.8e19) the
  product is infinite: no restart, and :func:`kwng_jax.kwng`'s adaptive
  :math:`\epsilon` counts the step as failed.
  """
  info = otu.tree_get(inner_state, 'kwng_info')
  cap = otu.tree_get(inner_state, 'displacement_scale').astype(jnp.float32)
  # A zero cap (Delta not finite) zeroes the step: 0, not 0 * inf, when
  # <g, g> overflowed too.
  product = jnp.where(info.fallback, jnp.where(cap > 0, cap * info.squared_gradient_norm, 0.0),
                      cap * info.alignment)
  return jnp.where(info.usable, product, 0.0)
