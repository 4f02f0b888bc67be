"""Writes the README sections of the training benchmarks from their JSON.

Reads ``benchmarks/results/classification/classification.json`` and the
``speed_*.json`` files of ``benchmarks/results/speed/`` and prints Markdown
(the classification tables, the fresh-seed comparisons, the targets, the
step-time tables, links to the plots); ``--out FILE`` writes it to a file instead.

  python benchmarks/readme_training.py --out training.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence
from typing import Any

RESULTS = pathlib.Path(__file__).parent / 'results'
REPO = pathlib.Path(__file__).parent.parent


def _pm(spread: dict[str, Any], digits: int = 3) -> str:
  if spread['mean'] is None:
    return 'diverged'
  return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}"


def _link(path: pathlib.Path) -> str:
  """The path relative to the repository root (where the README lives), if inside it."""
  path = path.resolve()
  return (path.relative_to(REPO.resolve()) if path.is_relative_to(REPO.resolve())
          else path).as_posix()


def classification_section(payload: dict[str, Any], json_path: pathlib.Path) -> list[str]:
  """The classification tables, the fresh-seed comparisons and the targets, as Markdown."""
  config = payload['config']
  data = payload['data']
  device = payload['device']
  lines = [
      f"### {', '.join(m.upper() for m in config['models'])} on {_device_name(device)}",
      '',
      'scikit-learn\'s bundled 8×8 digits (no download), split '
      f"{data['train']} train / {data['val']} validation / {data['test']} test. "
      f"An MLP (64–{config['hidden']}–10, ReLU) and a small CNN from `kwng_jax.examples.models`, "
      'each with a well-conditioned head and with the paper\'s ill-conditioned head '
      '(logits × logspace(−6, 1, 10), condition number 1e7). Batch '
      f"{config['batch_size']}; {config['epochs']} epochs for the MLP, "
      f"{config['cnn_epochs']} for the CNN; {config['seeds']} seeds per learning rate. "
      'Each optimizer\'s learning rate is the one of its grid with the best mean validation '
      'accuracy at the last epoch; the tables give the **test** accuracy at the last epoch '
      'at that learning rate (mean ± std over seeds). `*`: the chosen learning rate is at '
      'an edge of the grid. Time: milliseconds per epoch of one run on '
      f"{_device_name(device)} (the runs of a grid train "
      'together, vmapped for the MLP, looped for the CNN; the whole grid\'s time divided '
      'by its runs).',
      '',
      '| optimizer | grid |',
      '|---|---|',
  ]
  for method in payload['methods']:
    grid = ', '.join(f'{lr:g}' for lr in method['learning_rates'])
    lines.append(f"| {method['name']} | {grid} — {method['description']} |")
  lines.append('')

  tasks: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for result in payload['results']:
    tasks.setdefault((result['model'], result['conditioning']), []).append(result)
  for (model, conditioning), results in tasks.items():
    lines += [f"**{model.upper()}, {conditioning}-conditioned head** ({results[0]['epochs']} "
              'epochs)', '',
              '| optimizer | lr | test accuracy | train loss | ms / run-epoch |',
              '|---|---|---|---|---|']
    for r in results:
      edge = '*' if r['selected_at_grid_edge'] else ''
      loss = r['train_loss']['mean']
      loss_text = 'diverged' if loss is None else f'{loss:.3g}'
      lines.append(f"| {r['method']} | {r['selected_learning_rate']:g}{edge} | "
                   f"{_pm(r['test_accuracy'])} | {loss_text} | "
                   f"{1e3 * r['seconds_per_run_epoch']:.1f} |")
    lines.append('')
  out_dir = json_path.parent
  lines += [f"![training curves]({_link(out_dir / 'classification.png')})", '',
            f"kfac-jax: {payload['kfac_jax']}", '']

  lines += fresh_seeds_section(payload, out_dir)
  return lines


def _device_name(device: dict[str, Any]) -> str:
  if device.get('platform') == 'gpu' or 'gpu' in str(device.get('devices', '')).lower():
    return str(device.get('device_kind') or device.get('devices'))
  return f"{device.get('host_cpu_count', '?')} CPU cores"


def fresh_seeds_section(payload: dict[str, Any], out_dir: pathlib.Path) -> list[str]:
  """The fresh-seed comparisons (paired against the recommended KWNG) and the targets."""
  comparisons = payload.get('fresh_seeds', [])
  if not comparisons:
    return []
  lines = ['**Fresh seeds.** Each optimizer at its selected learning rate, rerun with '
           f"{len(next(iter(comparisons[0]['entries'].values()))['seeds'])} new seeds; "
           'each KWNG minus it, in points, paired by seed (same initialization and minibatch '
           'order), ± the standard error of the paired differences.', '']
  for comparison in comparisons:
    kwngs = list(comparison['versus'])
    lines += [f"*{comparison['model'].upper()}, {comparison['conditioning']}-conditioned*", '',
              '| optimizer | lr | test accuracy | ' + ' | '.join(f'{k} − it' for k in kwngs) + ' |',
              '|---|---|---|' + '---|' * len(kwngs)]
    for name, entry in comparison['entries'].items():
      cells = []
      for kwng in kwngs:
        versus = comparison['versus'][kwng].get(name)
        cells.append('—' if versus is None else
                     f"{100 * versus['mean']:+.1f} ± {100 * (versus['standard_error'] or 0):.1f}")
      label = entry.get('method', name)
      lines.append(f"| {label} | {entry['learning_rate']:g} | {_pm(entry['test_accuracy'])} | "
                   + ' | '.join(cells) + ' |')
    lines.append('')
  lines += [f"![fresh seeds]({_link(out_dir / 'classification_fresh_seeds.png')})", '']
  lines += targets_section(payload['targets'])
  return lines


def targets_section(targets: dict[str, Any]) -> list[str]:
  """The recommended KWNG's targets, stated with their numbers."""
  if not targets:
    return []
  lines = ['Targets:', '']
  for target in targets.values():
    met = {True: 'met', False: '**not met**', None: 'reported'}[target['met']]
    numbers = ', '.join(f"{key.replace('_', ' ')} {value:.1f}" for key, value in target.items()
                        if key not in ('target', 'met') and isinstance(value, float))
    lines.append(f"- {target['target']}: {numbers} — {met}.")
  lines.append('')
  return lines


def _kilobytes(num_bytes: int | None) -> str:
  if num_bytes is None:
    return '–'
  if 0 < num_bytes < 100:
    return '< 0.1'
  return f'{num_bytes / 1e3:,.1f}'


def speed_section(payloads: Sequence[tuple[pathlib.Path, dict[str, Any]]]) -> list[str]:
  """The step-time tables of every speed JSON, and their targets."""
  lines = [
      '## Step time',
      '',
      '`benchmarks/speed.py`: the same jitted training step (forward, loss, gradient, '
      'update) for every optimizer, on the same model with the ill-conditioned head, in one '
      'process; compile time (`lower().compile()`, tracing included) apart from the '
      'steady-state step time (each step timed up to `block_until_ready`, the optimizers '
      'interleaved in rounds of 20 steps). Median step: the median over all steps; mean step: '
      "the median over rounds of each round's mean, the cost per step of `update_every=10`, "
      "which rebuilds at 2 of a round's 20 steps. `published M=m` is "
      '`kwng_jax.published_kwng` (adaptive ε, clip 1) with M basis functions, `KWNG M=m` the '
      'recommended `kwng_jax.kwng` with its defaults (the metric-diagonal damping, T from the '
      'first 32 of the 128 samples, the step capped by the displacement of the samples on the '
      'whole batch: one more `jax.jvp`; momentum: a few passes over P), and the bracketed rows '
      'the same with one more option (`jacobian_samples=None`: T from the whole batch). '
      '`floor M=m` is the work no KWNG step can avoid, run as a step of its own: the SGD step '
      'plus M VJPs of the outputs one after the other (`+ JVP`: and the displacement\'s JVP). '
      'Memory: the optimizer state, and the scratch memory XLA allocates for the whole step '
      "(`memory_analysis().temp_size_in_bytes`); KWNG's extra scratch over SGD's holds the "
      'M rows of T̃ (M×P). What `update_every` and `jacobian_samples` '
      'cost in accuracy is in '
      '[Amortizing the cost](#amortizing-the-cost).',
      '',
      'Memory allocator: a KWNG step allocates and frees tens of MB of temporaries (T̃ and F '
      'of a large model). glibc\'s `malloc` serves blocks that large with `mmap` and unmaps them '
      'when they are freed, unless its adaptive threshold has grown past their size, which '
      'depends on what the process allocated before. When it has not, every step faults its '
      'temporaries in afresh: the 670k-parameter MLP\'s KWNG M=5 step took 29 ms instead of 18 '
      'ms, while SGD\'s step did not change. `speed.py` therefore pins the thresholds at start '
      '(`mallopt`; `--system-allocator` keeps the defaults). A training script gets the same '
      'from `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647` in its '
      'environment, or from jemalloc or tcmalloc.',
      '',
  ]
  for path, payload in payloads:
    device = payload['device']
    allocator = payload.get('glibc_malloc_settings')
    for record in payload['models']:
      lines += [f"**{record['model']}, batch {record['batch_size']}, "
                f"{record['num_params']:,} parameters, {record['data']}** — "
                f"{device['device_kind']} ({device['platform']}, "
                f"{device['host_cpu_count']} host cores), jax {device['jax_version']}"
                f"{', glibc malloc thresholds pinned' if allocator else ''} "
                f"([JSON]({_link(path)}))", '',
                '| optimizer | median step (ms) | × SGD | mean step (ms) | × SGD | compile (s) '
                '| state (kB) | step scratch (kB) |',
                '|---|---|---|---|---|---|---|---|']
      for name, entry in record['optimizers'].items():
        lines.append(f"| {name} | {entry['median_step_ms']:.2f} | "
                     f"{entry['ratio_to_sgd']:.2f} | {entry['mean_step_ms']:.2f} | "
                     f"{entry['mean_ratio_to_sgd']:.2f} | {entry['compile_seconds']:.1f} | "
                     f"{_kilobytes(entry.get('state_bytes'))} | "
                     f"{_kilobytes(entry.get('temp_bytes'))} |")
      lines.append('')
      if record.get('targets'):
        lines += ['| target | measured | limit | |', '|---|---|---|---|']
        lines += [f"| {t['target']} | {t['value']:.2f} | ≤ {t['limit']:g} | "
                  f"{'met' if t['met'] else 'not met'} |" for t in record['targets']]
        lines.append('')
  if not any(p['device']['platform'] == 'gpu' for _, p in payloads):
    lines += ['No GPU measurement of `speed.py` yet (no GPU was lent to the sessions that ran it). '
              'On a GPU: `bash benchmarks/gpu_speed.sh` (ResNet-18, batch 128, random '
              'CIFAR-shaped data; the same rows; writes `speed_gpu.json`). The GPU targets are '
              'the recommended KWNG with its defaults ≤ 2× SGD and the full-batch M=5 step '
              '≤ 3×. An earlier H200 measurement of the same ResNet-18 step by '
              '`benchmarks/fused_forward.py` '
              '([JSON](benchmarks/results/fused_forward_h200_m5/fused_forward.json), jax 0.11.2) '
              'gave SGD 5.78 ms and the published KWNG M=5 21.7 ms (3.75×). That KWNG step does '
              "4.4× the FLOPs of SGD's by XLA's cost analysis (7.2 against 1.6 GFLOP: the M VJPs "
              'over the whole batch).', '']
  return lines


def render(classification_jsons: Sequence[pathlib.Path],
           speed_jsons: Sequence[pathlib.Path]) -> str:
  """The Markdown of the sections whose JSON files exist."""
  lines: list[str] = []
  existing_classification = [path for path in classification_jsons if path.exists()]
  if existing_classification:
    lines += ['## Classification benchmark', '']
  for path in existing_classification:
    lines += classification_section(json.loads(path.read_text()), path)
  if existing_classification:
    lines += [
        'Reproduce: `python benchmarks/classification.py --models mlp` (about 10 minutes on 2 '
        'CPU cores) and `--models cnn` (about 35 minutes on 2 CPU cores, 4 on one H200); '
        '`--quick` is the CI smoke test; then `python benchmarks/readme_training.py`.', '']
  existing = [(path, json.loads(path.read_text())) for path in speed_jsons if path.exists()]
  if existing:
    lines += speed_section(existing)
    lines += ['Reproduce: `python benchmarks/speed.py`, then '
              '`python benchmarks/readme_training.py`.', '']
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--classification', type=pathlib.Path, nargs='*',
                      default=[RESULTS / 'classification_mlp' / 'classification.json',
                               RESULTS / 'classification_cnn' / 'classification.json'])
  parser.add_argument('--speed', type=pathlib.Path, nargs='*',
                      default=sorted((RESULTS / 'speed').glob('speed_*.json')))
  parser.add_argument('--out', type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  text = render(args.classification, args.speed)
  if args.out is None:
    print(text)
  else:
    args.out.write_text(text)
    print(f'wrote {args.out}')
  return text


if __name__ == '__main__':
  main()


# --- Pages of the documentation and the README's headline table -------------
#
# Each function below reads committed JSON under benchmarks/results/ and
# returns Markdown; docs/generate.py calls them at build time, and the
# README's headline table is `headline_table()` pasted in.


def _load(relative: str) -> dict[str, Any]:
  return json.loads((RESULTS / relative).read_text())


def _fresh(payload: dict[str, Any], conditioning: str) -> dict[str, Any]:
  return next(c for c in payload['fresh_seeds'] if c['conditioning'] == conditioning)


def robustness_summary(summary: dict[str, int]) -> str:
  """One sentence with the counts of ``robustness.json``'s summary."""
  return (f"{summary['inputs']} bad or unusual inputs ({summary['bad_inputs']} bad, "
          f"{summary['unusual_inputs']} unusual but valid), each eagerly and under `jit` "
          f"({summary['trials']} trials): {summary['clear_error']} clear errors, "
          f"{summary['flagged']} flagged finite updates, {summary['handled']} handled as they "
          f"should, {summary['cryptic']} cryptic errors, {summary['silent']} silent bad results")


def headline_table() -> str:
  """The README's one table: accuracy, training against baselines, step time, robustness."""
  accuracy = _load('accuracy/accuracy.json')
  targets = {t['target']: t['measured'] for t in accuracy['targets']}
  kwng_error = targets['median error, d=2, N=4096, M=128']
  naive_ratio = targets['naive / KWNG median error, d=2, N=4096']
  trajectory = _load('trajectory/trajectory.json')
  rows = [
      '| benchmark | result |',
      '|---|---|',
      '| accuracy: relative error of the KWNG direction against the exact Wasserstein '
      'natural gradient, 2-D Gaussian, N = 4096, M = 128 (median, 20 seeds) '
      f'| {kwng_error:.3f} (the naive metric E[JᵀJ]: {naive_ratio:.0f}× larger) |',
  ]
  curves = trajectory['dims']['d=2']['curves']
  kwng_label = next(label for label in curves if label.startswith('kwng'))

  def iters(label):
    return ' / '.join(str(curves[label][p]['iterations_to_converge'] or '–')
                      for p in ('original', 'rescaled'))
  rows.append('| optimization under reparametrization: iterations to a 1e-6 × initial loss, '
              '2-D Gaussian, original / one coordinate rescaled ×1e3 '
              f'| {kwng_label.replace("kwng", "KWNG")}: {iters(kwng_label)}; exact natural '
              f"gradient: {iters('exact')}; gradient descent (best lr each): {iters('gd')} |")
  for name, label in (('classification_mlp', 'digits MLP'), ('classification_cnn', 'digits CNN')):
    entries = _fresh(_load(f'{name}/classification.json'), 'ill')['entries']
    cells = []
    for key, shown in (('KWNG', 'KWNG'), ('KWNG (M=20)', 'KWNG M=20'), ('Muon', 'tuned Muon'),
                       ('Adam', 'tuned Adam'), ('SGD', 'tuned SGD'),
                       ('KWNG (published)', 'published KWNG')):
      if key in entries:
        cells.append(f"{shown} {entries[key]['test_accuracy']['mean']:.3f}")
    rows.append(f'| {label}, ill-conditioned head (condition number 1e7): test accuracy, '
                f"10 fresh seeds | {', '.join(cells)} |")
  speed = _load('speed/speed_cpu.json')
  cells = []
  for record in speed['models']:
    opts = record['optimizers']
    cells.append(f"{record['model'].upper()} ({record['num_params']:,} parameters): "
                 f"M=5 {opts['KWNG M=5']['ratio_to_sgd']:.1f}× (published "
                 f"{opts['published M=5']['ratio_to_sgd']:.1f}×), "
                 f"M=20 {opts['KWNG M=20']['ratio_to_sgd']:.1f}×, Adam "
                 f"{opts['Adam']['ratio_to_sgd']:.2f}×")
  rows.append(f"| step time over SGD's (median step, {_device_name(speed['device'])}) "
              f"| {'; '.join(cells)} |")
  robustness = _load('robustness/robustness.json')['summary']
  rows.append(f'| robustness | {robustness_summary(robustness)} |')
  return '\n'.join(rows) + '\n'


def _escape(text: str) -> str:
  """Plain text for a Markdown table cell: every ASCII punctuation escaped."""
  import re
  text = ' '.join(str(text).split())
  return re.sub(r'([\\`*_\[\]<>|$])', r'\\\1', text)


def robustness_page(path: pathlib.Path = RESULTS / 'robustness' / 'robustness.json') -> list[str]:
  """The robustness probe: its summary and every case, as Markdown."""
  payload = json.loads(path.read_text())
  summary = payload['summary']
  device = payload['device']
  lines = [f'{robustness_summary(summary)}.', '',
           f"Run on {_device_name(device)}, jax {device['jax_version']} "
           f"([JSON]({_link(path)}), [plot]({_link(path.parent / 'robustness.png')})).", '',
           '| outcome | trials |', '|---|---|']
  for key in ('clear_error', 'flagged', 'handled', 'cryptic', 'silent'):
    lines.append(f"| {key.replace('_', ' ')} | {summary[key]} |")
  lines += ['', f"![robustness outcomes]({_link(path.parent / 'robustness.png')})", '',
            '| case | kind | mode | outcome | message |', '|---|---|---|---|---|']
  for case in payload['cases']:
    lines.append(f"| {_escape(case['case'])} | {case['kind']} | {case['mode']} | "
                 f"{case['outcome'].replace('_', ' ')} | {_escape(case['message'])} |")
  lines.append('')
  return lines


def convex_page(path: pathlib.Path = RESULTS / 'convex' / 'convex.json') -> list[str]:
  """Final loss minus the optimum of every optimizer on the convex problems."""
  payload = json.loads(path.read_text())
  columns = sorted({(r['problem'], r['noise'], r['steps']) for r in payload['results']},
                   key=lambda c: (c[0] != 'least_squares', -c[1]))
  gaps: dict[str, dict[tuple, float]] = {}
  for r in payload['results']:
    gaps.setdefault(r['optimizer'], {})[(r['problem'], r['noise'], r['steps'])] = r['gap']

  def title(column):
    problem, noise, steps = column
    name = 'least squares' if problem == 'least_squares' else 'loss-only σ'
    return f'{name}, noise {noise:g} ({steps} steps)'
  device = payload['device']
  lines = [f"Final loss minus the closed-form optimum ({_device_name(device)}, jax "
           f"{device['jax_version']}, [JSON]({_link(path)})):", '',
           '| optimizer | ' + ' | '.join(title(c) for c in columns) + ' |',
           '|---|' + '---|' * len(columns)]
  for name, by_column in gaps.items():
    lines.append(f'| {name} | ' + ' | '.join(
        '–' if by_column.get(c) is None else f'{by_column[c]:.2g}' for c in columns) + ' |')
  lines += ['', f"![convex]({_link(path.parent / 'convex.png')})", '']
  return lines


AMORTIZATION_NAMES = {
    'sgd': 'SGD', 'kwng': 'KWNG M=5', 'kwng_update_every': '`update_every=10`',
    'kwng_subsample': '`jacobian_samples=32` (+ `jacobian_outputs_fn`)',
    'kwng_bf16': '`jacobian_dtype=bfloat16`', 'noise_floor': '(noise floor) another random basis',
}


def amortization_page(path: pathlib.Path = RESULTS / 'amortization' / 'amortization.json'
                      ) -> list[str]:
  """Step time, memory and accuracy of the options that amortize KWNG's cost."""
  payload = json.loads(path.read_text())
  config, device = payload['config'], payload['device']
  lines = [f"Digits MLP 64–{'–'.join(str(h) for h in config['hidden'])}–10 with the "
           f"ill-conditioned head, batch {config['batch_size']}, "
           f"P = {payload['memory']['num_params']:,}, M = {config['num_basis']}, the published "
           f"chain (lr {config['learning_rate']:g}); SGD at lr {config['sgd_learning_rate']:g}. "
           f"{_device_name(device)}, jax {device['jax_version']} "
           f"([JSON]({_link(path)})).", '',
           '| method | step (ms) | × SGD | compile (s) | state bytes beyond SGD | train loss '
           '| test acc. |', '|---|---|---|---|---|---|---|']
  for m in payload['methods']:
    lines.append(f"| {AMORTIZATION_NAMES.get(m['name'], m['name'])} | {m['step_ms']:.2f} | "
                 f"{m['step_ratio_vs_sgd']:.1f} | {m['compile_s']:.1f} | "
                 f"{payload['memory']['state_bytes_beyond_sgd'][m['name']]:,} | "
                 f"{m['final_train_loss']:.2f} | {m['test_accuracy']:.2f} |")
  lines += ['', f"Stored factors with `update_every`: {payload['memory']['stored_factors_formula']}"
            f" = {payload['memory']['stored_factors_bytes']:,} bytes; "
            f"T: {payload['memory']['factor_bytes_formula']} = "
            f"{payload['memory']['factor_bytes']:,} bytes.", '',
            'Accuracy of each option against the same path without it (relative error and '
            'cosine of the directions):', '',
            '| comparison | option | median relative error | median cosine | checks |',
            '|---|---|---|---|---|']
  for group, entries in payload['accuracy'].items():
    for name, stats in entries.items():
      lines.append(f"| {group.replace('_', ' ')} | {AMORTIZATION_NAMES.get(name, name)} | "
                   f"{stats['median']:.3g} | {stats['median_cosine']:.3f} | {stats['count']} |")
  lines += ['', f"![amortization]({_link(path.parent / 'amortization.png')})", '']
  return lines


def compile_cache_page(path: pathlib.Path = RESULTS / 'compile_cache' / 'compile_cache.json'
                       ) -> list[str]:
  """Compile time in a fresh process: no cache, a cold and a warm persistent cache."""
  payload = json.loads(path.read_text())
  device = payload['device']
  settings = list(next(iter(payload['models'][0]['optimizers'].values()))['settings'])
  lines = ['### Compile time and the persistent cache', '',
           '`benchmarks/compile_cache.py`: the jitted step of the step-time page, built in a '
           'fresh Python process, timed from tracing to the compiled executable (tracing and '
           'lowering, then `compile()`), without JAX\'s persistent compilation cache, with an '
           'empty one (the compile writes the entry) and with the one a previous process '
           'filled. Median over '
           f"{payload['config']['repeats']} repeats; × SGD: over SGD's step in the same setting. "
           f"{_device_name(device)}, jax {device['jax_version']} ([JSON]({_link(path)})).", '',
           '| model | optimizer | ' + ' | '.join(f'{s} (s)' for s in settings)
           + ' | warm: tracing + lowering (s) | warm process read the cache |',
           '|---|---|' + '---|' * len(settings) + '---|---|']
  for record in payload['models']:
    for name, entry in record['optimizers'].items():
      cells = [f"{s['median_total_seconds']:.2f} ({s['total_ratio_to_sgd']:.1f}×)"
               for s in entry['settings'].values()]
      warm = entry['settings']['warm cache']
      lines.append(f"| {record['model']} | {name} | {' | '.join(cells)} | "
                   f"{warm['median_lower_seconds']:.2f} | "
                   f"{'yes' if all(warm['cache_hit']) else 'no'} |")
  lines += ['', f"![compile time]({_link(path.parent / 'compile_cache.png')})", '']
  return lines
