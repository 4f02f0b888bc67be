r"""Convex problems the recommended KWNG must solve: least squares and a loss-only parameter.

* Least squares: N = 64 samples of 5 standard-normal features plus a bias,
  a 1-D linear target with Gaussian noise 0.1, full batch, zero
  initialization, 2000 steps; the optimum is the least-squares residual.
* A parameter the loss uses but the samples do not: the Gaussian likelihood
  mean |y - f(x)|² / (2σ²) + d log σ, f linear in the same features with
  d = 2 outputs, log σ a parameter outside ``outputs_fn``; 1000 steps. The
  optimum is closed form: least squares for f and σ² = mean |r|² / d. Run
  at two noise levels of the targets (0.3 and 0.1).

Optimizers: ``kwng_jax.kwng()`` with its defaults, the same with damping
'reference', ``kwng_jax.published_kwng`` (lr 0.1), SGD (lr 0.1) and Adam
(lr 0.01). Writes ``convex.json`` and ``convex.png`` (the gap to the optimum
along the steps) under ``--out``.

  python benchmarks/convex.py
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kwng_jax

import common

DEFAULT_OUT = pathlib.Path(__file__).parent / 'results' / 'convex'


def optimizers() -> dict[str, optax.GradientTransformationExtraArgs]:
  return {
      'KWNG (defaults)': kwng_jax.kwng(),
      "KWNG, damping 'reference'": kwng_jax.kwng(damping='reference'),
      'KWNG (published, lr 0.1)': kwng_jax.published_kwng(0.1),
      'SGD (lr 0.1)': optax.with_extra_args_support(optax.sgd(0.1)),
      'Adam (lr 0.01)': optax.with_extra_args_support(optax.adam(0.01)),
  }


def problem(name: str, noise: float, seed: int = 0):
  """(params, outputs_fn, loss_fn, optimum) of a problem."""
  num_outputs = 1 if name == 'least_squares' else 2
  k_x, k_w, k_noise = jax.random.split(jax.random.key(seed), 3)
  features = jax.random.normal(k_x, (64, 5))
  targets = (features @ jax.random.normal(k_w, (5, num_outputs)) + 0.5
             + noise * jax.random.normal(k_noise, (64, num_outputs)))
  design = jnp.concatenate([features, jnp.ones((64, 1))], axis=1)
  residual = design @ jnp.linalg.lstsq(design, targets)[0] - targets
  mean_squared = float(jnp.mean(jnp.sum(jnp.square(residual), axis=1)))
  params = {'w': jnp.zeros((5, num_outputs)), 'b': jnp.zeros(num_outputs)}

  def outputs_fn(p):
    return features @ p['w'] + p['b'][None, :]

  if name == 'least_squares':
    return params, outputs_fn, lambda p: jnp.mean(jnp.square(outputs_fn(p) - targets)), mean_squared

  def loss_fn(p):
    squared = jnp.mean(jnp.sum(jnp.square(targets - outputs_fn(p)), axis=1))
    return squared / (2 * jnp.exp(2 * p['log_sigma'])) + num_outputs * p['log_sigma']

  optimum = num_outputs / 2 * (1.0 + np.log(mean_squared / num_outputs))
  return {**params, 'log_sigma': jnp.zeros(())}, outputs_fn, loss_fn, optimum


def run(opt, params, outputs_fn, loss_fn, num_steps: int) -> np.ndarray:
  def step(carry, _):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params, outputs_fn=outputs_fn, value=loss)
    return (optax.apply_updates(params, updates), state), loss

  (params, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None,
                                                       length=num_steps))(params)
  return np.append(np.asarray(losses), float(loss_fn(params)))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  cases = [('least_squares', 0.1, 2000), ('loss_only_parameter', 0.3, 1000),
           ('loss_only_parameter', 0.1, 1000)]
  results = []
  bar = common.progress(len(cases) * len(optimizers()), 'convex')
  for name, noise, num_steps in cases:
    params, outputs_fn, loss_fn, optimum = problem(name, noise)
    for label, opt in optimizers().items():
      losses = run(opt, params, outputs_fn, loss_fn, num_steps)
      final = float(losses[-1])
      results.append({'problem': name, 'noise': noise, 'steps': num_steps, 'optimizer': label,
                      'optimum': optimum, 'final_loss': final if np.isfinite(final) else None,
                      'gap': final - optimum if np.isfinite(final) else None,
                      'losses': [float(x) if np.isfinite(x) else None for x in losses[::10]]})
      bar.update(1)
  bar.close()
  payload = {'benchmark': 'convex', 'device': common.device_description(),
             'versions': {'jax': jax.__version__, 'optax': optax.__version__,
                          'kwng_jax': kwng_jax.__version__},
             'results': results}
  common.write_json(args.out / 'convex.json', payload, digits=6)
  plot(payload, args.out)
  for r in results:
    gap = 'diverged' if r['gap'] is None else f"{r['gap']:.3g}"
    print(f"{r['problem']:<20} noise {r['noise']:<4} {r['optimizer']:<28} final "
          f"{r['final_loss']!s:<12.10} optimum {r['optimum']:.5g}  gap {gap}")
  return payload


def plot(payload: dict[str, Any], out: pathlib.Path) -> None:
  plt = common.pyplot()
  cases = sorted({(r['problem'], r['noise']) for r in payload['results']})
  fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
  for ax, (name, noise) in zip(axes[0], cases):
    for r in payload['results']:
      if (r['problem'], r['noise']) != (name, noise):
        continue
      losses = np.array([np.nan if x is None else x for x in r['losses']], dtype=float)
      ax.plot(10 * np.arange(len(losses)), np.abs(losses - r['optimum']) + 1e-12,
              label=r['optimizer'])
    ax.set(xlabel='step', ylabel='|loss - optimum|', yscale='log',
           title=f"{name.replace('_', ' ')}, noise {noise}")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  common.save_png(fig, out / 'convex.png', dpi=90)
  plt.close(fig)


if __name__ == '__main__':
  main()
