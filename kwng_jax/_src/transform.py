r"""KWNG as an Optax gradient transformation.

:func:`scale_by_kwng` turns the gradient into the KWNG direction of
:func:`kwng_jax.natural_gradient`, with the published safety net: where
:math:`\hat g` is not a descent direction (:math:`\langle g, \hat g\rangle
\le 0`) or not finite, the gradient itself is passed on. Chain it with
clipping, a learning rate, momentum or Adam like any Optax transformation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kwng_jax._src import estimator
from kwng_jax._src import forward_pass
from kwng_jax._src import from_vjp
from kwng_jax import probes
from kwng_jax import kernels as kernels_lib
from kwng_jax._src import options
from kwng_jax._src import outputs as outputs_lib
from kwng_jax._src import sharding
from kwng_jax._src import stacking
from kwng_jax._src.preconditioner import KWNGInfo
from kwng_jax._src.preconditioner import Preconditioner

PyTree = Any


class ScaleByKWNGState(NamedTuple):
  """State of :func:`scale_by_kwng`.

  Field names are prefixed with ``kwng_`` so that
  ``optax.tree_utils.tree_get(state, 'kwng_epsilon')`` finds them inside any
  chain.

  Attributes:
    kwng_count: number of updates so far; the basis of step t is drawn with
      ``jax.random.fold_in(jax.random.key(seed), t)``.
    kwng_epsilon: the regularization strength :math:`\\epsilon` of the next update
      (changed by :func:`kwng_jax.adaptive_damping`, or by hand with
      ``optax.tree_utils.tree_set``).
    kwng_epsilon_setting: the ``epsilon`` the transformation was built with
      at the last update. When that value changes (a hyperparameter of
      ``optax.inject_hyperparams`` set by hand or by a schedule),
      ``kwng_epsilon`` is reset to it, and an adaptive rule carries on from
      there.
    kwng_info: the :class:`kwng_jax.KWNGInfo` diagnostics of the last update.
    kwng_preconditioner: with ``update_every > 1``, the
      :class:`kwng_jax.Preconditioner` (the M rows of :math:`\\tilde T`, D,
      :math:`\\tilde T D \\tilde T^\\top`) reused between rebuilds; its
      ``finite_samples`` is False until the first build. None (no leaves)
      with ``update_every=1``, so the default state stays a few scalars.
    kwng_metric_diagonal: with ``damping='metric_diagonal'``, the running
      average of the metric diagonal's estimates
      (:class:`kwng_jax.probes.DiagonalAverage`, one params-shaped pytree):
      each build adds the estimate of two probes to it instead of drawing
      four. None otherwise.
  """

  kwng_count: jax.Array
  kwng_epsilon: jax.Array
  kwng_epsilon_setting: jax.Array
  kwng_info: KWNGInfo
  kwng_preconditioner: Preconditioner | None = None
  kwng_metric_diagonal: probes.DiagonalAverage | None = None


def scale_by_kwng(
    num_basis: int = 5,
    epsilon: float = 1e-5,
    *,
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
  r"""Preconditions updates with the kernelized Wasserstein natural gradient.

  Each update draws M basis points from the samples ``outputs_fn(params)``
  and returns

  .. math::
     \hat g = (T^\top (Q + \lambda K)^{+} T + \epsilon D^{-1})^{-1} g

  (see :func:`kwng_jax.natural_gradient`), or g itself when
  :math:`\langle g, \hat g\rangle \le 0` or :math:`\hat g` is not finite.
  When g or the samples are not finite the update is zero and
  ``state.kwng_info.finite_inputs`` is False, so parameters never turn NaN.

  Its ``update(updates, state, params, *, outputs_fn, value=None,
  jacobian_outputs_fn=None, full_params=None, samples_and_vjp=None,
  preconditioner=None, **extra_args)`` needs ``params`` and the keyword
  ``outputs_fn``, a function ``params -> samples`` of shape ``(N, ...)`` (a
  classifier's logits for the batch) that computes the samples from the
  params it is given; or ``samples_and_vjp=jax.vjp(outputs_fn, params)``, a
  forward pass already run; or ``preconditioner``, the one
  :func:`kwng_jax.value_grad_and_update` built for this step. Other extra
  arguments are ignored.

  On a subset of the parameters. Inside ``optax.masked`` or
  ``optax.multi_transform`` the transformation sees only its leaves (the
  others are ``optax.MaskedNode``); pass all the params as
  ``full_params=params`` and the model's own ``outputs_fn`` runs on them,
  differentiated in the unmasked leaves only: the natural gradient of that
  subset, the others held fixed.

  Two traps. Inside ``optax.MultiSteps``, KWNG sees the averaged gradient
  but the samples of the last micro-batch, and its VJPs run at every
  micro-step (``MultiSteps`` computes the inner update at every step and
  keeps it at the last only). Under
  ``jax.jit(opt.update, static_argnames='outputs_fn')``, a new closure per
  step is a new static argument, so every step recompiles: jit the whole
  training step instead, with ``outputs_fn`` built inside it.

  Diagnostics. ``state.kwng_info`` (:class:`kwng_jax.KWNGInfo`) flags,
  without a host sync, non-finite inputs (the update is then zero), a
  direction that fell back to g, samples that do not depend on the params
  (also warned about at trace time), and hyperparameters given as traced
  values that are out of range (the update is then zero).

  Amortizing the cost. Almost all of KWNG's extra work is building
  :math:`\tilde T` and D (M vector–Jacobian products over the batch); the
  solve with g is an M×M system. Three options cut the building cost:

  * ``update_every=k``: build the basis, :math:`\tilde T` and D at steps
    0, k, 2k, … (under ``jax.lax.cond``, so the other steps skip the VJPs)
    and reuse them with the current g and :math:`\epsilon` in between. The
    state then holds them: :math:`(M + 1) P` numbers plus an M×M matrix. A
    build whose samples were not finite is redone at the next step. On
    CPU, XLA runs convolutions inside ``lax.cond`` far slower than outside
    (jax-ml/jax#12868): there, use it with dense models only (a
    ``RuntimeWarning`` at trace time says so).
  * ``jacobian_samples=n``: W, Q and T from the first n samples of the batch
    (basis and bandwidth from all of it). For the speed gain build
    ``outputs_fn`` with :func:`kwng_jax.batch_outputs_fn` (or pass
    ``jacobian_outputs_fn=lambda p: model(p, x[:n])`` to the update), so the
    VJPs run on n samples; without it the result is the same and the cost
    that of the whole batch. With ``samples_and_vjp`` and such an
    ``outputs_fn`` both passed, the samples come from the forward pass
    already run and T from the n samples' own.
  * ``jacobian_dtype=jnp.bfloat16``: the VJPs run on params cast to it
    (``outputs_fn`` must compute in its params' dtype); the samples, the
    kernel, the whitening and the M×M solve stay in at least float32.

  Their measured accuracy cost and speed gain are in the documentation (produced
  by ``benchmarks/amortization.py``).

  Args:
    num_basis: M, the number of basis functions; at most the batch size.
    epsilon: initial regularization strength :math:`\epsilon > 0`; it is state
      (``kwng_epsilon``) so that :func:`kwng_jax.adaptive_damping` can adapt it.
    kernel: a kernel name or a scalar function ``k(x, y[, bandwidth])``.
    bandwidth: ``'mean_distance'`` (published), ``'median'``, or a number.
    log_bandwidth: base-10 log of the multiplier of the bandwidth rule.
    damping: ``'reference'`` (published), ``'metric_diagonal'`` (the
      recommended :func:`kwng_jax.kwng`'s), ``'safe'``, ``'squared'`` or
      ``'identity'`` (see :func:`kwng_jax.solve.damping_diagonal`).
    ridge: :math:`\lambda \ge 0` (0: the ridgeless estimator).
    rcond: relative eigenvalue threshold of the whitening.
    seed: seed of the basis draws; keys are derived from it and the step
      count, so the state holds no key.
    update_every: k >= 1; rebuild the preconditioner every k steps (None or
      1: every step, nothing stored). A Python int: it fixes what the state
      holds. Under ``optax.inject_hyperparams``, name it in ``static_args``
      (with ``num_basis``); its default None is left alone there.
    jacobian_samples: n; compute W, Q and T from the first n samples
      (None: the whole batch; ``'auto'``: 32 when ``outputs_fn`` can run on
      its first rows alone, see :func:`kwng_jax.batch_outputs_fn`).
    jacobian_dtype: dtype of the VJPs that give T, e.g. ``jnp.bfloat16``.
    jacobian_batching: how the M VJPs run (default ``'auto'``: unrolled on
      CPU, batched with ``vmap`` on accelerators); see
      :func:`kwng_jax.natural_gradient`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kwng_jax
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> params = {'w': jnp.ones((3, 4))}
    >>> outputs_fn = lambda p: x @ p['w']
    >>> opt = optax.chain(kwng_jax.scale_by_kwng(num_basis=5),
    ...                   optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> state = opt.init(params)
    >>> grads = jax.grad(lambda p: jnp.mean(outputs_fn(p) ** 2))(params)
    >>> updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn)
    >>> updates['w'].shape
    (3, 4)

  References:
    Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
    ICLR 2020 (arXiv 1910.09652).
  """
  opts = options.EstimatorOptions.of(locals())
  options.check_positive('epsilon', epsilon)
  options.check_seed(seed)
  update_every = options.check_count(
      'update_every', 1 if update_every is None else update_every,
      '1 rebuilds the preconditioner at every step. '
      + options.static_args_fix('num_basis', 'update_every'),
  )

  def init_fn(params):
    outputs_lib.check_params(params)
    average = None
    if damping == 'metric_diagonal':
      average = probes.DiagonalAverage.zeros(params)
    stored = None
    if update_every > 1:
      stored = Preconditioner.empty(params, num_basis, damping)
    return ScaleByKWNGState(
        kwng_count=jnp.zeros((), jnp.int32),
        kwng_epsilon=jnp.asarray(epsilon, jnp.float32),
        kwng_epsilon_setting=jnp.asarray(epsilon, jnp.float32),
        kwng_info=KWNGInfo.empty(),
        kwng_preconditioner=stored,
        kwng_metric_diagonal=average,
    )

  def update_fn(
      updates,
      state,
      params=None,
      *,
      outputs_fn=None,
      jacobian_outputs_fn=None,
      full_params=None,
      samples_and_vjp=None,
      preconditioner=None,
      **extra_args,
  ):
    del extra_args
    if preconditioner is None:
      build, warn_if_convolutions = forward_pass.builder(
          opts, lambda: from_vjp.basis_key(seed, state.kwng_count), params,
          outputs_fn=outputs_fn,
          jacobian_outputs_fn=jacobian_outputs_fn, full_params=full_params,
          samples_and_vjp=samples_and_vjp, diagonal_average=state.kwng_metric_diagonal,
      )
    else:
      outputs_lib.check_params(params)
      if not isinstance(preconditioner, Preconditioner) or update_every > 1:
        raise ValueError(
            'preconditioner= takes the kwng_jax.Preconditioner of this step, as '
            'kwng_jax.value_grad_and_update builds it, and only without '
            f'update_every (here {update_every}); got {type(preconditioner)}.'
        )
    # A changed setting (inject_hyperparams) overrides the current epsilon.
    setting = jnp.asarray(epsilon, jnp.float32)
    current_epsilon = jnp.where(
        setting != state.kwng_epsilon_setting, setting, state.kwng_epsilon
    )
    stored = state.kwng_preconditioner
    # A preconditioner passed in without an average (built by
    # build_preconditioner), or stored factors reused, leave it as it was.
    average = state.kwng_metric_diagonal
    if preconditioner is None and stored is None:
      # Built for these updates: the Gram's pass over the rows gives T̃ D g.
      preconditioner = build(updates)
    elif preconditioner is None:
      warn_if_convolutions()
      stored = _pin_shardings(stored, params)

      def rebuilt():
        # The stored factors do not hold the average: the state holds it
        # once, so that no two leaves share a buffer (donation).
        fresh = build()
        return (_pin_shardings(_cast_like(fresh._replace(diagonal_average=None), stored), params),
                probes.sharded_like(fresh.diagonal_average, params))

      # A placeholder, or factors built from non-finite samples, are rebuilt.
      rebuild = (state.kwng_count % update_every == 0) | ~stored.finite_samples
      preconditioner, average = jax.lax.cond(
          rebuild, rebuilt, lambda: (stored, probes.sharded_like(average, params)))
    if preconditioner.diagonal_average is not None:
      average = preconditioner.diagonal_average
    direction, info = estimator.apply_preconditioner(
        preconditioner, updates, current_epsilon
    )
    direction = safe_direction(updates, direction, info)
    new_state = ScaleByKWNGState(
        kwng_count=optax.safe_increment(state.kwng_count),
        kwng_epsilon=current_epsilon,
        kwng_epsilon_setting=setting,
        kwng_info=info,
        kwng_preconditioner=None if stored is None else preconditioner,
        kwng_metric_diagonal=average,
    )
    return direction, new_state

  transformation = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  if update_every == 1 and jacobian_samples in (None, 'auto') and jacobian_dtype is None:
    stacking.register(transformation, stacking.Stacking(opts, seed))
  return transformation


def _cast_like(
    preconditioner: Preconditioner, stored: Preconditioner
) -> Preconditioner:
  # Both branches of the lax.cond must have one type; the dtypes already
  # agree for the default dtypes, this holds them to it (x64 toggled, say).
  return jax.tree.map(lambda x, s: x.astype(s.dtype), preconditioner, stored)


def _pin_shardings(
    preconditioner: Preconditioner, params: PyTree
) -> Preconditioner:
  """Gives stored and fresh factors the sharding of the params (explicit mesh)."""
  return preconditioner._replace(
      whitened_rows=tuple(sharding.like(row, params) for row in preconditioner.whitened_rows),
      damping=sharding.like(preconditioner.damping, params),
      unseen=None if preconditioner.unseen is None
      else sharding.like(preconditioner.unseen, params),
  )


def safe_direction(
    grads: PyTree, direction: PyTree, info: KWNGInfo
) -> PyTree:
  r"""The published safety net around :math:`\hat g`.

  Returns :math:`\hat g` when it is finite and a descent direction, else g;
  zero where the inputs (g or the samples) are not finite, or a traced
  hyperparameter was out of range.
  """
  # With finite inputs, g is finite, and so is ĝ unless the fallback fired.
  def select(g, d):
    chosen = jnp.where(info.fallback, g, d)
    return jnp.where(info.usable, chosen, jnp.zeros_like(chosen))

  return jax.tree.map(select, grads, direction)

