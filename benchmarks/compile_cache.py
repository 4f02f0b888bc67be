r"""Compile time of SGD and KWNG, cold and from JAX's persistent compilation cache.

KWNG's jitted step takes several times as long as SGD's to compile (see
``speed.py``): XLA emits one kernel per fused operation, and the estimator
adds about a hundred. A user pays this once per process. With JAX's
persistent compilation cache (``jax.config.update('jax_compilation_cache_dir',
path)``) a later process, a re-run script or a restarted notebook, reads
the compiled step from disk and pays only tracing and lowering.

For each model and optimizer (the rows of ``speed.py``: SGD, the published
chain and the recommended ``kwng_jax.kwng`` with its defaults, M=5), fresh
Python processes build the same jitted step as ``speed.py`` and time, on
their own, its tracing and lowering (``jit(...).trace(...).lower()``) and its
compilation (``.compile()``), in three settings:

* ``no cache``: the cache off, JAX's default;
* ``cold cache``: an empty cache directory; the compile also writes the
  entry;
* ``warm cache``: a second process on the directory the cold one filled.

The cache is set to store every entry (``jax_persistent_cache_min_compile_time_secs
= 0``); with JAX's default threshold of one second, KWNG's steps are stored
and SGD's are not. Each child reports whether its compile was served from the
cache (JAX's ``/jax/compilation_cache/cache_hits`` event), so a run whose
"warm" process missed the cache says so. The settings and optimizers are run
in turn, ``--repeats`` times, each repeat with a new directory, and the
median per setting is reported, with the ratio to SGD's in the same setting.

Run ``python benchmarks/compile_cache.py`` (about 4 minutes on two CPU
cores, mostly process start-up and the cold compiles; ``--quick`` for a
smoke run). Writes ``compile_cache.json`` and ``compile_cache.png`` under
``benchmarks/results/compile_cache/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import common

DEFAULT_OUT = pathlib.Path(__file__).parent / 'results' / 'compile_cache'
MODELS = ('mlp', 'cnn', 'mlp784')
OPTIMIZERS = ('SGD', 'published M=5', 'KWNG M=5')
SETTINGS = ('no cache', 'cold cache', 'warm cache')
_CACHE_HITS_EVENT = '/jax/compilation_cache/cache_hits'


def child(model_name: str, optimizer: str, cache_dir: str | None) -> dict[str, Any]:
  """In a fresh process: builds ``speed.py``'s step, times tracing + lowering and compiling."""
  import jax

  if cache_dir is not None:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  hits = []
  jax.monitoring.register_event_listener(
      lambda event, **kwargs: hits.append(event) if event == _CACHE_HITS_EVENT else None)

  import jax.numpy as jnp
  from flax import nnx

  import speed

  model = speed.build_model(model_name)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  images, labels, _ = speed.batch(model_name, 128)
  tx, jacobian_rows, stacked = speed.optimizers([5], [])[optimizer]
  state = jax.tree.map(jnp.copy, (params, rest, tx.init(params)))
  step = jax.jit(speed.make_step(graphdef, tx, fused=True, jacobian_rows=jacobian_rows,
                                 stacked=stacked), donate_argnums=0)
  start = time.perf_counter()
  lowered = step.trace(state, images, labels).lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  # The executable runs: a step read from the cache must work.
  _, loss = compiled(state, images, labels)
  return {'lower_seconds': lowered_at - start, 'compile_seconds': compiled_at - lowered_at,
          'cache_hit': bool(hits), 'loss': float(loss)}


def run_child(model_name: str, optimizer: str, cache_dir: str | None) -> dict[str, Any]:
  """:func:`child` in a new Python process; its result."""
  command = [sys.executable, __file__, '--child', model_name, optimizer]
  if cache_dir is not None:
    command += ['--cache-dir', cache_dir]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f'{model_name} / {optimizer}: the child process failed:\n{done.stderr}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(record: dict[str, Any]) -> None:
  """Medians per setting, and ratios to SGD's in the same setting."""
  entries = record['optimizers']
  for entry in entries.values():
    for setting in entry['settings'].values():
      for key in ('lower_seconds', 'compile_seconds'):
        setting[f'median_{key}'] = float(np.median(setting[key]))
      setting['median_total_seconds'] = float(np.median(
          np.add(setting['lower_seconds'], setting['compile_seconds'])))
  for entry in entries.values():
    for name, setting in entry['settings'].items():
      sgd = entries['SGD']['settings'][name]
      setting['total_ratio_to_sgd'] = (
          setting['median_total_seconds'] / sgd['median_total_seconds'])


def plot(payload: dict[str, Any], path: pathlib.Path) -> None:
  """One panel per model: tracing + lowering and compiling, per optimizer and setting."""
  plt = common.pyplot()
  records = payload['models']
  fig, axes = plt.subplots(1, len(records), figsize=(5.0 * len(records), 3.6), squeeze=False)
  colors = dict(zip(SETTINGS, ('tab:gray', 'tab:orange', 'tab:blue')))
  for ax, record in zip(axes[0], records):
    names = list(record['optimizers'])
    width = 0.8 / len(SETTINGS)
    for k, setting_name in enumerate(SETTINGS):
      xs = np.arange(len(names)) + (k - 1) * width
      settings = [record['optimizers'][n]['settings'][setting_name] for n in names]
      lower = [s['median_lower_seconds'] for s in settings]
      # The bar's top is the median total (not the sum of the two medians).
      rest = [s['median_total_seconds'] - low for s, low in zip(settings, lower)]
      ax.bar(xs, lower, width, color=colors[setting_name], alpha=0.45)
      ax.bar(xs, rest, width, bottom=lower, color=colors[setting_name], label=setting_name)
      for x, s in zip(xs, settings):
        ax.text(x, s['median_total_seconds'] * 1.02, f"{s['median_total_seconds']:.2f}",
                ha='center', va='bottom', fontsize=6)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set(ylabel='seconds (pale: tracing + lowering)',
           title=f"{record['model']}, batch 128")
    ax.legend(fontsize=7)
  device = payload['device']
  fig.suptitle(f"Compile time in a fresh process: {device['device_kind']} "
               f"({device['platform']}, {device['host_cpu_count']} host cores), "
               f"jax {device['jax_version']}", fontsize=9)
  fig.tight_layout()
  common.save_png(fig, path, dpi=90)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', nargs='+', choices=MODELS, default=list(MODELS))
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--quick', action='store_true',
                      help='smoke test: the digits MLP, SGD and KWNG, one repeat.')
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT)
  parser.add_argument('--child', nargs=2, metavar=('MODEL', 'OPTIMIZER'),
                      help=argparse.SUPPRESS)
  parser.add_argument('--cache-dir', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f'--repeats {args.repeats}: at least 1.')
  args.optimizers = list(OPTIMIZERS)
  if args.quick:
    args.model, args.repeats, args.optimizers = ['mlp'], 1, ['SGD', 'KWNG M=5']
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.child:
    print(json.dumps(child(*args.child, args.cache_dir)))
    return {}
  payload: dict[str, Any] = {
      'benchmark': 'compile_cache',
      'device': common.device_description(),
      'config': {'models': args.model, 'optimizers': args.optimizers,
                 'repeats': args.repeats, 'batch_size': 128, 'num_basis': 5},
      'models': [],
  }
  json_path = args.out / 'compile_cache.json'
  bar = common.progress(len(args.model) * len(args.optimizers) * len(SETTINGS) * args.repeats,
                        'compile cache')
  start = time.perf_counter()
  for model_name in args.model:
    record = {'model': model_name, 'optimizers': {
        name: {'settings': {s: {'lower_seconds': [], 'compile_seconds': [], 'cache_hit': []}
                            for s in SETTINGS}} for name in args.optimizers}}
    payload['models'].append(record)
    for _ in range(args.repeats):
      for optimizer in args.optimizers:
        settings = record['optimizers'][optimizer]['settings']
        with tempfile.TemporaryDirectory() as cache_dir:
          for setting_name in SETTINGS:
            bar.set_description(f'{model_name}: {optimizer}, {setting_name}')
            result = run_child(model_name, optimizer,
                               None if setting_name == 'no cache' else cache_dir)
            for key in ('lower_seconds', 'compile_seconds', 'cache_hit'):
              settings[setting_name][key].append(result[key])
            bar.update(1)
    summarize(record)
    common.write_json(json_path, payload)
  bar.close()
  payload['wall_seconds'] = time.perf_counter() - start
  common.write_json(json_path, payload)
  plot(payload, json_path.with_suffix('.png'))

  print(f"\n{payload['device']['device_kind']} ({payload['device']['platform']}), "
        f"jax {payload['device']['jax_version']}: median seconds in a fresh process "
        '(tracing + lowering + compiling), and x SGD in the same setting')
  for record in payload['models']:
    print(f"\n{record['model']:<16}" + ''.join(f'{s:>22}' for s in SETTINGS))
    for name, entry in record['optimizers'].items():
      cells = [f"{s['median_total_seconds']:7.2f} s ({s['total_ratio_to_sgd']:4.1f}x)"
               for s in entry['settings'].values()]
      print(f'{name:<16}' + ''.join(f'{c:>22}' for c in cells))
  missed = [(r['model'], n) for r in payload['models'] for n, e in r['optimizers'].items()
            if not all(e['settings']['warm cache']['cache_hit'])]
  if missed:
    print(f'\nwarning: a warm process missed the cache for {missed}')
  print(f'\nwrote {json_path} and {json_path.with_suffix(".png")}')
  return payload


if __name__ == '__main__':
  main()
