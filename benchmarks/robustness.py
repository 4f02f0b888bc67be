r"""Bad and unusual inputs: does every one give a clear error or a flagged, finite update?

Each case feeds KWNG one bad or unusual input, eagerly and under ``jax.jit``,
and sorts what happens:

* ``clear_error``: a ``ValueError`` or ``TypeError`` whose message names the
  argument (and so points at the fix);
* ``flagged``: no error, a finite update, and the flag the case expects set
  in the diagnostics (``kwng_info``);
* ``handled``: an unusual but valid input that trains as it should;
* ``cryptic``: any other error, or one that does not name the argument;
* ``silent``: no error, and an update that is not finite, not flagged, or
  not what the input asked for.

The target is 0 cryptic and 0 silent. Writes ``robustness.json`` and
``robustness.png`` (the outcome counts) under ``--out``.

  python benchmarks/robustness.py
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
import dataclasses
import pathlib
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

import kwng_jax

import common

DEFAULT_OUT = pathlib.Path(__file__).parent / 'results' / 'robustness'

_KEYS = jax.random.split(jax.random.key(0), 3)
X = jax.random.normal(_KEYS[0], (32, 3))
Y = jax.random.normal(_KEYS[1], (32, 2))
PARAMS = {'w': 0.5 * jax.random.normal(_KEYS[2], (3, 2)), 'b': jnp.zeros(2)}


def outputs_fn(params):
  return jnp.tanh(X @ params['w'] + params['b'])


def loss_fn(params):
  return jnp.mean(jnp.square(outputs_fn(params) - Y))


@dataclasses.dataclass
class Result:
  params: Any
  state: Any
  updates: Any

  def info(self) -> kwng_jax.KWNGInfo:
    return otu.tree_get(self.state, 'kwng_info')

  def finite(self) -> bool:
    return all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(self.updates))

  def moved(self) -> bool:
    return any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(self.updates))


def run(
    opt: optax.GradientTransformation,
    use_jit: bool,
    *,
    params: Any = None,
    outputs: Callable[[Any], Any] = outputs_fn,
    loss: Callable[[Any], Any] = loss_fn,
    steps: int = 2,
    value: Any = 'loss',
    grads_fn: Callable[[Any], Any] | None = None,
    **extra: Any,
) -> Result:
  """Runs ``steps`` updates of ``opt``; returns the last ones."""
  params = PARAMS if params is None else params
  state = opt.init(params)

  def step(params, state):
    loss_value, grads = jax.value_and_grad(loss)(params)
    if grads_fn is not None:
      grads = grads_fn(grads)
    kwargs = dict(extra, outputs_fn=outputs)
    if value is not None:
      kwargs['value'] = loss_value if isinstance(value, str) else value
    updates, state = opt.update(grads, state, params, **kwargs)
    return optax.apply_updates(params, updates), state, updates

  if use_jit:
    step = jax.jit(step)
  updates = None
  for _ in range(steps):
    params, state, updates = step(params, state)
  return Result(params, state, updates)


@dataclasses.dataclass
class Case:
  """One input. ``keywords``: what a clear error must mention (None: no error
  is acceptable); ``check``: what a returned result must satisfy (None: only
  an error is acceptable)."""

  name: str
  kind: str  # 'bad' or 'unusual'
  build: Callable[[bool], Any]
  keywords: tuple[str, ...] | None = None
  check: Callable[[Any], bool] | None = None


CASES: list[Case] = []


def case(name, kind='bad', keywords=None, check=None):
  def register(build):
    CASES.append(Case(name, kind, build, keywords, check))
    return build
  return register


def error_case(name: str, keywords: tuple[str, ...], build: Callable[[bool], Any]):
  CASES.append(Case(name, 'bad', build, keywords, None))


def _flag(field: str, expected: bool = False) -> Callable[[Result], bool]:
  def check(result: Result) -> bool:
    return result.finite() and bool(getattr(result.info(), field)) == expected
  return check


def _trains(result: Result) -> bool:
  return result.finite() and result.moved() and bool(loss_fn(result.params) < loss_fn(PARAMS))


# --- Construction: options ------------------------------------------------

for _name, _value in [('2.5', 2.5), ('0', 0), ('-1', -1), ("'5'", '5'),
                      ('jnp.array(5)', jnp.array(5))]:
  error_case(f'num_basis={_name}', ('num_basis',),
             lambda jit, v=_value: run(kwng_jax.kwng(num_basis=v), jit))
for _name, _value in [('-1.0', -1.0), ('0.0', 0.0), ('nan', float('nan')),
                      ('jnp.array(-1.)', jnp.array(-1.0)),
                      ('np.float32(-1)', np.float32(-1)), ("'1e-5'", '1e-5')]:
  error_case(f'epsilon={_name}', ('epsilon',),
             lambda jit, v=_value: run(kwng_jax.kwng(epsilon=v), jit))
for _name, _value in [('-1.0', -1.0), ('jnp.array(-1.)', jnp.array(-1.0)),
                      ('inf', float('inf')), ("'widest'", 'widest')]:
  error_case(f'bandwidth={_name}', ('bandwidth',),
             lambda jit, v=_value: run(kwng_jax.kwng(bandwidth=v), jit))
for _name, _value in [('-1.0', -1.0), ('jnp.array(-1.)', jnp.array(-1.0)),
                      ('np.float32(-1)', np.float32(-1))]:
  error_case(f'ridge={_name}', ('ridge',),
             lambda jit, v=_value: run(kwng_jax.kwng(ridge=v), jit))
for _name, _value in [('-0.1', -0.1), ('1.5', 1.5), ('jnp.array(-1.)', jnp.array(-1.0))]:
  error_case(f'rcond={_name}', ('rcond',),
             lambda jit, v=_value: run(kwng_jax.kwng(rcond=v), jit))
for _name, _value in [('-1.0', -1.0), ('jnp.array(-1.)', jnp.array(-1.0)),
                      ('np.float32(-1)', np.float32(-1)), ('0.0', 0.0)]:
  error_case(f'published max_norm={_name}', ('max_norm',),
             lambda jit, v=_value: run(kwng_jax.published_kwng(0.1, max_norm=v), jit))
for _name, _value in [('nan', float('nan')), ('jnp.array(inf)', jnp.array(jnp.inf))]:
  error_case(f'log_bandwidth={_name}', ('log_bandwidth',),
             lambda jit, v=_value: run(kwng_jax.kwng(log_bandwidth=v), jit))
for _name, _value in [('-1.0', -1.0), ('nan', float('nan')), ("'1'", '1')]:
  error_case(f'learning_rate={_name}', ('learning_rate',),
             lambda jit, v=_value: run(kwng_jax.kwng(v), jit))
error_case("damping='strong'", ('damping',),
           lambda jit: run(kwng_jax.kwng(damping='strong'), jit))
error_case("kernel='laplace'", ('kernel',),
           lambda jit: run(kwng_jax.kwng(kernel='laplace'), jit))
error_case('kernel=42', ('kernel',), lambda jit: run(kwng_jax.kwng(kernel=42), jit))
error_case('kernel returning a vector', ('kernel', 'scalar'),
           lambda jit: run(kwng_jax.kwng(kernel=lambda x, y: x - y), jit))
error_case('kernel of four arguments', ('kernel',),
           lambda jit: run(kwng_jax.kwng(kernel=lambda x, y, s, t: 0.0), jit))
error_case('seed=1.5', ('seed',), lambda jit: run(kwng_jax.kwng(seed=1.5), jit))
error_case('update_every=0', ('update_every',),
           lambda jit: run(kwng_jax.kwng(update_every=0), jit))
error_case('update_every=jnp.array(2)', ('update_every',),
           lambda jit: run(kwng_jax.kwng(update_every=jnp.array(2)), jit))
error_case('jacobian_samples=0', ('jacobian_samples',),
           lambda jit: run(kwng_jax.kwng(jacobian_samples=0), jit))
error_case('jacobian_samples > N', ('jacobian_samples',),
           lambda jit: run(kwng_jax.kwng(jacobian_samples=64), jit))
error_case('jacobian_dtype=int32', ('jacobian_dtype',),
           lambda jit: run(kwng_jax.kwng(jacobian_dtype=jnp.int32), jit))
error_case("scale_by_displacement(mode='clip')", ('mode',),
           lambda jit: kwng_jax.scale_by_displacement(mode='clip'))
error_case('scale_by_displacement(-1.0)', ('max_displacement',),
           lambda jit: kwng_jax.scale_by_displacement(-1.0))
error_case('adaptive_damping(window=0)', ('window',),
           lambda jit: kwng_jax.adaptive_damping(kwng_jax.scale_by_kwng(), window=0))
error_case('adaptive_damping around no scale_by_kwng', ('scale_by_kwng',),
           lambda jit: run(kwng_jax.adaptive_damping(optax.sgd(0.1)), jit))


# --- Update: what the update is given -------------------------------------

error_case('no outputs_fn', ('outputs_fn',),
           lambda jit: run(kwng_jax.kwng(), jit, outputs=None))
error_case('outputs_fn an array', ('outputs_fn',),
           lambda jit: run(kwng_jax.kwng(), jit, outputs=X))
error_case('no value (adaptive)', ('value', 'loss'),
           lambda jit: run(kwng_jax.kwng(), jit, value=None))
error_case('value a vector', ('value', 'scalar'),
           lambda jit: run(kwng_jax.kwng(), jit, value=jnp.ones(3)))
error_case('params=None', ('params',),
           lambda jit: kwng_jax.scale_by_kwng().update(
               PARAMS, kwng_jax.scale_by_kwng().init(PARAMS), None,
               outputs_fn=outputs_fn))
error_case('outputs_fn returns a tuple', ('outputs_fn', 'tuple'),
           lambda jit: run(kwng_jax.kwng(), jit, outputs=lambda p: (outputs_fn(p), X)))
error_case('outputs_fn returns a dict', ('outputs_fn', 'dict'),
           lambda jit: run(kwng_jax.kwng(), jit, outputs=lambda p: {'y': outputs_fn(p)}))
error_case('outputs_fn returns a list', ('outputs_fn', 'list'),
           lambda jit: run(kwng_jax.kwng(), jit, outputs=lambda p: [outputs_fn(p)]))
error_case('outputs_fn returns a scalar', ('outputs_fn', 'scalar'),
           lambda jit: run(kwng_jax.kwng(), jit, outputs=lambda p: jnp.sum(outputs_fn(p))))
error_case('empty batch (0, 2)', ('outputs_fn', 'empty'),
           lambda jit: run(kwng_jax.kwng(), jit, outputs=lambda p: outputs_fn(p)[:0]))
error_case('samples of width 0 (N, 0)', ('outputs_fn', 'empty'),
           lambda jit: run(kwng_jax.kwng(), jit, outputs=lambda p: outputs_fn(p)[:, :0]))
error_case('num_basis > N', ('num_basis',),
           lambda jit: run(kwng_jax.kwng(num_basis=5), jit,
                           outputs=lambda p: outputs_fn(p)[:4]))
error_case('integer samples', ('outputs_fn', 'float'),
           lambda jit: run(kwng_jax.kwng(), jit,
                           outputs=lambda p: jnp.argmax(outputs_fn(p), axis=1)))
error_case('complex samples', ('outputs_fn', 'complex'),
           lambda jit: run(kwng_jax.kwng(), jit,
                           outputs=lambda p: outputs_fn(p).astype(jnp.complex64)))
error_case('an int leaf in params', ('params', 'int'),
           lambda jit: run(kwng_jax.kwng(), jit,
                           params={**PARAMS, 'step': jnp.zeros((), jnp.int32)},
                           loss=lambda p: loss_fn(p)))
error_case('empty params', ('params', 'empty'),
           lambda jit: run(kwng_jax.kwng(), jit, params={},
                           outputs=lambda p: X, loss=lambda p: jnp.zeros(())))
error_case('grads not shaped like params', ('grads', 'params'),
           lambda jit: run(kwng_jax.kwng(), jit, grads_fn=lambda g: {'w': g['w']}))
error_case('basis_indices out of range', ('basis_indices',),
           lambda jit: kwng_jax.natural_gradient(
               PARAMS, outputs_fn, PARAMS, num_basis=2,
               basis_indices=jnp.array([0, 40]), basis_coords=jnp.array([0, 1])))
error_case('basis_indices duplicated', ('basis_indices',),
           lambda jit: kwng_jax.natural_gradient(
               PARAMS, outputs_fn, PARAMS, num_basis=2,
               basis_indices=jnp.array([3, 3]), basis_coords=jnp.array([0, 1])))
error_case('basis_coords out of range', ('basis_coords',),
           lambda jit: kwng_jax.natural_gradient(
               PARAMS, outputs_fn, PARAMS, num_basis=2,
               basis_indices=jnp.array([0, 1]), basis_coords=jnp.array([0, 2])))
error_case('natural_gradient without key', ('key',),
           lambda jit: kwng_jax.natural_gradient(PARAMS, outputs_fn, PARAMS))
error_case('inject_hyperparams without static num_basis',
           ('num_basis', 'static_args'),
           lambda jit: run(optax.inject_hyperparams(kwng_jax.kwng)(
               learning_rate=0.5, num_basis=5), jit))
error_case('Linen TrainState.apply_gradients', ('KWNGTrainState',),
           lambda jit: _linen_train_state())
error_case('hand-written NNX outputs_fn with BatchNorm', ('nnx_outputs_fn',),
           lambda jit: _nnx_batchnorm(jit))
error_case('masked without full_params', ('full_params',),
           lambda jit: run(optax.masked(kwng_jax.kwng(), {'w': True, 'b': False}), jit))


# --- Silent today: must be flagged ----------------------------------------

@case('outputs_fn independent of params', check=_flag('depends_on_params'),
      keywords=None)
def _(jit):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return run(kwng_jax.kwng(), jit, outputs=lambda p: X)


@case('epsilon injected negative under jit', keywords=('epsilon',), check=lambda r: (
    r.finite() and not bool(r.info().valid_hyperparameters) and not r.moved()))
def _(jit):
  opt = optax.inject_hyperparams(kwng_jax.scale_by_kwng, static_args=('num_basis',))(
      num_basis=5)
  params = PARAMS
  state = opt.init(params)
  state.hyperparams['epsilon'] = jnp.array(-1.0)

  def step(state):
    return opt.update(jax.grad(loss_fn)(params), state, params, outputs_fn=outputs_fn)

  updates, state = (jax.jit(step) if jit else step)(state)
  return Result(params, state, updates)


@case('ridge traced negative', keywords=('ridge',), check=lambda r: (
    r.finite() and not bool(r.info().valid_hyperparameters)))
def _(jit):
  def direction(ridge):
    return kwng_jax.natural_gradient(
        PARAMS, outputs_fn, PARAMS, key=jax.random.key(0), ridge=ridge)

  updates, info = (jax.jit(direction) if jit else direction)(jnp.array(-1.0))
  return Result(PARAMS, {'kwng_info': info}, updates)


@case('basis_indices traced out of range', keywords=('basis_indices',), check=lambda r: (
    not bool(r.info().valid_hyperparameters)))
def _(jit):
  def direction(indices):
    return kwng_jax.natural_gradient(
        PARAMS, outputs_fn, PARAMS, num_basis=2,
        basis_indices=indices, basis_coords=jnp.array([0, 1]))

  updates, info = (jax.jit(direction) if jit else direction)(jnp.array([0, 40]))
  return Result(PARAMS, {'kwng_info': info}, updates)


@case('NaN gradients', check=_flag('finite_inputs'))
def _(jit):
  return run(kwng_jax.kwng(), jit, grads_fn=lambda g: jax.tree.map(lambda x: x * jnp.nan, g))


@case('Inf samples', check=_flag('finite_inputs'))
def _(jit):
  return run(kwng_jax.kwng(), jit, outputs=lambda p: outputs_fn(p) / 0.0)


@case('NaN loss value', check=lambda r: r.finite() and bool(
    jnp.isfinite(otu.tree_get(r.state, 'kwng_epsilon'))))
def _(jit):
  return run(kwng_jax.kwng(), jit, value=jnp.array(jnp.nan), steps=3)


# --- Unusual but valid: must train ----------------------------------------

def in_dtype(opt, use_jit, dtype):
  """``run`` with the params, the inputs and the samples in ``dtype``."""
  def outputs(p):
    return jnp.tanh(X.astype(dtype) @ p['w'] + p['b'])

  return run(opt, use_jit, params=jax.tree.map(lambda p: p.astype(dtype), PARAMS),
             outputs=outputs,
             loss=lambda p: jnp.mean(jnp.square(outputs(p) - Y.astype(dtype)).astype(jnp.float32)))


for _name, _make, _dtype in [('float16 params, published chain', lambda: kwng_jax.published_kwng(0.1), jnp.float16),
                             ('float16 params, kwng()', kwng_jax.kwng, jnp.float16),
                             ('bfloat16 params', kwng_jax.kwng, jnp.bfloat16)]:
  case(_name, kind='unusual', check=lambda r: r.finite() and r.moved())(
      lambda jit, m=_make, d=_dtype: in_dtype(m(), jit, d))


@case('loss scaled by 1e15, published chain', kind='unusual',
      check=lambda r: r.finite() and r.moved())
def _(jit):
  return run(kwng_jax.published_kwng(0.1), jit, loss=lambda p: 1e15 * loss_fn(p))


@case('loss scaled by 1e15, kwng()', kind='unusual', check=_trains)
def _(jit):
  return run(kwng_jax.kwng(), jit, loss=lambda p: 1e15 * loss_fn(p))


for _scale in (1e-8, 1e8):
  @case(f'samples scaled by {_scale:g}', kind='unusual', check=_trains)
  def _(jit, s=_scale):
    return run(kwng_jax.kwng(s), jit, outputs=lambda p: s * outputs_fn(p), steps=3)


@case('identical samples', kind='unusual', check=lambda r: r.finite())
def _(jit):
  return run(kwng_jax.kwng(), jit,
             outputs=lambda p: jnp.broadcast_to(outputs_fn(p)[:1], (32, 2)))


@case('samples of shape (N,)', kind='unusual', check=_trains)
def _(jit):
  return run(kwng_jax.kwng(), jit, outputs=lambda p: outputs_fn(p)[:, 0], steps=3)


@case('samples of shape (N, C, H, W)', kind='unusual', check=_trains)
def _(jit):
  return run(kwng_jax.kwng(), jit,
             outputs=lambda p: jnp.tile(outputs_fn(p)[:, :, None, None], (1, 1, 2, 2)),
             steps=3)


@case('mixed float16/float32 params', kind='unusual', check=lambda r: r.finite() and r.moved())
def _(jit):
  params = {'w': PARAMS['w'], 'b': PARAMS['b'].astype(jnp.float16)}
  return run(kwng_jax.kwng(), jit, params=params,
             outputs=lambda p: jnp.tanh(X @ p['w'] + p['b'].astype(jnp.float32)))


@case('a parameter the samples do not see', kind='unusual', check=_trains)
def _(jit):
  params = {**PARAMS, 'shift': jnp.zeros(2)}
  return run(kwng_jax.kwng(), jit, params=params, steps=3,
             loss=lambda p: jnp.mean(jnp.square(outputs_fn(p) + p['shift'] - Y)))


@case('optax.masked with full_params', kind='unusual', check=lambda r: (
    r.finite() and bool(jnp.any(r.updates['w'] != 0))))
def _(jit):
  opt = optax.masked(kwng_jax.kwng(), {'w': True, 'b': False})
  return run(opt, jit, full_params=PARAMS)


@case('optax.multi_transform with full_params', kind='unusual', check=_trains)
def _(jit):
  opt = optax.multi_transform(
      {'kwng': kwng_jax.kwng(), 'adam': optax.adam(1e-2)}, {'w': 'kwng', 'b': 'adam'})
  return run(opt, jit, full_params=PARAMS, steps=3)


@case('inject_hyperparams epsilon is used', kind='unusual', check=lambda r: (
    r.finite() and abs(float(otu.tree_get(r.state, 'kwng_epsilon')) - 1e3) < 1e-3))
def _(jit):
  opt = optax.inject_hyperparams(kwng_jax.scale_by_kwng, static_args=('num_basis',))(
      num_basis=5)
  state = opt.init(PARAMS)
  state.hyperparams['epsilon'] = jnp.array(1e3)

  def step(state):
    return opt.update(jax.grad(loss_fn)(PARAMS), state, PARAMS, outputs_fn=outputs_fn)

  updates, state = (jax.jit(step) if jit else step)(state)
  return Result(PARAMS, state, updates)


def _linen_train_state():
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  state = train_state.TrainState.create(
      apply_fn=lambda p, x: jnp.tanh(x @ p['w'] + p['b']), params=PARAMS,
      tx=kwng_jax.kwng())
  grads = jax.grad(loss_fn)(PARAMS)
  return state.apply_gradients(grads=grads, outputs_fn=outputs_fn, value=loss_fn(PARAMS))


def _nnx_batchnorm(jit):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 2, rngs=rngs)
      self.norm = nnx.BatchNorm(2, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.linear(x))

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, kwng_jax.kwng(), wrt=nnx.Param)

  def hand_written(params):
    nnx.update(model, params)
    return model(X)

  def train_step(model, optimizer):
    def loss(model):
      return jnp.mean(jnp.square(model(X) - Y))
    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads, outputs_fn=hand_written, value=value)
    return value

  return (nnx.jit(train_step) if jit else train_step)(model, optimizer)


def classify(case_: Case, use_jit: bool) -> tuple[str, str]:
  """(outcome, message) of one case in one mode."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      result = case_.build(use_jit)
  except Exception as error:  # pylint: disable=broad-except
    message = f'{type(error).__name__}: {error}'.splitlines()[0][:300]
    if case_.keywords is not None and isinstance(error, (ValueError, TypeError)):
      text = str(error).lower()
      if all(word.lower() in text for word in case_.keywords):
        return 'clear_error', message
    return 'cryptic', message
  if case_.check is None:
    return 'silent', 'no error'
  try:
    good = bool(case_.check(result))
  except Exception as error:  # pylint: disable=broad-except
    return 'silent', f'check failed: {type(error).__name__}: {error}'[:300]
  if not good:
    return 'silent', 'update not finite, not flagged, or not as asked'
  return ('flagged' if case_.kind == 'bad' else 'handled'), 'ok'


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  rows = []
  with common.progress(2 * len(CASES), 'cases') as bar:
    for case_ in CASES:
      for mode in ('eager', 'jit'):
        outcome, message = classify(case_, mode == 'jit')
        rows.append({'case': case_.name, 'kind': case_.kind, 'mode': mode,
                     'outcome': outcome, 'message': message})
        bar.update(1)
  counts = Counter(row['outcome'] for row in rows)
  summary = {
      'inputs': len(CASES),
      'bad_inputs': sum(c.kind == 'bad' for c in CASES),
      'unusual_inputs': sum(c.kind == 'unusual' for c in CASES),
      'trials': len(rows),
      **{k: counts.get(k, 0) for k in
         ('clear_error', 'flagged', 'handled', 'cryptic', 'silent')},
  }
  payload = {'device': common.device_description(), 'summary': summary, 'cases': rows}
  args.out.mkdir(parents=True, exist_ok=True)
  common.write_json(args.out / 'robustness.json', payload)
  _plot(summary, args.out / 'robustness.png')
  print(summary)
  for row in rows:
    if row['outcome'] in ('cryptic', 'silent'):
      print(f"{row['outcome']:8s} {row['mode']:5s} {row['case']}: {row['message']}")
  return payload


def _plot(summary: dict[str, int], path: pathlib.Path) -> None:
  plt = common.pyplot()
  names = ['clear_error', 'flagged', 'handled', 'cryptic', 'silent']
  colors = ['tab:green', 'tab:olive', 'tab:blue', 'tab:orange', 'tab:red']
  fig, ax = plt.subplots(figsize=(6, 3))
  values = [summary[n] for n in names]
  ax.barh(names, values, color=colors)
  for y, v in enumerate(values):
    ax.text(v, y, f' {v}', va='center')
  ax.set_xlabel(f"trials ({summary['inputs']} inputs, eager and jit)")
  ax.invert_yaxis()
  common.save_png(fig, path, dpi=120, bbox_inches='tight')


if __name__ == '__main__':
  main()
