"""Writes the README's "Accuracy" section from the benchmarks' JSON.

Every number in the section comes from ``accuracy.json`` (written by
``benchmarks/accuracy.py``) and ``trajectory.json`` (``benchmarks/trajectory.py``);
nothing is typed by hand. Run after the benchmarks:

  python benchmarks/readme_accuracy.py > section.md
  python benchmarks/readme_accuracy.py --output section.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_ACCURACY = HERE / 'results' / 'accuracy' / 'accuracy.json'
DEFAULT_TRAJECTORY = HERE / 'results' / 'trajectory' / 'trajectory.json'


def fmt(x: float | None, digits: int = 2) -> str:
  """A number with ``digits`` significant digits, '–' for None."""
  if x is None:
    return '–'
  return f'{x:.{digits}g}'


def cell(table: dict[str, list], i: int) -> str:
  """``median (q25–q75)`` of row ``i`` of a summary table."""
  return f"{fmt(table['median'][i])} ({fmt(table['q25'][i])}–{fmt(table['q75'][i])})"


def image(path: pathlib.Path, alt: str) -> str:
  try:
    link = path.resolve().relative_to(REPO)
  except ValueError:
    link = path
  return f'![{alt}]({link.as_posix()})'


def n_sweep_section(results: dict[str, Any], folder: pathlib.Path) -> list[str]:
  sweep = results['n_sweep']
  dims = list(sweep)
  all_n = sorted({n for d in dims for n in sweep[d]['kwng']['num_samples']})
  config = results['config']
  lines = [
      '### Error against the number of samples',
      '',
      f"Cholesky Gaussian, {config['gaussian_theta']}; "
      f"{config['basis']}; {config['seeds']} seeds; median (quartiles) of "
      'the relative error. The last rows give the naive metric at the '
      'largest common N and the fitted log–log slope '
      f"({config['slope_fit']}).",
      '',
      '| N | ' + ' | '.join(f'{d} (P = {_num_params(d)})' for d in dims) + ' |',
      '|---|' + '---|' * len(dims),
  ]
  for n in all_n:
    row = [str(n)]
    for d in dims:
      table = sweep[d]['kwng']
      if n in table['num_samples']:
        i = table['num_samples'].index(n)
        row.append(f"{cell(table, i)}, M = {table['num_basis'][i]}")
      else:
        row.append('–')
    lines.append('| ' + ' | '.join(row) + ' |')
  row = ['naive, largest N']
  for d in dims:
    naive = sweep[d]['naive']
    row.append(f"{cell(naive, len(naive['median']) - 1)} (N = {naive['num_samples'][-1]})")
  lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('| slope | ' + ' | '.join(fmt(sweep[d]['kwng']['slope'], 3) for d in dims) + ' |')
  lines += ['', image(folder / 'error_vs_n.png', 'relative error against N'), '']
  return lines


def _machine(environment: dict[str, Any]) -> str:
  device = environment['device']
  if device.startswith('cpu') or device.startswith('TFRT_CPU'):
    return f"{environment['cpu_count']} CPU cores"
  return device


def _num_params(dim_key: str) -> int:
  dim = int(dim_key.split('=')[1])
  return dim + dim * (dim + 1) // 2


def targets_section(results: dict[str, Any]) -> list[str]:
  lines = [
      '### Targets',
      '',
      '| target | threshold | measured | met |',
      '|---|---|---|---|',
  ]
  for check in results['targets']:
    lines.append(
        f"| {check['target']} | {check['threshold']} | {fmt(check['measured'], 3)} "
        f"| {'yes' if check['met'] else '**no**'} |"
    )
  return lines + ['']


def variants_section(results: dict[str, Any]) -> list[str]:
  lines = [
      '### Estimator variants',
      '',
      'Same seeds (samples, basis and g) in every row; the target is '
      f"{results['config']['target']} throughout.",
      '',
  ]
  for config, rows in results['variants'].items():
    lines += [f'{config}:', '', '| estimator | median | quartiles |', '|---|---|---|']
    for row in rows:
      lines.append(
          f"| {row['variant']} | {fmt(row['median'])} | {fmt(row['q25'])}–{fmt(row['q75'])} |"
      )
    lines.append('')
  return lines


def sweeps_section(results: dict[str, Any], folder: pathlib.Path) -> list[str]:
  lines = ['### Error against M and against the bandwidth', '']
  sweep = results['m_sweep']
  dims = [k for k in sweep if k.startswith('d=')]
  lines += [
      f"N = {sweep['num_samples']}, median (quartiles):",
      '',
      '| M | ' + ' | '.join(dims) + ' |',
      '|---|' + '---|' * len(dims),
  ]
  all_m = sorted({m for d in dims for m in sweep[d]['num_basis']})
  for m in all_m:
    row = [str(m)]
    for d in dims:
      table = sweep[d]
      row.append(cell(table, table['num_basis'].index(m)) if m in table['num_basis'] else '–')
    lines.append('| ' + ' | '.join(row) + ' |')
  sweep = results['bandwidth_sweep']
  columns = [(d, k) for d in sweep if d.startswith('d=') for k in sweep[d]]
  lines += [
      '',
      f"Bandwidth multiplier 10^log_bandwidth on the mean-distance rule, N = "
      f"{sweep['num_samples']}, M = ⌈d√N⌉, median (quartiles):",
      '',
      '| multiplier | ' + ' | '.join(f'{d}, {k}' for d, k in columns) + ' |',
      '|---|' + '---|' * len(columns),
  ]
  factors = sweep[columns[0][0]][columns[0][1]]['bandwidth_factor']
  for i, factor in enumerate(factors):
    lines.append(
        f'| {fmt(factor)} | ' + ' | '.join(cell(sweep[d][k], i) for d, k in columns) + ' |'
    )
  lines += ['', *_sweep_observations(results), '']
  lines += [
      image(folder / 'error_vs_m.png', 'relative error against M'),
      image(folder / 'error_vs_bandwidth.png', 'relative error against the bandwidth'),
      '',
  ]
  return lines


def _sweep_observations(results: dict[str, Any]) -> list[str]:
  """Facts read off the M and bandwidth sweeps (computed, not typed)."""
  lines = []
  sweep = results['m_sweep']
  for dim_key in (k for k in sweep if k.startswith('d=')):
    table = sweep[dim_key]
    num_params = _num_params(dim_key)
    usable = [i for i, m in enumerate(table['num_basis']) if m >= num_params]
    best = min(usable, key=lambda i: table['median'][i])
    rank_deficient = [table['median'][i] for i, m in enumerate(table['num_basis']) if m < num_params]
    text = (
        f"- {dim_key}, N = {sweep['num_samples']}: the lowest median error over M is "
        f"{fmt(table['median'][best])} at M = {table['num_basis'][best]} "
        f"(P = {num_params}); at the largest M, {table['num_basis'][-1]}, it is "
        f"{fmt(table['median'][-1])}."
    )
    if rank_deficient:
      text += (
          f' With M < P the estimate is rank-deficient and the error is '
          f'{fmt(min(rank_deficient))} or more (ε⁻¹ acts on the missing directions).'
      )
    lines.append(text)
  sweep = results['bandwidth_sweep']
  for dim_key in (k for k in sweep if k.startswith('d=')):
    for kernel, table in sweep[dim_key].items():
      best = min(table['median'])
      good = [f for f, e in zip(table['bandwidth_factor'], table['median']) if e <= 1.25 * best]
      lines.append(
          f"- {dim_key}, {kernel} kernel: median error within 1.25× of its minimum "
          f"({fmt(best)}) for bandwidth multipliers {fmt(min(good))}…{fmt(max(good))}."
      )
  return lines


def lognormal_section(results: dict[str, Any], folder: pathlib.Path) -> list[str]:
  lognormal = results['lognormal']
  info = results['problems']['lognormal']
  kwng, naive = lognormal['kwng'], lognormal['naive']
  lines = [
      '### A non-Gaussian model: the log-normal',
      '',
      f"X = exp(m + sZ), (m, log s) = ({fmt(info['theta'][0])}, "
      f"{fmt(info['theta'][1], 4)}); the reference G_W is the quantile "
      'metric ∫₀¹ ∂θQ ∂θQᵀ du (Gauss–Hermite quadrature; relative gap to '
      f"the closed form {fmt(info['quadrature_vs_closed_form_relative_gap'])}). "
      'In one dimension every tangent field of a monotone sample map is a '
      'gradient, so the naive metric is consistent here: it is a check, not '
      'a baseline to beat. Fitted slope of KWNG: '
      f"{fmt(kwng['slope'], 3)}; of the naive metric: {fmt(naive['slope'], 3)}.",
      '',
      '| N | M | KWNG | naive |',
      '|---|---|---|---|',
  ]
  for i, n in enumerate(kwng['num_samples']):
    lines.append(f"| {n} | {kwng['num_basis'][i]} | {cell(kwng, i)} | {cell(naive, i)} |")
  lines += ['', image(folder / 'lognormal.png', 'log-normal: relative error against N'), '']
  return lines


def trajectory_section(results: dict[str, Any], folder: pathlib.Path) -> list[str]:
  config = results['config']
  lines = [
      '### Optimization under reparametrization',
      '',
      'Minimising W₂²(ρ_θ, ρ_θ*) over Cholesky Gaussians from μ = 0, A = I, '
      f"{config['iterations']} iterations; natural gradients with learning "
      f"rate {config['natural_learning_rate']}, gradient descent with the best "
      f"rate of {fmt(min(config['gd_learning_rates']))}…"
      f"{fmt(max(config['gd_learning_rates']))} per parametrization. "
      f"'rescaled' is θ = s ⊙ φ with s = {fmt(config['rescale'])} on the "
      'entry A₁₁ and 1 elsewhere, the optimizer working on φ. KWNG: '
      f"{config['kwng']}. 'iterations' is the first iteration with a loss "
      f"below {fmt(config['converged_fraction'])} × the initial one; 'gap' is "
      'max over iterations of |log₁₀ L_original − log₁₀ L_rescaled|.',
      '',
      '| d | method | lr (original / rescaled) | iterations (original / rescaled) '
      '| final loss (original / rescaled) | gap |',
      '|---|---|---|---|---|---|',
  ]
  for dim_key, result in results['dims'].items():
    for label, by_param in result['curves'].items():
      original, rescaled = by_param['original'], by_param['rescaled']
      lines.append(
          f"| {dim_key} | {label} | {fmt(original['learning_rate'])} / "
          f"{fmt(rescaled['learning_rate'])} | "
          f"{original['iterations_to_converge'] or '–'} / "
          f"{rescaled['iterations_to_converge'] or '–'} | "
          f"{fmt(original['final_loss'])} / {fmt(rescaled['final_loss'])} | "
          f"{fmt(by_param['max_log10_gap'])} |"
      )
  lines += ['', image(folder / 'trajectory.png', 'loss against iteration'), '']
  return lines


def section(accuracy_path: pathlib.Path, trajectory_path: pathlib.Path | None) -> str:
  accuracy = json.loads(accuracy_path.read_text())
  folder = accuracy_path.parent
  config = accuracy['config']
  lines = [
      '## Accuracy',
      '',
      'How close is the KWNG direction to the exact Wasserstein natural '
      'gradient? `benchmarks/accuracy.py` measures the relative error '
      '‖ĝ − g*‖/‖g*‖ against the closed-form target '
      f"g* = {config['target']} (`kwng_jax.exact`) on models whose Wasserstein "
      f"metric is known, in {config['dtype']}, ε = {config['epsilon']}, "
      f"{config['estimator']}, g: {config['gradient']}. The naive metric "
      '(1/N) Σ JₙᵀJₙ of the same samples is the baseline. Reproduce with '
      '`python benchmarks/accuracy.py` and `python benchmarks/trajectory.py` '
      f"(this run: {accuracy['total_seconds'] / 60:.0f} min for the accuracy "
      f"study on {_machine(accuracy['environment'])}), then "
      '`python benchmarks/readme_accuracy.py` to regenerate this section.',
      '',
  ]
  lines += targets_section(accuracy)
  lines += n_sweep_section(accuracy, folder)
  lines += variants_section(accuracy)
  lines += sweeps_section(accuracy, folder)
  lines += lognormal_section(accuracy, folder)
  if trajectory_path is not None:
    trajectory = json.loads(trajectory_path.read_text())
    lines += trajectory_section(trajectory, trajectory_path.parent)
  return '\n'.join(lines).rstrip() + '\n'


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--accuracy', type=pathlib.Path, default=DEFAULT_ACCURACY)
  parser.add_argument('--trajectory', type=pathlib.Path, default=DEFAULT_TRAJECTORY,
                      help='trajectory.json; the section is skipped if missing')
  parser.add_argument('--output', type=pathlib.Path, default=None,
                      help='write here instead of stdout')
  args = parser.parse_args(argv)
  if not args.accuracy.exists():
    raise ValueError(
        f'--accuracy={args.accuracy} does not exist: run benchmarks/accuracy.py first.'
    )
  trajectory = args.trajectory if args.trajectory.exists() else None
  text = section(args.accuracy, trajectory)
  if args.output is None:
    sys.stdout.write(text)
  else:
    args.output.write_text(text)
  return text


if __name__ == '__main__':
  main()
