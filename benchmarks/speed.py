r"""Speed benchmark: step and compile time of SGD, Adam and KWNG on one model.

Every optimizer trains the same Flax NNX model, with the same jitted step
(forward, loss, gradient, ``tx.update``, apply), in the same process:

* ``--model mlp`` / ``--model cnn``: the digits MLP 64-128-10 and CNN with the
  ill-conditioned head, on a batch of real digits;
* ``--model mlp784``: an MLP 784-512-512-10 (670k parameters) on random
  MNIST-sized inputs;
* ``--model resnet18``: the CIFAR ResNet-18 of the published code (with
  BatchNorm and the ill-conditioned head) on random CIFAR-shaped data, the
  setting of the published GPU measurements (``--batch-size 128`` on a GPU).

The rows, for each M of ``--num-basis`` (default 5 and 20):

* ``published M=m``: the chain of the paper's experiments
  (``kwng_jax.published_kwng``: adaptive ε, clip 1);
* ``KWNG M=m``: the recommended ``kwng_jax.kwng`` with its defaults (the
  metric-diagonal damping, T from the first 32 samples of the batch, the
  step capped by the displacement of the samples: one more ``jax.jvp``);
* ``KWNG M=5 [option=value]``: the recommended chain with one more option,
  per ``--kwng-variant``: T from the whole batch (``jacobian_samples=None``),
  the batched VJP as ``jax.vmap`` or ``lax.map`` instead of the default (an
  unrolled loop on CPUs, ``vmap`` elsewhere), and ``update_every=10``;
  ``[stacked]`` is the recommended M=5 stepped by
  ``kwng_jax.value_grad_and_update`` with T from the whole batch, whose loss
  cotangent goes through the same backward pass as T;
* ``floor M=m`` and ``floor M=m + JVP``: what no KWNG step can avoid, run as
  a step of its own: the SGD step plus M VJPs of the model's outputs, one
  after the other, (plus one JVP, the recommended chain's displacement), all
  from the same forward pass. The targets compare KWNG's step with it.

KWNG reuses the loss's own forward pass (``flax_utils.value_grad_and_vjp``,
passed as ``samples_and_vjp=``), and gets ``outputs_fn`` from
``kwng_jax.batch_outputs_fn``, which runs the model on the first 32 images
for T; ``--forward separate`` lets it recompute the logits instead.

Timing: each step is compiled ahead of time (``lower().compile()``, tracing
included, timed separately); then, in ``--rounds`` rounds, each optimizer
runs ``--steps`` steps, each timed on its own up to ``block_until_ready``.
The rounds interleave the optimizers so that a change of load on a shared
machine hits them all alike. Reported: the median step time over all rounds,
the median over rounds of each round's mean step time (the cost per step of
``update_every=k``, whose rebuild steps the median would hide), and their
ratios to SGD's.

Memory allocator: KWNG's step allocates tens of MB of temporaries (the rows of T̃, F)
per step. glibc's ``malloc`` serves such blocks with ``mmap`` and returns
them to the system when they are freed, unless its adaptive threshold has
risen above their size; each step then faults its temporaries in afresh
(on the 670k-parameter MLP, M=5: 29 ms a step instead of 18 ms). Which of
the two a process gets depends on its history. So that the numbers do not,
the benchmark sets glibc's thresholds once at start (``mallopt``: blocks up
to 32 MB from the heap, which is never trimmed); ``--system-allocator``
keeps the defaults. A training script gets the same effect from
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647`` in its
environment, or from jemalloc or tcmalloc.

Run (from the repository root)::

  python benchmarks/speed.py                                   # CPU: the three MLP/CNN models
  python benchmarks/speed.py --model resnet18 --batch-size 128 # GPU
  python benchmarks/speed.py --quick                           # CI smoke test

Writes ``speed_<platform>.json`` and ``speed_<platform>.png`` under ``--out``
(the JSON after every round, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import inspect
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kwng_jax
from kwng_jax.examples import datasets
from kwng_jax import flax_utils
from kwng_jax.examples import models

import common

PyTree = Any
MODELS = ('mlp', 'cnn', 'mlp784', 'resnet18')
DEFAULT_OUT = pathlib.Path(__file__).parent / 'results' / 'speed'

# Targets: the largest median step time over SGD's, per model and row. On
# the CNN, KWNG M=5 is both the recommended optimizer with its defaults
# (<= 2) and the full-batch M=5 step (<= 2.5).
RATIO_TARGETS = {
    'cpu': {'mlp784': {'KWNG M=5': 5.0, 'KWNG M=20': 18.0},
            'mlp': {'KWNG M=5': 3.0},
            'cnn': {'KWNG M=5': 2.0}},
    'gpu': {'resnet18': {'KWNG M=5': 2.0}},
}
# KWNG's step over its floor, and its compile time over SGD's, at most:
FLOOR_TARGET = 1.2
COMPILE_TARGET = 3.0
DEFAULT_VARIANTS = ('stacked', 'jacobian_samples=None', 'jacobian_batching=vmap',
                    'jacobian_batching=map', 'update_every=10')
VARIANT_NUM_BASIS = 5


def build_model(name: str, seed: int = 0) -> nnx.Module:
  """The model with the ill-conditioned head (logits × logspace(-6, 1, 10))."""
  scales = datasets.ill_conditioned_scales()
  rngs = nnx.Rngs(seed)
  if name == 'mlp':
    return models.MLP(64, (128,), 10, logit_scales=scales, rngs=rngs)
  if name == 'cnn':
    return models.CNN(10, logit_scales=scales, rngs=rngs)
  if name == 'mlp784':
    # The 784-512-512-10 MLP (670k parameters) of MNIST-sized inputs.
    return models.MLP(784, (512, 512), 10, logit_scales=scales, rngs=rngs)
  if name == 'resnet18':
    return models.ResNet18(10, logit_scales=scales, rngs=rngs)
  raise ValueError(f'model={name!r}: choose one of {MODELS}.')


def batch(name: str, batch_size: int) -> tuple[jax.Array, jax.Array, str]:
  """``(images, labels, description)``: real digits, or random CIFAR-shaped data."""
  if name in ('mlp', 'cnn'):
    split = datasets.load_digits()
    if batch_size > len(split.train_labels):
      raise ValueError(f'--batch-size {batch_size} exceeds the {len(split.train_labels)} '
                       'digits of the training split.')
    return (jnp.asarray(split.train_images[:batch_size]),
            jnp.asarray(split.train_labels[:batch_size]), 'digits (8x8x1)')
  image_key, label_key = jax.random.split(jax.random.key(0))
  labels = jax.random.randint(label_key, (batch_size,), 0, 10, jnp.int32)
  if name == 'mlp784':
    images = jax.random.normal(image_key, (batch_size, 784), jnp.float32)
    return images, labels, 'random MNIST-sized (784)'
  images = jax.random.normal(image_key, (batch_size, 32, 32, 3), jnp.float32)
  return images, labels, 'random CIFAR-shaped (32x32x3)'


def parse_variant(text: str) -> dict[str, Any]:
  """``'jacobian_samples=32,update_every=5'`` -> options of kwng_jax.kwng."""
  accepted = set(inspect.signature(kwng_jax.kwng).parameters) - {'learning_rate', 'num_basis'}
  options = {}
  for item in filter(None, text.split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in accepted:
      raise ValueError(f'--kwng-variant {text!r}: {item!r} is not KEY=VALUE with KEY an '
                       f'option of kwng_jax.kwng ({sorted(accepted)}).')
    for convert in (int, float):
      try:
        options[key] = convert(value)
        break
      except ValueError:
        continue
    else:
      options[key] = None if value == 'None' else value
  return options


class Floor(NamedTuple):
  """Marks the floor row: the SGD step plus M looped VJPs (and one JVP)."""

  num_basis: int
  with_jvp: bool

  def init(self, params: PyTree) -> jax.Array:
    del params
    # A zero the compiler cannot see: the VJPs and the JVP enter the update
    # multiplied by it, so that none of them is optimized away.
    return jnp.zeros((), jnp.float32)


class Row(NamedTuple):
  """One row: the transformation (or a :class:`Floor`), the number of leading
  images its ``jacobian_outputs_fn`` runs on (None: no such function), and
  whether the step is ``kwng_jax.value_grad_and_update`` (g stacked with T)."""

  tx: Any
  jacobian_rows: int | None = None
  stacked: bool = False


def optimizers(num_basis: Sequence[int], variants: Sequence[str]) -> dict[str, Row]:
  """The rows, by display name (see the module docstring)."""
  out = {'SGD': Row(optax.sgd(0.1)), 'Adam': Row(optax.adam(1e-3))}
  for m in num_basis:
    out[f'floor M={m}'] = Row(Floor(m, with_jvp=False))
    out[f'published M={m}'] = Row(kwng_jax.published_kwng(1.0, num_basis=m))
    out[f'floor M={m} + JVP'] = Row(Floor(m, with_jvp=True))
    out[f'KWNG M={m}'] = Row(kwng_jax.kwng(num_basis=m))
  for text in variants:
    if text == 'stacked':
      out[f'KWNG M={VARIANT_NUM_BASIS} [stacked]'] = Row(
          kwng_jax.kwng(num_basis=VARIANT_NUM_BASIS), stacked=True)
      continue
    options = parse_variant(text)
    out[f'KWNG M={VARIANT_NUM_BASIS} [{text}]'] = Row(
        kwng_jax.kwng(num_basis=VARIANT_NUM_BASIS, **options), options.get('jacobian_samples'))
  return out


def make_step(graphdef: nnx.GraphDef, tx: Any, *, fused: bool,
              jacobian_rows: int | None = None, stacked: bool = False) -> Callable:
  """``step((params, rest, opt_state), images, labels) -> (state, loss)``.

  ``rest`` is the model's untrained state (BatchNorm statistics, the logit
  scales); the forward pass runs in train mode and returns its update. With
  ``jacobian_rows=n`` the update also gets ``jacobian_outputs_fn``, the model
  on the first n images alone, so that the VJPs that give T run on n samples
  (with BatchNorm, on the statistics of those n). ``tx`` may be a
  :class:`Floor`. With ``stacked`` the step is
  ``kwng_jax.value_grad_and_update``: the loss's cotangent goes through the
  same batched backward pass as T's.
  """

  def step(state, images, labels):
    params, rest, opt_state = state

    def forward(p, inputs=images):
      model = nnx.merge(graphdef, p, rest)
      logits = model(inputs)
      _, _, new_rest = nnx.split(model, nnx.Param, ...)
      return logits, nnx.as_pure(new_rest)

    def loss_from_logits(logits):
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    if stacked:
      (loss, new_rest), _, updates, opt_state = kwng_jax.value_grad_and_update(
          lambda logits, p: loss_from_logits(logits), forward, tx, params, opt_state,
          has_aux=True)
      return (optax.apply_updates(params, updates), new_rest, opt_state), loss
    if fused or isinstance(tx, Floor):
      (loss, new_rest), grads, samples_and_vjp = flax_utils.value_grad_and_vjp(
          loss_from_logits, forward, params, has_aux=True)
    else:
      def loss_fn(p):
        logits, new_rest = forward(p)
        return loss_from_logits(logits), new_rest

      (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

    if isinstance(tx, Floor):
      updates = floor_update(tx, grads, samples_and_vjp, opt_state)
      return (optax.apply_updates(params, updates), new_rest, opt_state), loss
    # The logits of the batch, as a function that can also run on its
    # first rows (what kwng()'s jacobian_samples='auto' uses).
    outputs_fn = kwng_jax.batch_outputs_fn(lambda p, inputs: forward(p, inputs)[0], images)
    if jacobian_rows is not None:
      forward_pass = {'outputs_fn': outputs_fn,
                      'jacobian_outputs_fn': outputs_fn.first_rows(jacobian_rows)}
    elif fused:
      forward_pass = {'samples_and_vjp': samples_and_vjp, 'outputs_fn': outputs_fn}
    else:
      forward_pass = {'outputs_fn': outputs_fn}
    updates, opt_state = tx.update(grads, opt_state, params, value=loss, **forward_pass)
    return (optax.apply_updates(params, updates), new_rest, opt_state), loss

  return step


def floor_update(floor: Floor, grads: PyTree, samples_and_vjp: Any, zero: jax.Array) -> PyTree:
  """SGD's update, plus ``zero`` times M VJPs (and a JVP) of the forward pass."""
  samples, vjp_fn = samples_and_vjp
  total = grads
  for m in range(floor.num_basis):
    # A different cotangent per call, as KWNG's M kernel cotangents are.
    (pulled,) = vjp_fn(samples * (m + 1.0))
    total = jax.tree.map(lambda t, v: t + zero * v, total, pulled)
  if floor.with_jvp:
    # J g as the recommended chain gets J u: by transposing the VJP.
    (moved,) = jax.linear_transpose(vjp_fn, samples)((grads,))
    total = jax.tree.map(lambda t: t + zero * jnp.sum(moved), total)
  return jax.tree.map(lambda t: -0.1 * t, total)


def measure_model(name: str, args: argparse.Namespace, report: Callable[[], None],
                  record: dict[str, Any], bar: Any) -> None:
  """Compiles and times every optimizer on one model; fills ``record``."""
  model = build_model(name)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  images, labels, data = batch(name, args.batch_size)
  record.update(model=name, batch_size=args.batch_size, input_shape=list(images.shape),
                data=data, head='ill-conditioned (logits x logspace(-6, 1, 10))',
                num_params=int(sum(p.size for p in jax.tree.leaves(params))),
                forward=args.forward, optimizers={})
  steps, states = {}, {}
  for opt_name, (tx, jacobian_rows, stacked) in optimizers(
      args.num_basis, args.kwng_variant).items():
    bar.set_description(f'{name}: compile {opt_name}')
    # The step donates its state: every leaf must be a buffer of its own
    # (an optimizer state may hold one array twice).
    state = jax.tree.map(jnp.copy, (params, rest, tx.init(params)))
    step = jax.jit(make_step(graphdef, tx, fused=args.forward == 'fused',
                             jacobian_rows=jacobian_rows, stacked=stacked), donate_argnums=0)
    compiled, seconds = common.compile_timed(step, state, images, labels)
    steps[opt_name] = lambda s, compiled=compiled: compiled(s, images, labels)[0]
    states[opt_name] = state
    record['optimizers'][opt_name] = {'compile_seconds': seconds, 'step_seconds': [],
                                      'round_mean_seconds': [],
                                      **memory(compiled, state[2])}
    bar.update(1)
    report()
  for round_index in range(args.rounds):
    for opt_name, step in steps.items():
      bar.set_description(f'{name}: round {round_index + 1} {opt_name}')
      seconds, states[opt_name] = common.step_times(
          step, states[opt_name], num_steps=args.steps,
          warmup=args.warmup if round_index == 0 else 0)
      record['optimizers'][opt_name]['step_seconds'].extend(seconds)
      record['optimizers'][opt_name]['round_mean_seconds'].append(float(np.mean(seconds)))
      bar.update(1)
    summarize(record)
    report()


def memory(compiled: Any, opt_state: PyTree) -> dict[str, Any]:
  """Bytes of an optimizer's state, and of the compiled step's temporaries.

  ``state_bytes`` lives between steps (with ``update_every``: T̃ and D).
  ``temp_bytes`` is XLA's scratch memory for one whole step (None where the
  backend does not report it); less SGD's, the working memory KWNG adds
  (the M rows of T̃, M×P, and the backward passes).
  """
  temp = getattr(compiled.memory_analysis(), 'temp_size_in_bytes', None)
  return {
      'state_bytes': int(sum(x.nbytes for x in jax.tree.leaves(opt_state))),
      'temp_bytes': None if temp is None else int(temp),
  }


def summarize(record: dict[str, Any]) -> None:
  """Median step times (ms) and ratios to SGD, from the times so far.

  ``mean_step_ms`` is the median over rounds of each round's mean step time:
  the cost per step of an optimizer whose steps differ (``update_every=k``
  rebuilds at one step in k; ``--steps`` a multiple of k makes every round
  pay for its rebuilds in full), where the median step would show only the
  cheap ones.
  """
  entries = record['optimizers']
  for entry in entries.values():
    entry['median_step_ms'] = 1e3 * float(np.median(entry['step_seconds']))
    entry['mean_step_ms'] = 1e3 * float(np.median(entry['round_mean_seconds']))
    entry['p10_step_ms'], entry['p90_step_ms'] = (
        1e3 * float(q) for q in np.percentile(entry['step_seconds'], [10, 90]))
    entry['timed_steps'] = len(entry['step_seconds'])
  sgd_ms = entries['SGD']['median_step_ms']
  sgd_mean_ms = entries['SGD']['mean_step_ms']
  for entry in entries.values():
    entry['ratio_to_sgd'] = entry['median_step_ms'] / sgd_ms
    entry['mean_ratio_to_sgd'] = entry['mean_step_ms'] / sgd_mean_ms


def targets(record: dict[str, Any], platform: str) -> list[dict[str, Any]]:
  """Each target that applies to this model and platform, with its value.

  * the median step over SGD's of the rows of :data:`RATIO_TARGETS`;
  * every KWNG row over its floor (``published M=m`` over ``floor M=m``,
    ``KWNG M=m`` over ``floor M=m + JVP``), at most :data:`FLOOR_TARGET`;
  * every KWNG row's compile time over SGD's, at most :data:`COMPILE_TARGET`.
  """
  entries = record['optimizers']
  out = []

  def add(name, value, limit):
    out.append({'target': name, 'value': value, 'limit': limit, 'met': bool(value <= limit)})

  for row, limit in RATIO_TARGETS.get(platform, {}).get(record['model'], {}).items():
    if row in entries and record['batch_size'] == 128:
      add(f'{row} step / SGD step', entries[row]['ratio_to_sgd'], limit)
  for name, entry in entries.items():
    floor = None
    if name.startswith('published M='):
      floor = entries.get(name.replace('published', 'floor'))
    elif name.startswith('KWNG M=') and '[' not in name:
      floor = entries.get(name.replace('KWNG', 'floor') + ' + JVP')
    if floor is not None:
      add(f'{name} step / its floor', entry['median_step_ms'] / floor['median_step_ms'],
          FLOOR_TARGET)
    if name.startswith(('published', 'KWNG')):
      add(f'{name} compile / SGD compile',
          entry['compile_seconds'] / entries['SGD']['compile_seconds'], COMPILE_TARGET)
  return out


def plot(payload: dict[str, Any], path: pathlib.Path) -> None:
  """One panel per model: each row's median step over SGD's (log scale)."""
  plt = common.pyplot()
  records = payload['models']
  height = max(len(r['optimizers']) for r in records) * 0.32 + 1.2
  fig, axes = plt.subplots(1, len(records), figsize=(5.5 * len(records), height),
                           squeeze=False)
  for ax, record in zip(axes[0], records):
    entries = {n: e for n, e in record['optimizers'].items() if 'median_step_ms' in e}
    names = list(entries)[::-1]
    ratios = [entries[n]['ratio_to_sgd'] for n in names]
    colors = ['tab:gray' if n.startswith('floor') else 'tab:orange' if n.startswith('published')
              else 'tab:blue' if n.startswith('KWNG') else 'tab:green' for n in names]
    ax.barh(range(len(names)), ratios, color=colors, alpha=0.8)
    for y, (name, ratio) in enumerate(zip(names, ratios)):
      ax.text(ratio * 1.05, y, f"{ratio:.1f}x ({entries[name]['median_step_ms']:.2f} ms)",
              va='center', fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xscale('log')
    ax.set_xlim(0.8, 12 * max(ratios))
    ax.axvline(1.0, color='k', lw=0.5)
    ax.set(xlabel="median step / SGD's",
           title=f"{record['model']}, batch {record['batch_size']}, "
                 f"P = {record['num_params']:,}")
  device = payload['device']
  fig.suptitle(f"{device['device_kind']} ({device['platform']}, {device['host_cpu_count']} "
               f"host cores), jax {device['jax_version']}; gray: floors, orange: published "
               "chain, blue: recommended chain")
  fig.tight_layout()
  common.save_png(fig, path, dpi=90)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', nargs='+', choices=MODELS, default=['mlp', 'cnn', 'mlp784'])
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--num-basis', type=int, nargs='+', default=[5, 20])
  parser.add_argument('--kwng-variant', action='append', default=None,
                      help=f'extra rows of kwng_jax.kwng(num_basis={VARIANT_NUM_BASIS}) with '
                           'these options, e.g. "jacobian_samples=32", or "stacked" (repeatable; '
                           f'comma-separated KEY=VALUE; default {DEFAULT_VARIANTS}, "" for '
                           'none).')
  parser.add_argument('--forward', choices=('fused', 'separate'), default='fused',
                      help="KWNG's outputs_fn: reuse the loss's forward pass (samples_and_vjp), or rerun it.")
  parser.add_argument('--steps', type=int, default=20, help='timed steps per round.')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--quick', action='store_true',
                      help='CI smoke test: the MLP, 3 steps, 1 round.')
  parser.add_argument('--system-allocator', action='store_true',
                      help="keep glibc malloc's default thresholds (see the module docstring).")
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  if args.kwng_variant is None:
    args.kwng_variant = list(DEFAULT_VARIANTS)
  args.kwng_variant = [text for text in args.kwng_variant if text]
  if args.quick:
    args.model, args.steps, args.rounds, args.warmup = ['mlp'], 3, 1, 1
  if min(args.num_basis) < 1 or max(args.num_basis + [VARIANT_NUM_BASIS]) > args.batch_size:
    parser.error(f'--num-basis {args.num_basis}: each M must lie in [1, --batch-size].')
  for text in args.kwng_variant:
    if text == 'stacked':
      continue
    try:
      parse_variant(text)
    except ValueError as error:
      parser.error(str(error))
  return args


def pin_glibc_allocator() -> dict[str, int] | None:
  """Sets glibc's malloc thresholds (see the module docstring); None elsewhere."""
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return None
  settings = {'M_MMAP_THRESHOLD': (-3, 32 << 20), 'M_TRIM_THRESHOLD': (-1, 2**31 - 1)}
  if not all(libc.mallopt(code, value) for code, value in settings.values()):
    return None
  return {name: value for name, (_, value) in settings.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  allocator = None if args.system_allocator else pin_glibc_allocator()
  device = common.device_description()
  payload: dict[str, Any] = {
      'benchmark': 'speed',
      'device': device,
      'versions': {name: importlib.metadata.version(name) for name in ('jax', 'optax', 'flax')},
      'config': {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
      'matmul_precision': jax.config.jax_default_matmul_precision,  # None: the platform's default
      'glibc_malloc_settings': allocator,  # None: the system's defaults
      'models': [],
  }
  json_path = args.out / f"speed_{device['platform']}.json"

  def report():
    for record in payload['models']:
      if record.get('optimizers') and all('median_step_ms' in e
                                          for e in record['optimizers'].values()):
        record['targets'] = targets(record, device['platform'])
    payload['finished'] = False
    common.write_json(json_path, payload)

  num_optimizers = len(optimizers(args.num_basis, args.kwng_variant))
  bar = common.progress(len(args.model) * num_optimizers * (1 + args.rounds), 'speed')
  start = time.perf_counter()
  for name in args.model:
    record: dict[str, Any] = {}
    payload['models'].append(record)
    measure_model(name, args, report, record, bar)
  bar.close()
  payload['wall_seconds'] = time.perf_counter() - start
  report()
  payload['finished'] = True
  common.write_json(json_path, payload)
  plot(payload, json_path.with_suffix('.png'))

  print(f"\n{device['device_kind']} ({device['platform']}), jax {device['jax_version']}")
  for record in payload['models']:
    print(f"\n{record['model']}, batch {record['batch_size']}, {record['num_params']} parameters, "
          f"{record['data']}")
    print(f"{'optimizer':<32} {'median ms':>10} {'x SGD':>7} {'mean ms':>9} {'x SGD':>7} "
          f"{'compile s':>10}")
    for opt_name, entry in record['optimizers'].items():
      print(f"{opt_name:<32} {entry['median_step_ms']:>10.3f} {entry['ratio_to_sgd']:>7.2f} "
            f"{entry['mean_step_ms']:>9.3f} {entry['mean_ratio_to_sgd']:>7.2f} "
            f"{entry['compile_seconds']:>10.2f}")
    for target in record['targets']:
      print(f"target {target['target']}: {target['value']:.2f} (<= {target['limit']}: "
            f"{'met' if target['met'] else 'not met'})")
  print(f'\nwrote {json_path} and {json_path.with_suffix(".png")}')
  return payload


if __name__ == '__main__':
  main()
