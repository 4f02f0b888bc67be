"""Writes the generated pages of the documentation into docs/_generated/.

Run by docs/conf.py at the start of every build (and runnable alone:
``python docs/generate.py``). It

* copies the jupytext notebooks ``notebooks/0N_*.py`` into
  ``_generated/notebooks/`` (myst-nb executes them during the build);
* writes one page per benchmark into ``_generated/benchmarks/`` from the
  committed JSON under ``benchmarks/results/``, with the rendering functions
  of ``benchmarks/readme_accuracy.py`` and ``benchmarks/readme_training.py``,
  and copies the plots and JSON files those pages link to.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
REPO = DOCS.parent
OUT = DOCS / '_generated'
RESULTS = REPO / 'benchmarks' / 'results'


def _module(name: str):
  spec = importlib.util.spec_from_file_location(f'_docs_{name}', REPO / 'benchmarks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _relink(text: str, page_dir: pathlib.Path) -> str:
  """Points links to benchmarks/results/... at copies next to the page."""

  def copy(match: re.Match) -> str:
    relative = match.group(2)
    source = RESULTS / relative
    target = OUT / 'results' / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return f"{match.group(1)}({pathlib.Path('..', 'results', relative).as_posix()})"

  text = re.sub(r'(\]|\]\s)\(benchmarks/results/([^)\s]+)\)', copy, text)
  # Cross-references to README sections that now live in the guide.
  text = text.replace('(#amortizing-the-cost)', '(../../amortization.md)')
  text = text.replace('(#step-time)', '(speed.md)')
  return text


def _retitle(lines: list[str], title: str) -> list[str]:
  """One H1 title, the sections' own headings moved up so that none skips a level."""
  headings = [len(m.group(1)) for line in lines if (m := re.match(r'^(#+) ', line))]
  top = min(headings) if headings else 1
  out = [f'# {title}', '']
  for line in lines:
    m = re.match(r'^(#+) (.*)$', line)
    if m:
      if len(m.group(1)) == top:
        continue  # the section's own title: the page's H1 replaces it
      line = '#' * (len(m.group(1)) - top + 1) + ' ' + m.group(2)
    out.append(line)
  return out


def _write(name: str, title: str, lines: list[str], reproduce: str) -> None:
  page = OUT / 'benchmarks' / f'{name}.md'
  page.parent.mkdir(parents=True, exist_ok=True)
  body = _retitle(lines, title) + ['', f'Reproduce: {reproduce}', '']
  page.write_text(_relink('\n'.join(body), page.parent))


def benchmark_pages() -> list[str]:
  accuracy = _module('readme_accuracy')
  training = _module('readme_training')
  names = []

  acc_json = RESULTS / 'accuracy' / 'accuracy.json'
  text = accuracy.section(acc_json, None)
  _write('accuracy', 'Accuracy of the estimator', text.splitlines(),
         '`python benchmarks/accuracy.py` (about half an hour on 2 CPU cores).')
  names.append('accuracy')

  traj_json = RESULTS / 'trajectory' / 'trajectory.json'
  lines = accuracy.trajectory_section(json.loads(traj_json.read_text()), traj_json.parent)
  _write('trajectory', 'Optimization under reparametrization', lines,
         '`python benchmarks/trajectory.py`.')
  names.append('trajectory')

  classification = [RESULTS / name / 'classification.json'
                    for name in ('classification_mlp', 'classification_cnn',
                                 'classification_cnn_h200')]
  text = training.render([p for p in classification if p.exists()], [])
  lines = [line for line in text.splitlines() if not line.startswith('Reproduce:')]
  _write('classification', 'Classification: digits MLP and CNN', lines,
         '`python benchmarks/classification.py --models mlp` (about 10 minutes on 2 CPU cores) '
         'and `--models cnn` (about 35 minutes on 2 CPU cores, 4 on one H200); `--quick` is '
         'the CI smoke test.')
  names.append('classification')

  _write('convex', 'Least squares and a loss-only parameter', _convex_intro() + training.convex_page(),
         '`python benchmarks/convex.py`.')
  names.append('convex')

  speeds = sorted((RESULTS / 'speed').glob('speed_*.json'))
  text = training.render([], speeds)
  lines = [line for line in text.splitlines() if not line.startswith('Reproduce:')]
  lines += training.compile_cache_page()
  _write('speed', 'Step time', lines, '`python benchmarks/speed.py`; on a GPU, '
         '`bash benchmarks/gpu_speed.sh`; `python benchmarks/compile_cache.py`.')
  names.append('speed')

  _write('amortization', 'Amortizing the cost: measurements',
         ['What the options measured here do, and how to read these numbers, is in '
          '[Amortizing the cost](../../amortization.md).', ''] + training.amortization_page(),
         '`python benchmarks/amortization.py`.')
  names.append('amortization')

  _write('robustness', 'Robustness: bad and unusual inputs',
         ['`benchmarks/robustness.py` feeds KWNG bad or unusual inputs (options out of '
          'range, NaN and Inf in gradients or samples, samples that do not depend on the '
          'parameters, float16 and bfloat16 parameters, extreme scales, optax wrappers) and '
          'classifies what happens to each: a *clear error* names the argument and the fix; '
          'a *flagged* update is finite and `kwng_info` says what went wrong; *handled* '
          'inputs are unusual but valid and train as they should; a *cryptic* error or a '
          '*silent* bad result would be a bug. See [Bad inputs and diagnostics]'
          '(../../diagnostics.md).', ''] + training.robustness_page(),
         '`python benchmarks/robustness.py`.')
  names.append('robustness')

  # The README's headline table, included by docs/benchmarks.md (not a page
  # of its own: the suffix keeps Sphinx from reading it as one).
  (OUT / 'benchmarks' / 'headline.inc').write_text(
      _relink(training.headline_table(), OUT / 'benchmarks'))
  return names


def _convex_intro() -> list[str]:
  return ['Least squares (64 samples, 5 standard-normal features and a bias, 1-D target with '
          'noise 0.1, full-batch steps from zero) and a Gaussian likelihood '
          'mean|y − f(x)|²/(2σ²) + d·log σ with log σ a parameter the samples (f(x), d = 2) do '
          'not see (targets with noise 0.3 and 0.1); `benchmarks/convex.py`.', '',
          'With noise 0.1 the likelihood is 100 times sharper in sample space than the '
          'natural-gradient step assumes; ε climbs to keep steps from raising the loss, and '
          'the unseen log σ, whose step shrinks as 1/(v + ε/D) (v and D those of a typical '
          'seen parameter), converges slowly. The damping '
          "`'reference'` gives that unseen parameter a step of order g/ε; `kwng`'s "
          "`'metric_diagonal'` and `'safe'` bound it.", '']


def notebooks() -> list[str]:
  target = OUT / 'notebooks'
  target.mkdir(parents=True, exist_ok=True)
  names = []
  for source in sorted((REPO / 'notebooks').glob('0*_*.py')):
    shutil.copyfile(source, target / source.name)
    names.append(source.stem)
  return names


def main() -> None:
  if OUT.exists():
    shutil.rmtree(OUT)
  OUT.mkdir(parents=True)
  notebooks()
  benchmark_pages()


if __name__ == '__main__':
  main()
