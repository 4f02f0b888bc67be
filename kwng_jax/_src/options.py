"""Validation of KWNG's options, in one place.

Every public entry point (:func:`kwng_jax.kwng`, :func:`kwng_jax.scale_by_kwng`,
:func:`kwng_jax.natural_gradient` …) checks its options here when it is
built, so that a bad value raises a ``ValueError`` naming the argument and
its fix before anything is traced. Python numbers, NumPy scalars and
concrete JAX arrays are all checked. A value that is traced (a
hyperparameter of ``optax.inject_hyperparams`` under ``jit``) cannot be
checked when built: :func:`traced_options_valid` checks it inside the
computation instead, and the update is zero and flagged
(``KWNGInfo.valid_hyperparameters``) when it is out of range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
import numbers
from typing import Any, Literal, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

#: The bandwidth rules (see :func:`kwng_jax.kernels.select_bandwidth`).
BANDWIDTH_RULES = ('mean_distance', 'median')

Damping = Literal['reference', 'safe', 'squared', 'identity', 'metric_diagonal']
JacobianBatching = Literal['auto', 'vmap', 'loop', 'map']
JacobianSamples = int | Literal['auto'] | None

#: The n of ``jacobian_samples='auto'``. On the digits benchmarks (10 fresh
#: seeds, test accuracy at the learning rate chosen on validation), T from
#: the first 32 of 128 samples gave 0.977 on the ill-conditioned MLP and
#: 0.968 on the ill-conditioned CNN, against 0.976 and 0.967 from the
#: whole batch (every accuracy target held with either); each of its VJPs
#: costs a quarter of the batch's.
AUTO_JACOBIAN_SAMPLES = 32


def fixed_rows(jacobian_samples: JacobianSamples) -> int | None:
  """``jacobian_samples`` as a number of rows; None (and an ``'auto'`` with
  nothing that could run on fewer rows) is the whole batch."""
  return None if isinstance(jacobian_samples, str) else jacobian_samples


#: How the M VJPs that give T run (see :func:`kwng_jax.factors.jacobian_factor`).
JACOBIAN_BATCHINGS = ('auto', 'vmap', 'loop', 'map')


def resolved_batching(batching: str) -> str:
  """``'auto'``: M unrolled VJPs on CPU (measured faster there), one batched
  ``vmap`` on accelerators; any other value as given."""
  if batching != 'auto':
    return batching
  return 'loop' if jax.default_backend() == 'cpu' else 'vmap'


BandwidthRule = Literal['mean_distance', 'median']


class EstimatorKwargs(TypedDict, total=False):
  """The options of :class:`EstimatorOptions` as keyword arguments.

  The type of ``**options`` in :func:`kwng_jax.natural_gradient`,
  :func:`kwng_jax.build_preconditioner` and
  :func:`kwng_jax.preconditioner_from_vjp`, so that a type checker knows
  the names and types those functions accept.
  """

  num_basis: int
  kernel: Any
  bandwidth: BandwidthRule | float | Any
  log_bandwidth: float | Any
  damping: Damping
  ridge: float | Any
  rcond: float | None
  jacobian_samples: JacobianSamples
  jacobian_dtype: Any
  jacobian_batching: JacobianBatching


@dataclasses.dataclass(frozen=True, eq=False)
class EstimatorOptions:
  """The options of the KWNG estimator, validated once when built.

  The public entry points (:func:`kwng_jax.kwng`,
  :func:`kwng_jax.scale_by_kwng`, :func:`kwng_jax.build_preconditioner`,
  :func:`kwng_jax.preconditioner_from_vjp`, :func:`kwng_jax.natural_gradient`)
  take these as flat keyword arguments, build one ``EstimatorOptions`` and
  pass it inward; :func:`kwng_jax.natural_gradient` says what each option
  means, and these defaults are those of every entry point but
  :func:`kwng_jax.kwng` (whose ``damping`` is ``'metric_diagonal'``). Numeric
  options may be traced (``optax.inject_hyperparams``): those are checked
  inside the computation (:func:`traced_options_valid`).
  """

  num_basis: int = 5
  kernel: Any = 'gaussian'
  bandwidth: BandwidthRule | float | Any = 'mean_distance'
  log_bandwidth: float | Any = 0.0
  damping: Damping = 'reference'
  ridge: float | Any = 0.0
  rcond: float | None = None
  jacobian_samples: JacobianSamples = None
  jacobian_dtype: Any = None
  jacobian_batching: JacobianBatching = 'auto'

  @classmethod
  def of(cls, arguments: dict[str, Any]) -> 'EstimatorOptions':
    """The options among ``arguments`` (an entry point's ``locals()``)."""
    return cls(**{field.name: arguments[field.name] for field in dataclasses.fields(cls)})

  @classmethod
  def from_kwargs(cls, function: str, options: Mapping[str, Any]) -> 'EstimatorOptions':
    """The options a function received as ``**options``; raises on an unknown name."""
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
      raise TypeError(
          f'{function}() got an unexpected keyword argument {unknown[0]!r}; '
          f'its options are {names}.'
      )
    return cls(**options)

  def __post_init__(self):
    check_estimator_options(
        **{field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
    )

  def traced_valid(self) -> jax.Array:
    """Whether the numeric options, traced or not, are in range (a bool scalar)."""
    return traced_options_valid(
        bandwidth=self.bandwidth, log_bandwidth=self.log_bandwidth,
        ridge=self.ridge, rcond=self.rcond,
    )


def is_traced(value: Any) -> bool:
  """Whether ``value`` is a JAX tracer (its number is unknown at trace time)."""
  return isinstance(value, jax.core.Tracer)


def _scalar(name: str, value: Any, requirement: str) -> float | None:
  """``value`` as a float, None if traced; raises naming ``name`` otherwise."""
  if is_traced(value):
    return None
  if isinstance(value, (str, bytes, bool, np.bool_)) or value is None:
    raise ValueError(f'{name}={value!r} must be {requirement}.')
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f'{name}={value!r} must be {requirement}.') from None
  if array.ndim:
    raise ValueError(
        f'{name} must be a scalar, {requirement}; got an array of shape '
        f'{array.shape}.'
    )
  return float(array)


def check_positive(name: str, value: Any) -> None:
  """Raises unless a concrete ``value`` is a finite number > 0."""
  number = _scalar(name, value, 'a finite positive number')
  if number is not None and not (np.isfinite(number) and number > 0):
    raise ValueError(f'{name}={value!r} must be a finite positive number.')


def check_nonnegative(name: str, value: Any, meaning_of_zero: str) -> None:
  """Raises unless a concrete ``value`` is a finite number >= 0."""
  number = _scalar(name, value, 'a finite number >= 0')
  if number is not None and not (np.isfinite(number) and number >= 0):
    raise ValueError(
        f'{name}={value!r} must be a finite number >= 0 ({meaning_of_zero}).'
    )


def check_finite(name: str, value: Any) -> None:
  """Raises unless a concrete ``value`` is a finite number."""
  number = _scalar(name, value, 'a finite number')
  if number is not None and not np.isfinite(number):
    raise ValueError(f'{name}={value!r} must be a finite number.')


def check_count(name: str, value: Any, fix: str) -> int:
  """Returns ``value`` as an int; raises unless it is a Python integer >= 1.

  A JAX array is refused even when concrete: the count fixes shapes, so it
  must be known when the update is traced.
  """
  if isinstance(value, jax.Array) or is_traced(value):
    raise ValueError(
        f'{name}={value!r} must be a Python int: it fixes the shapes of the '
        f'computation. {fix}'
    )
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{name}={value!r} must be a positive integer. {fix}')
  if value < 1:
    raise ValueError(f'{name}={value!r} must be at least 1. {fix}')
  return int(value)


def static_args_fix(*names: str) -> str:
  """The fix of a count given as an array: ``inject_hyperparams``'s static_args."""
  return (
      'With optax.inject_hyperparams, list it in static_args, e.g. '
      f'optax.inject_hyperparams(kwng_jax.kwng, static_args={names!r}).'
  )


def check_rcond(rcond: Any) -> None:
  """Raises unless ``rcond`` is None or a concrete number in [0, 1)."""
  if rcond is None:
    return
  number = _scalar('rcond', rcond, 'None or a number in [0, 1)')
  if number is not None and not 0 <= number < 1:
    raise ValueError(
        f'rcond={rcond!r} must lie in [0, 1): eigenvalues below rcond times '
        'the largest are dropped (None: M times the machine epsilon).'
    )


def check_bandwidth(bandwidth: Any) -> None:
  """Raises unless ``bandwidth`` is a rule name or a finite positive number."""
  if isinstance(bandwidth, str):
    if bandwidth not in BANDWIDTH_RULES:
      raise ValueError(
          f'Unknown bandwidth={bandwidth!r}; valid rules are '
          f'{list(BANDWIDTH_RULES)}, or pass a positive number.'
      )
    return
  number = _scalar(
      'bandwidth', bandwidth, f'a rule in {list(BANDWIDTH_RULES)} or a positive number'
  )
  if number is not None and not (np.isfinite(number) and number > 0):
    raise ValueError(
        f'bandwidth={bandwidth!r} must be a finite positive number, or one of '
        f'the rules {list(BANDWIDTH_RULES)}.'
    )


def check_seed(seed: Any) -> None:
  """Raises unless ``seed`` is an integer (the basis keys derive from it)."""
  if is_traced(seed):
    return
  if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jnp.integer):
    return
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
    raise ValueError(
        f'seed={seed!r} must be an integer; the basis of step t is drawn with '
        'jax.random.fold_in(jax.random.key(seed), t).'
    )


def check_learning_rate(learning_rate: Any) -> None:
  """Raises unless ``learning_rate`` is a finite number >= 0 or a schedule."""
  if callable(learning_rate):
    return
  number = _scalar(
      'learning_rate', learning_rate,
      'a finite number >= 0 or a schedule step -> learning rate',
  )
  if number is not None and not (np.isfinite(number) and number >= 0):
    raise ValueError(
        f'learning_rate={learning_rate!r} must be a finite number >= 0 (or a '
        'schedule step -> learning rate); a negative one would ascend the loss.'
    )


def check_momentum(momentum: Any) -> None:
  """Raises unless a concrete ``momentum`` is a number in [0, 1)."""
  number = _scalar('momentum', momentum, 'a number in [0, 1), or None for no momentum')
  if number is not None and not (0 <= number < 1):
    raise ValueError(
        f'momentum={momentum!r} must be in [0, 1) (0.9 is usual), or None for '
        'no momentum; at 1 or more the steps would never decay.'
    )


def check_estimator_options(
    *,
    num_basis: Any,
    kernel: Any,
    bandwidth: Any,
    log_bandwidth: Any,
    damping: Any,
    ridge: Any,
    rcond: Any,
    jacobian_samples: Any,
    jacobian_dtype: Any,
    jacobian_batching: Any = 'auto',
) -> None:
  """Checks the options of the estimator; raises a ValueError naming a bad one."""
  # Imported here: kernels and solve import this module's checks.
  from kwng_jax import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  from kwng_jax import solve  # pylint: disable=g-import-not-at-top

  check_count('num_basis', num_basis, static_args_fix('num_basis'))
  kernels_lib.resolve_kernel(kernel)
  check_bandwidth(bandwidth)
  check_finite('log_bandwidth', log_bandwidth)
  solve.check_damping(damping)
  check_nonnegative('ridge', ridge, '0 gives the ridgeless estimator')
  check_rcond(rcond)
  if jacobian_samples is not None and not (
      isinstance(jacobian_samples, str) and jacobian_samples == 'auto'):
    check_count(
        'jacobian_samples', jacobian_samples,
        "Pass a number of samples, 'auto', or None to use the whole batch.",
    )
  if jacobian_batching not in JACOBIAN_BATCHINGS:
    raise ValueError(
        f'Unknown jacobian_batching={jacobian_batching!r}; valid values are '
        f'{list(JACOBIAN_BATCHINGS)}.'
    )
  if jacobian_dtype is not None and not jnp.issubdtype(
      jnp.dtype(jacobian_dtype), jnp.floating
  ):
    raise ValueError(
        f'jacobian_dtype={jacobian_dtype!r} must be a floating dtype such as '
        "jnp.bfloat16 (or None to differentiate in the params' dtype)."
    )


def traced_options_valid(
    *,
    epsilon: Any = None,
    bandwidth: Any = None,
    log_bandwidth: Any = None,
    ridge: Any = None,
    rcond: Any = None,
) -> jax.Array:
  """A bool scalar: whether the given (possibly traced) options are in range.

  The same ranges as the checks at construction: :math:`\\epsilon` and a
  numeric bandwidth finite and > 0, ``log_bandwidth`` finite, ``ridge``
  finite and >= 0, ``rcond`` in [0, 1). Options left None, and bandwidth
  rules given by name, are not checked.
  """
  valid = jnp.ones((), jnp.bool_)

  def as_float(value):
    return jnp.asarray(value).astype(jnp.float32)

  if epsilon is not None:
    valid &= jnp.isfinite(as_float(epsilon)) & (as_float(epsilon) > 0)
  if bandwidth is not None and not isinstance(bandwidth, str):
    valid &= jnp.isfinite(as_float(bandwidth)) & (as_float(bandwidth) > 0)
  if log_bandwidth is not None:
    valid &= jnp.isfinite(as_float(log_bandwidth))
  if ridge is not None:
    valid &= jnp.isfinite(as_float(ridge)) & (as_float(ridge) >= 0)
  if rcond is not None:
    valid &= (as_float(rcond) >= 0) & (as_float(rcond) < 1)
  return valid
