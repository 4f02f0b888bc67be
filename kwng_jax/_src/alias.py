"""The ready-made KWNG optimizers: the recommended one and the published one."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from kwng_jax import kernels as kernels_lib
from kwng_jax._src import adaptive_epsilon
from kwng_jax._src import clipping
from kwng_jax._src import displacement
from kwng_jax._src import momentum as momentum_lib
from kwng_jax._src import options
from kwng_jax._src import stacking
from kwng_jax._src import transform


def kwng(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    num_basis: int = 5,
    epsilon: float = 1e-5,
    *,
    momentum: float | None = 0.9,
    nesterov: bool = False,
    adaptive: bool = True,
    kernel: kernels_lib.KernelLike = 'gaussian',
    bandwidth: kernels_lib.BandwidthLike = 'mean_distance',
    log_bandwidth: float = 0.0,
    damping: options.Damping = 'metric_diagonal',
    ridge: float = 0.0,
    rcond: float | None = None,
    seed: int = 0,
    update_every: int | None = None,
    jacobian_samples: options.JacobianSamples = 'auto',
    jacobian_dtype: Any = None,
    jacobian_batching: options.JacobianBatching = 'auto',
) -> optax.GradientTransformationExtraArgs:
  r"""The KWNG optimizer to reach for: steps measured where the samples move.

  Each step computes the KWNG direction :math:`\hat g_t(\epsilon)` of
  :func:`kwng_jax.scale_by_kwng` (with its fallback to g), caps it where
  the samples move, averages the capped steps with momentum :math:`\beta`
  and moves the parameters by

  .. math::

     s_t = \min\big(1, 1 / \Delta(\hat g_t)\big) \, \hat g_t, \qquad
     m_t = (1 - \beta) \, s_t + \beta \, m_{t-1}, \qquad
     u_t = -\eta \, m_t,

  with :math:`\eta` the learning rate and :math:`\Delta` the RMS
  displacement of the samples ``outputs_fn(params)`` along a step
  (:func:`kwng_jax.scale_by_displacement`, one ``jax.jvp``). So **the
  learning rate is the largest distance, RMS over the batch and in the units
  of the samples, that a step moves them** (for a classifier: the logits):
  each :math:`s_t` moves them by 1 at most, and :math:`m_t` is an average
  of such steps (to first order; the first steps, from :math:`m_0 = 0`, are
  shorter). With ``nesterov=True`` the update is
  :math:`-\eta ((1 - \beta) s_t + \beta m_t)`; with ``momentum=None`` it
  is :math:`-\eta s_t`. The momentum restarts (:math:`m_{t-1} \leftarrow 0`)
  when the new gradient says that it goes uphill faster than the new step
  goes down, :math:`\langle g_t, m_{t-1}\rangle < -0.3 \langle g_t, s_t
  \rangle`, so that a deterministic problem does not overshoot its minimum
  (O'Donoghue and Candès' adaptive restart, with a margin).

  Measuring the step on the samples rather than in parameter space keeps it
  invariant to how the model is parametrized, up to the estimation error of
  KWNG; the published chain clips the direction to a Euclidean norm
  instead, which an ill-conditioned parametrization distorts. The momentum
  and its restart test are invariant too (a gradient pairs with a step).
  Momentum averages the noise of the minibatch and of the random basis: on
  the digits CNN of the benchmarks the runs without it score 0.827 on the
  well-conditioned head (three seeds of ten between 0.19 and 0.74) against
  0.974 with it, and 0.957 against 0.968 on the ill-conditioned one; on
  the MLP the two tie. The
  default learning rate 1 is the safe choice on deterministic (full-batch)
  problems; minibatch training may prefer up to 3.

  :math:`\epsilon` responds to the loss at every step (Levenberg–Marquardt,
  :func:`kwng_jax.adaptive_damping` with ``window=1, ratio_scale=1``): it
  grows (divided by 0.85) when the last step decreased the loss by less than
  a quarter of its first-order prediction, so steps shrink toward a
  preconditioned gradient step, and shrinks (times 0.85) when it decreased
  it by more than three quarters, within :math:`[10^{-10}, 10^5]`; a step
  that momentum sends uphill (:math:`\langle g, u\rangle > 0`) counts as
  failed.

  The damping ``'metric_diagonal'`` makes :math:`\epsilon D^{-1}`
  :math:`\epsilon` times the diagonal of the samples' own metric,
  :math:`(J^\top J)_{jj} / N`, estimated from two random probes per step
  that ride in the same batched VJP as T and averaged over steps in the
  state (:func:`kwng_jax.probes.metric_diagonal_damping`,
  :class:`kwng_jax.probes.DiagonalAverage`). Rescaling a parameter
  then rescales both terms of the metric alike, so the direction is
  covariant under any diagonal reparametrization, on the null space of the
  rank-M estimate too (the published damping is not). Each entry is
  floored at 1e-2 of its unit's mean (the entries of a kernel that share
  its last index), so a parameter the batch barely moves does not take a
  huge step; parameters that the samples do not see (used by the loss but
  not by ``outputs_fn``; dead units) get a bounded step.

  The update takes ``outputs_fn=`` and, when adaptive, ``value=`` (the
  loss of the batch): ``opt.update(grads, state, params,
  outputs_fn=outputs_fn, value=loss)``.

  Args:
    learning_rate: :math:`\eta`, the largest RMS displacement of the
      samples per step (a float or an Optax schedule). Default 1.
    num_basis: M, the number of basis functions.
    epsilon: initial regularization strength :math:`\epsilon`.
    momentum: :math:`\beta \in [0, 1)`, the decay of the running
      average of the capped steps, or None for none.
    nesterov: use Nesterov's momentum.
    adaptive: adapt :math:`\epsilon` from the loss at every step.
    kernel: see :func:`kwng_jax.scale_by_kwng`.
    bandwidth: see :func:`kwng_jax.scale_by_kwng`.
    log_bandwidth: see :func:`kwng_jax.scale_by_kwng`.
    damping: see :func:`kwng_jax.scale_by_kwng` (default
      ``'metric_diagonal'``).
    ridge: see :func:`kwng_jax.scale_by_kwng`.
    rcond: see :func:`kwng_jax.scale_by_kwng`.
    seed: see :func:`kwng_jax.scale_by_kwng`.
    update_every: see :func:`kwng_jax.scale_by_kwng`.
    jacobian_samples: default ``'auto'``: T (and the probes of the
      damping) from the first 32 samples when ``outputs_fn`` can run on
      them alone (:func:`kwng_jax.batch_outputs_fn`,
      :func:`kwng_jax.flax_utils.nnx_outputs_fn`) or a
      ``jacobian_outputs_fn`` is passed, from the whole batch otherwise; a
      number n or None as for :func:`kwng_jax.scale_by_kwng`. The kernel's
      samples, the basis and the displacement :math:`\Delta` use the whole
      batch (:math:`\Delta` from the 32 samples let 2 to 3 of 10 seeds of
      the digits CNN diverge).
    jacobian_dtype: see :func:`kwng_jax.scale_by_kwng`.
    jacobian_batching: see :func:`kwng_jax.natural_gradient`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import kwng_jax
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> outputs_fn = lambda p: x @ p
    >>> loss_fn = lambda p: jnp.mean((outputs_fn(p) - 1.0) ** 2)
    >>> params = jnp.zeros((3, 2))
    >>> opt = kwng_jax.kwng()
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   loss, grads = jax.value_and_grad(loss_fn)(params)
    ...   updates, state = opt.update(grads, state, params,
    ...                               outputs_fn=outputs_fn, value=loss)
    ...   return params + updates, state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> best = jnp.linalg.lstsq(x, jnp.ones((32, 2)))[0]
    >>> bool(loss_fn(params) < 1.01 * loss_fn(best))
    True

  References:
    Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
    ICLR 2020 (arXiv 1910.09652).

    O'Donoghue, Candès, *Adaptive Restart for Accelerated Gradient Schemes*,
    Foundations of Computational Mathematics 15 (2015).
  """
  direction = _scale_by_kwng(locals())
  options.check_learning_rate(learning_rate)
  step = optax.chain(direction, displacement.scale_by_displacement(1.0, mode='cap'))
  if momentum is not None:
    options.check_momentum(momentum)
    # On the capped steps: the raw directions (up to 1/epsilon on the
    # estimate's null space) would swamp an average taken before the cap.
    step = momentum_lib.restarted_momentum(
        step, momentum, nesterov=nesterov,
        gradient_step_product=momentum_lib.capped_kwng_step_product)
  steps = [step, optax.scale_by_learning_rate(learning_rate)]
  chain = optax.chain(*steps)
  if adaptive:
    chain = adaptive_epsilon.adaptive_damping(
        chain, window=1, ratio_scale=1.0, predicted_decrease=_predicted_decrease(learning_rate))
  return _stackable_like(chain, direction)


def _predicted_decrease(
    learning_rate: optax.ScalarOrSchedule,
) -> Callable[[Any, jax.Array], jax.Array]:
  r""":math:`-\langle g, u\rangle` of :func:`kwng`'s update, read from its chain's state.

  The update is :math:`u = -\eta_t m`, m the momentum's output (or the
  capped step without momentum), whose product with g the state records;
  :math:`\eta_t` is the learning rate at the update's count, as
  ``optax.scale_by_learning_rate`` evaluates it. So the adaptive
  :math:`\epsilon` costs no pass over the update at the end of the step
  (670k-parameter MLP, M = 5, on 2 cores: 0.62 ± 0.07 ms less per step,
  paired over 15 rounds).
  """

  def predicted_decrease(chain_state: Any, count: jax.Array) -> jax.Array:
    product = otu.tree_get(chain_state, 'momentum_gradient_product')
    if product is None:
      product = momentum_lib.capped_kwng_step_product(chain_state)
    rate = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(rate, jnp.float32) * product

  return predicted_decrease


def published_kwng(
    learning_rate: optax.ScalarOrSchedule,
    num_basis: int = 5,
    epsilon: float = 1e-5,
    *,
    max_norm: float | None = 1.0,
    adaptive: bool = True,
    kernel: kernels_lib.KernelLike = 'gaussian',
    bandwidth: kernels_lib.BandwidthLike = 'mean_distance',
    log_bandwidth: float = 0.0,
    damping: options.Damping = 'reference',
    ridge: float = 0.0,
    rcond: float | None = None,
    seed: int = 0,
    update_every: int | None = None,
    jacobian_samples: options.JacobianSamples = None,
    jacobian_dtype: Any = None,
    jacobian_batching: options.JacobianBatching = 'auto',
) -> optax.GradientTransformationExtraArgs:
  r"""The KWNG optimizer of the paper's experiments, as an Optax chain.

  Kept for parity with the published implementation (its reference
  configuration: ``published_kwng(10.0)`` on CIFAR-10, M = 5); for training,
  :func:`kwng_jax.kwng` is the better choice. It is
  ``scale_by_kwng`` (with its fallback to g), clipping of the direction to
  global norm ``max_norm``, the learning rate (a float or an Optax schedule),
  and, with ``adaptive=True``, the Levenberg–Marquardt adaptation of
  :math:`\epsilon` of :func:`kwng_jax.adaptive_damping` wrapped around it.
  The update takes ``outputs_fn=`` and, when adaptive, ``value=`` (the loss).

  Args:
    learning_rate: a float or a schedule ``step -> lr``.
    num_basis: M, the number of basis functions (published: 5).
    epsilon: initial regularization strength (published: 1e-5).
    max_norm: clip the direction to this global norm (published: 1);
      ``None`` disables clipping. The norm is computed in at least float32
      (:func:`kwng_jax.clip_by_global_norm`).
    adaptive: adapt :math:`\epsilon` from the loss (published: on).
    kernel: see :func:`kwng_jax.scale_by_kwng`.
    bandwidth: see :func:`kwng_jax.scale_by_kwng`.
    log_bandwidth: see :func:`kwng_jax.scale_by_kwng`.
    damping: see :func:`kwng_jax.scale_by_kwng` (published: 'reference').
    ridge: see :func:`kwng_jax.scale_by_kwng`.
    rcond: see :func:`kwng_jax.scale_by_kwng`.
    seed: see :func:`kwng_jax.scale_by_kwng`.
    update_every: rebuild the factors every this many steps (None: every
      step); see :func:`kwng_jax.scale_by_kwng`.
    jacobian_samples: compute T on this many samples; see
      :func:`kwng_jax.scale_by_kwng`.
    jacobian_dtype: dtype of the vector–Jacobian products; see
      :func:`kwng_jax.scale_by_kwng`.
    jacobian_batching: how the M VJPs run; see
      :func:`kwng_jax.natural_gradient`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import kwng_jax
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> outputs_fn = lambda p: x @ p
    >>> loss_fn = lambda p: jnp.mean((outputs_fn(p) - 1.0) ** 2)
    >>> params = jnp.zeros((3, 2))
    >>> opt = kwng_jax.published_kwng(learning_rate=0.5)
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   loss, grads = jax.value_and_grad(loss_fn)(params)
    ...   updates, state = opt.update(grads, state, params,
    ...                               outputs_fn=outputs_fn, value=loss)
    ...   params = params + updates
    >>> bool(jnp.all(jnp.isfinite(params)))
    True

  References:
    Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
    ICLR 2020 (arXiv 1910.09652).
  """
  direction = _scale_by_kwng(locals())
  options.check_learning_rate(learning_rate)
  steps = [direction]
  if max_norm is not None:
    steps.append(clipping.clip_by_global_norm(max_norm))
  steps.append(optax.scale_by_learning_rate(learning_rate))
  chain = optax.chain(*steps)
  if adaptive:
    chain = adaptive_epsilon.adaptive_damping(chain)
  return _stackable_like(chain, direction)


def _stackable_like(
    chain: optax.GradientTransformationExtraArgs,
    direction: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  """Lets :func:`kwng_jax.value_grad_and_update` stack ``chain``'s KWNG step.

  Sound because ``direction`` comes first in ``chain``: nothing before it
  changes the gradient.
  """
  found = stacking.stacking_of(direction)
  if found is not None:
    stacking.register(chain, found)
  return chain


def _scale_by_kwng(arguments: dict[str, Any]) -> optax.GradientTransformationExtraArgs:
  """:func:`kwng_jax.scale_by_kwng` with the options among an alias's ``locals()``."""
  names = inspect.signature(transform.scale_by_kwng).parameters
  return transform.scale_by_kwng(**{name: arguments[name] for name in names})
