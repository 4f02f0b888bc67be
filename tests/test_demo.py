"""The README's demo runs end to end and writes its table, JSON and plot."""

import json

from kwng_jax.examples import demo


def test_demo_trains_all_optimizers_and_writes_results(tmp_path, capsys, standard_promotion):
  # standard_promotion: optax.adam's bias correction mixes int and float.
  out = tmp_path / 'demo'
  results = demo.main(['--epochs', '2', '--hidden', '16', '--out', str(out)])
  printed = capsys.readouterr().out
  assert [r['optimizer'] for r in results] == ['SGD', 'Adam', 'KWNG (M=5)', 'KWNG published']
  for name in ('SGD', 'Adam', 'KWNG (M=5)', 'KWNG published'):
    assert name in printed
  saved = json.loads(out.with_suffix('.json').read_text())
  assert len(saved['results'][2]['test_accuracy']) == 2
  assert all(0.0 <= a <= 1.0 for a in saved['results'][2]['test_accuracy'])
  assert saved['results'][2]['median_step_ms'] > 0
  assert out.with_suffix('.png').stat().st_size > 1000
