"""Tests of the Flax NNX classifiers and their ill-conditioned head."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip('flax.nnx')

from kwng_jax.examples import datasets  # noqa: E402
from kwng_jax.examples import models  # noqa: E402

SCALES = datasets.ill_conditioned_scales()


def _rngs(seed=0):
  # The 'rbg' PRNG is one XLA op: initializing a model eagerly then compiles
  # a few small programs instead of one threefry program per weight shape,
  # which dominated these tests' time on CPU.
  return nnx.Rngs(jax.random.key(seed, impl='rbg'))


def _images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_mlp_head_multiplies_logits_by_fixed_scales():
  scaled = models.MLP(64, (16,), 10, logit_scales=SCALES, rngs=_rngs())
  plain = models.MLP(64, (16,), 10, rngs=_rngs())
  images = _images((5, 8, 8, 1))
  logits = scaled(images)
  assert logits.shape == (5, 10)
  np.testing.assert_allclose(
      logits, plain(images) * SCALES[None, :], rtol=1e-6, atol=1e-12
  )
  # The ten logits then span the seven orders of magnitude of the scales.
  spread = jnp.max(jnp.abs(logits), axis=0)
  assert float(spread[-1] / spread[0]) > 1e5


def test_logit_scales_are_not_trained():
  model = models.MLP(64, (), 10, logit_scales=SCALES, rngs=_rngs())
  assert isinstance(model.logit_scales, models.LogitScales)
  assert 'logit_scales' not in nnx.state(model, nnx.Param)
  optimizer = nnx.Optimizer(model, optax.sgd(10.0), wrt=nnx.Param)
  images, labels = _images((8, 8, 8, 1)), jnp.arange(8) % 10

  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(
        model(images), labels
    ).mean()

  kernel_before = model.head.kernel[...]
  optimizer.update(model, nnx.grad(loss_fn)(model))
  np.testing.assert_array_equal(model.logit_scales[...], SCALES)
  assert not np.allclose(model.head.kernel[...], kernel_before)


def test_tanh_mlp_and_linear_classifier():
  tanh = models.MLP(4, (3, 3), 2, activation=jnp.tanh, rngs=_rngs())
  linear = models.MLP(4, (), 2, rngs=_rngs())
  inputs = _images((6, 4))
  assert tanh(inputs).shape == (6, 2)
  np.testing.assert_allclose(
      linear(inputs),
      inputs @ linear.head.kernel[...] + linear.head.bias[...][None, :],
      rtol=1e-6,
  )


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='logit_scales must have shape'):
    models.MLP(64, (), 10, logit_scales=np.ones(3), rngs=_rngs())
  with pytest.raises(ValueError, match='in_features=64'):
    models.MLP(64, (), 10, rngs=_rngs())(jnp.ones((2, 7)))
  with pytest.raises(ValueError, match='divisible by 4'):
    models.CNN(10, image_size=6, rngs=_rngs())


def test_cnn_shapes_and_head():
  scaled = models.CNN(10, logit_scales=SCALES, rngs=_rngs())
  plain = models.CNN(10, rngs=_rngs())
  images = _images((3, 8, 8, 1))
  assert scaled(images).shape == (3, 10)
  np.testing.assert_allclose(
      scaled(images), plain(images) * SCALES[None, :], rtol=1e-6, atol=1e-12
  )


@pytest.fixture(scope='module')
def small_resnet():
  return models.ResNet18(10, logit_scales=SCALES, width=4, rngs=_rngs())


def test_resnet18_structure():
  model = nnx.eval_shape(lambda: models.ResNet18(100, rngs=_rngs()))
  modules = [m for _, m in nnx.iter_graph(model)]
  convs = [m for m in modules if isinstance(m, nnx.Conv)]
  norms = [m for m in modules if isinstance(m, nnx.BatchNorm)]
  # Stem + 8 blocks × 2 + 3 projection shortcuts; BatchNorm after every conv
  # but the stem (as in the published ResNet18IllCond).
  assert len(convs) == 20 and len(norms) == 19
  shortcuts = sorted(c.kernel.shape for c in convs if c.kernel.shape[0] == 1)
  assert shortcuts == [(1, 1, 64, 128), (1, 1, 128, 256), (1, 1, 256, 512)]
  assert model.head.kernel.shape == (512, 100)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  assert nnx.eval_shape(lambda m, x: m(x), model, images).shape == (2, 100)


def test_resnet18_batchnorm_train_and_eval(small_resnet):
  model = nnx.clone(small_resnet)
  images = _images((4, 8, 8, 3))
  stats = lambda: nnx.state(model, nnx.BatchStat)  # noqa: E731

  # Train mode (the default): batch statistics, running averages updated.
  before = [np.array(x) for x in jax.tree.leaves(stats())]
  logits = model(images)
  assert logits.shape == (4, 10)
  for a, b in zip(before, jax.tree.leaves(stats())):
    assert not np.allclose(a, b)
  # The first example's logits depend on the rest of the batch.
  other_batch = images.at[1:].set(_images((3, 8, 8, 3), seed=1))
  assert not np.allclose(model(other_batch)[0], logits[0])

  # Eval mode: running averages, left unchanged, examples independent.
  model.eval()
  frozen = [np.array(x) for x in jax.tree.leaves(stats())]
  batch_logits = model(images)
  np.testing.assert_allclose(
      model(images[:1])[0], batch_logits[0], rtol=1e-5, atol=1e-9
  )
  for a, b in zip(frozen, jax.tree.leaves(stats())):
    np.testing.assert_array_equal(a, b)

  model.train()
  assert not np.allclose(model(images), batch_logits)


def test_resnet18_head_scales_logits(small_resnet):
  model = nnx.clone(small_resnet)
  model.eval()
  images = _images((2, 8, 8, 3))
  model.logit_scales = None
  plain = model(images)
  model.logit_scales = models.LogitScales(jnp.asarray(SCALES))
  np.testing.assert_allclose(
      model(images), plain * SCALES[None, :], rtol=1e-6, atol=1e-12
  )
