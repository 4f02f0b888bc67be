"""The robustness probe: every bad input gives a clear error or a flagged,
finite update; every unusual one trains.

Runs ``benchmarks/robustness.py`` in-process (about a minute) and checks
its JSON. The probe is user code: it runs under JAX's default promotion
rules, not the strict ones of the rest of the suite.
"""

import json

import jax


def test_probe_finds_no_cryptic_error_and_no_silent_result(bench, tmp_path):
  robustness = bench('robustness')
  with jax.numpy_dtype_promotion('standard'), jax.numpy_rank_promotion('allow'):
    robustness.main(['--out', str(tmp_path)])
  payload = json.loads((tmp_path / 'robustness.json').read_text())
  summary = payload['summary']
  bad = [f"{row['mode']} {row['case']}: {row['message']}" for row in payload['cases']
         if row['outcome'] in ('cryptic', 'silent')]
  assert not bad, bad
  assert summary['inputs'] >= 60
  assert summary['trials'] == 2 * summary['inputs']
  assert summary['clear_error'] + summary['flagged'] + summary['handled'] == summary['trials']
  assert summary['flagged'] > 0 and summary['handled'] > 0
  assert (tmp_path / 'robustness.png').stat().st_size > 0
