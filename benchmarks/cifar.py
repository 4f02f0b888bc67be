r"""CIFAR-10/100: ResNet-18 with the ill-conditioned head, SGD against KWNG.

The published experiment of the KWNG paper (Arbel et al., ICLR 2020, §5):
the CIFAR ResNet-18 of :class:`kwng_jax.examples.models.ResNet18` whose logits are
multiplied by ``logspace(-6, 1, num_classes)``, trained with batch 128 by

* ``sgd``: SGD with the gradient clipped to norm 1 (the published baseline
  wrapper clips too), and
* ``kwng``: :func:`kwng_jax.kwng` in the published configuration: M = 5,
  ε₀ = 1e-5 adapted every 5 steps, 'reference' damping, direction clipped to
  norm 1, SGD base,

with the published learning rate of KWNG (10 for CIFAR-10, 1 for CIFAR-100;
SGD's is ``--sgd-learning-rate``, by default the same) divided by 10 at
epochs 50, 100, 200 and 300, no momentum, no weight decay, random crops
(padding 4) and horizontal flips. The published runs last 350 epochs (the
published code evaluates in train mode; here BatchNorm uses its running
averages at test time). KWNG steps use
:func:`kwng_jax.flax_utils.nnx_value_grad_and_outputs_fn`: one forward pass
gives the loss, the gradient and the samples, and BatchNorm statistics move
once per step, as with SGD.

Nothing is downloaded: pass ``--data-dir``, a folder holding the extracted
python batches (see :func:`kwng_jax.examples.cifar.load_cifar`). Not run in CI; on one
GPU an epoch takes tens of seconds. ``--synthetic`` replaces the data by
random CIFAR-shaped arrays: a smoke test of the script, not a measurement.

Run (from the repository root)::

  python benchmarks/cifar.py --data-dir ~/data/cifar-10-batches-py --epochs 350
  python benchmarks/cifar.py --data-dir ~/data/cifar-100-python --dataset cifar100
  python benchmarks/cifar.py --synthetic --epochs 1 --steps-per-epoch 3   # smoke

Writes ``cifar.json`` (per-epoch train loss and accuracy, test loss and
accuracy, epoch times, step times) and ``cifar.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kwng_jax
from kwng_jax.examples import cifar
from kwng_jax.examples import datasets
from kwng_jax import flax_utils
from kwng_jax.examples import models

import common

DEFAULT_OUT = pathlib.Path(__file__).parent / 'results' / 'cifar'
PUBLISHED_LEARNING_RATE = {'cifar10': 10.0, 'cifar100': 1.0}
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}
EVAL_BATCH = 500


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random 32×32 crops of the images zero-padded by 4, and random flips."""
  batch, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  rows = rng.integers(0, 9, batch)
  cols = rng.integers(0, 9, batch)
  crops = np.stack([
      padded[i, r:r + height, c:c + width] for i, (r, c) in enumerate(zip(rows, cols))
  ])
  flip = rng.random(batch) < 0.5
  crops[flip] = crops[flip, :, ::-1]
  return crops


def make_optimizer(name: str, schedule: optax.Schedule, num_basis: int):
  if name == 'sgd':
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(schedule))
  if name == 'kwng':
    return kwng_jax.published_kwng(schedule, num_basis=num_basis)
  raise ValueError(f'Unknown optimizer {name!r}; use sgd or kwng.')


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(name: str, graphdef: nnx.GraphDef):
  """A jitted step of pure state: ``(state, images, labels) -> (state, loss)``.

  ``state`` is ``nnx.split((model, optimizer))[1]``. A ``jax.jit`` of the
  split state rather than ``nnx.jit`` of the objects: nnx.jit walks the
  model's graph in Python at every call, several milliseconds for a
  ResNet-18, which would hide the optimizers' own cost.
  """

  @jax.jit
  def train_step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)
    loss_from_logits = lambda logits: cross_entropy(logits, labels)  # noqa: E731
    if name == 'kwng':
      loss, grads, outputs_fn = flax_utils.nnx_value_grad_and_outputs_fn(
          loss_from_logits, model, images
      )
      optimizer.update(model, grads, outputs_fn=outputs_fn, value=loss)
    else:
      loss, grads = nnx.value_and_grad(lambda m: loss_from_logits(m(images)))(model)
      optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return train_step


@nnx.jit
def eval_batch(model, images, labels):
  logits = model(images)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.int32))
  return cross_entropy(logits, labels) * labels.shape[0], correct


def evaluate(model, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  model.eval()
  total_loss, total_correct = 0.0, 0
  for start in range(0, len(images), EVAL_BATCH):
    loss, correct = eval_batch(
        model, images[start:start + EVAL_BATCH], labels[start:start + EVAL_BATCH]
    )
    total_loss += float(loss)
    total_correct += int(correct)
  model.train()
  return total_loss / len(images), total_correct / len(images)


def load_data(args: argparse.Namespace) -> datasets.Split:
  if args.synthetic:
    rng = np.random.default_rng(args.seed)
    num_classes = NUM_CLASSES[args.dataset]

    def part(n):
      return (rng.standard_normal((n, 32, 32, 3), np.float32),
              rng.integers(0, num_classes, n).astype(np.int32))

    return datasets.Split(*part(4 * args.batch_size), *part(2 * args.batch_size))
  if args.data_dir is None:
    raise ValueError(
        'Pass --data-dir, the folder of the extracted CIFAR python batches '
        '(nothing is downloaded), or --synthetic for a smoke test.'
    )
  return cifar.load_cifar(str(args.data_dir), args.dataset)


def train(name: str, data: datasets.Split, args: argparse.Namespace, bar) -> dict[str, Any]:
  num_classes = NUM_CLASSES[args.dataset]
  scales = None if args.well_conditioned else datasets.ill_conditioned_scales(num_classes)
  model = models.ResNet18(
      num_classes, logit_scales=scales,
      rngs=nnx.Rngs(jax.random.key(args.seed, impl='rbg')),
  )
  num_train = len(data.train_images)
  steps_per_epoch = num_train // args.batch_size
  if args.steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
  schedule = optax.piecewise_constant_schedule(
      args.sgd_learning_rate if name == 'sgd' else args.learning_rate,
      {m * steps_per_epoch: args.lr_decay for m in args.milestones},
  )
  optimizer = nnx.Optimizer(model, make_optimizer(name, schedule, args.num_basis),
                            wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  train_step = make_train_step(name, graphdef)
  rng = np.random.default_rng(args.seed)

  start = time.perf_counter()
  train_step = train_step.lower(
      state,
      data.train_images[:args.batch_size],
      data.train_labels[:args.batch_size],
  ).compile()
  history: dict[str, Any] = {
      'compile_seconds': time.perf_counter() - start,
      'epochs': [],
  }
  step_seconds: list[float] = []
  for epoch in range(args.epochs):
    order = rng.permutation(num_train)
    epoch_start = time.perf_counter()
    losses = []
    for step in range(steps_per_epoch):
      batch = order[step * args.batch_size:(step + 1) * args.batch_size]
      images = data.train_images[batch]
      if not args.no_augment:
        images = augment(images, rng)
      labels = data.train_labels[batch]
      step_start = time.perf_counter()
      state, loss = jax.block_until_ready(train_step(state, images, labels))
      step_seconds.append(time.perf_counter() - step_start)
      losses.append(float(loss))
      bar.update(1)
    train_seconds = time.perf_counter() - epoch_start
    nnx.update((model, optimizer), state)
    test_loss, test_accuracy = evaluate(model, data.test_images, data.test_labels)
    record = {
        'epoch': epoch + 1,
        'train_loss': statistics.fmean(losses),
        'test_loss': test_loss,
        'test_accuracy': test_accuracy,
        'train_seconds': train_seconds,
        'learning_rate': float(schedule(int(optimizer.step[...]))),
    }
    if name == 'kwng':
      record['kwng_epsilon'] = float(optax.tree_utils.tree_get(
          nnx.as_pure(optimizer.opt_state), 'kwng_epsilon'
      ))
    if epoch % args.train_eval_every == 0 or epoch == args.epochs - 1:
      record['train_accuracy'] = evaluate(
          model, data.train_images[:10000], data.train_labels[:10000]
      )[1]
    history['epochs'].append(record)
    bar.set_postfix_str(f'{name} epoch {epoch + 1}: test acc {test_accuracy:.3f}')
  history['median_step_seconds'] = statistics.median(step_seconds)
  history['step_seconds'] = common.spread(step_seconds)
  history['final_test_accuracy'] = history['epochs'][-1]['test_accuracy']
  return history


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, history in results['runs'].items():
    epochs = [r['epoch'] for r in history['epochs']]
    axes[0].plot(epochs, [r['train_loss'] for r in history['epochs']], label=name)
    axes[1].plot(epochs, [r['test_accuracy'] for r in history['epochs']], label=name)
  axes[0].set_yscale('log')
  axes[0].set_title('train loss (epoch mean)')
  axes[1].set_title('test accuracy')
  for ax in axes:
    ax.set_xlabel('epoch')
    ax.legend()
  config = results['config']
  head = 'well-conditioned' if config['well_conditioned'] else 'ill-conditioned'
  fig.suptitle(
      f"{config['dataset']} ResNet-18, {head} head, batch {config['batch_size']}"
      + (' (synthetic data: smoke test)' if config['synthetic'] else '')
  )
  fig.tight_layout()
  common.save_png(fig, path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data-dir', type=pathlib.Path, default=None,
                      help='folder of the extracted CIFAR python batches')
  parser.add_argument('--dataset', choices=sorted(NUM_CLASSES), default='cifar10')
  parser.add_argument('--synthetic', action='store_true',
                      help='random CIFAR-shaped data: a smoke test, no data needed')
  parser.add_argument('--optimizers', default='sgd,kwng')
  parser.add_argument('--epochs', type=int, default=350)
  parser.add_argument('--steps-per-epoch', type=int, default=0,
                      help='cap the steps of an epoch (0: the whole training set)')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--learning-rate', type=float, default=None,
                      help='default: the published 10 (CIFAR-10) or 1 (CIFAR-100)')
  parser.add_argument('--sgd-learning-rate', type=float, default=None,
                      help='the SGD baseline\'s (default: --learning-rate; the '
                      'published config files give only the KWNG one)')
  parser.add_argument('--milestones', default='50,100,200,300',
                      help='epochs where the learning rate is multiplied by --lr-decay')
  parser.add_argument('--lr-decay', type=float, default=0.1)
  parser.add_argument('--num-basis', type=int, default=5)
  parser.add_argument('--well-conditioned', action='store_true',
                      help='no logit scaling (the published well-conditioned run)')
  parser.add_argument('--no-augment', action='store_true')
  parser.add_argument('--train-eval-every', type=int, default=10,
                      help='measure train accuracy (10k images) every this many epochs')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  if args.learning_rate is None:
    args.learning_rate = PUBLISHED_LEARNING_RATE[args.dataset]
  if args.sgd_learning_rate is None:
    args.sgd_learning_rate = args.learning_rate
  args.milestones = [int(m) for m in args.milestones.split(',') if m.strip()]
  names = [n.strip() for n in args.optimizers.split(',') if n.strip()]
  for name in names:
    if name not in ('sgd', 'kwng'):
      raise ValueError(f'--optimizers: unknown {name!r}; use sgd and/or kwng.')

  data = load_data(args)
  steps = len(data.train_images) // args.batch_size
  if args.steps_per_epoch:
    steps = min(steps, args.steps_per_epoch)
  results: dict[str, Any] = {
      'device': common.device_description(),
      'config': {k: (str(v) if isinstance(v, pathlib.Path) else v)
                 for k, v in vars(args).items() if k != 'out'},
      'runs': {},
  }
  bar = common.progress(len(names) * args.epochs * steps, 'cifar')
  for name in names:
    results['runs'][name] = train(name, data, args, bar)
    common.write_json(args.out / 'cifar.json', results)
  bar.close()
  plot(results, args.out / 'cifar.png')
  for name, history in results['runs'].items():
    print(f"{name}: final test accuracy {history['final_test_accuracy']:.4f}, "
          f"median step {1e3 * history['median_step_seconds']:.1f} ms, "
          f"compile {history['compile_seconds']:.1f} s")
  print(f'wrote {args.out}/cifar.json and .png')
  return results


if __name__ == '__main__':
  main()
