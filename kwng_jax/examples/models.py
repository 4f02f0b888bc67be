r"""Flax NNX classifiers of the KWNG experiments, with the ill-conditioned head.

Every model ends with an optional fixed per-logit scaling
:math:`\text{logits} \mapsto \text{logits} \odot s` (``logit_scales``). With
:func:`kwng_jax.examples.datasets.ill_conditioned_scales`, ``s`` spans seven orders of
magnitude: the published way to make classification ill-conditioned, which a
natural gradient undoes and plain SGD does not. The scales are stored as a
:class:`LogitScales` variable, not an ``nnx.Param``, so that
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.grad`` never train them.

Needs Flax (``pip install "kwng_jax[flax]"``); ``import kwng_jax`` does not
import this module.

References:
  Arbel, Gretton, Li, Montúfar, *Kernelized Wasserstein Natural Gradient*,
  ICLR 2020 (arXiv 1910.09652); the CIFAR ResNet-18 follows the ``resnet.py``
  of the published code (github.com/MichaelArbel/KWNG).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

Activation = Callable[[jax.Array], jax.Array]


class LogitScales(nnx.Variable):
  """A fixed per-logit scale vector: model state that no optimizer trains."""


def _logit_scales(logit_scales: Any, num_classes: int) -> LogitScales | None:
  if logit_scales is None:
    return None
  scales = np.asarray(logit_scales, np.float32)
  if scales.shape != (num_classes,):
    raise ValueError(
        f'logit_scales must have shape ({num_classes},) (one scale per class); '
        f'got {scales.shape}. Use kwng_jax.examples.datasets.ill_conditioned_scales('
        f'{num_classes}), or None for the well-conditioned head.'
    )
  return LogitScales(jnp.asarray(scales))


def _scale_logits(logits: jax.Array, scales: LogitScales | None) -> jax.Array:
  if scales is None:
    return logits
  return logits * scales[...].astype(logits.dtype)[None, :]


class MLP(nnx.Module):
  r"""A fully connected classifier: flatten, hidden layers, logits, scales.

  .. math::
     h_0 = \mathrm{flatten}(x),\quad h_{l+1} = a(W_l h_l + b_l),\quad
     \text{logits} = (W_L h_L + b_L) \odot s

  Args:
    in_features: the number of input features after flattening (64 for the
      8×8 digits).
    hidden_features: widths of the hidden layers, e.g. ``(64,)``; ``()`` gives
      a linear classifier.
    num_classes: the number of logits.
    logit_scales: fixed per-logit scales ``s`` of shape ``(num_classes,)``,
      e.g. :func:`kwng_jax.examples.datasets.ill_conditioned_scales`; ``None`` for the
      well-conditioned head.
    activation: the hidden nonlinearity (``jax.nn.relu`` or ``jnp.tanh``).
    rngs: the ``nnx.Rngs`` that initialize the weights.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from kwng_jax.examples import datasets, models
    >>> model = models.MLP(64, (32,), 10,
    ...                    logit_scales=datasets.ill_conditioned_scales(),
    ...                    rngs=nnx.Rngs(0))
    >>> model(jnp.ones((5, 8, 8, 1))).shape
    (5, 10)
  """

  def __init__(
      self,
      in_features: int,
      hidden_features: Sequence[int],
      num_classes: int,
      *,
      logit_scales: Any = None,
      activation: Activation = jax.nn.relu,
      rngs: nnx.Rngs,
  ):
    widths = [in_features, *hidden_features]
    self.in_features = in_features
    self.hidden = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
    )
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)
    self.activation = activation
    self.logit_scales = _logit_scales(logit_scales, num_classes)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    features = inputs.reshape(inputs.shape[0], -1)
    if features.shape[1] != self.in_features:
      raise ValueError(
          f'MLP(in_features={self.in_features}) got inputs with '
          f'{features.shape[1]} features per example (shape {inputs.shape}).'
      )
    for layer in self.hidden:
      features = self.activation(layer(features))
    return _scale_logits(self.head(features), self.logit_scales)


def _avg_pool_2x2(features: jax.Array) -> jax.Array:
  # A reshape-mean rather than nnx.avg_pool, which divides by an integer and
  # so fails under strict dtype promotion.
  batch, height, width, channels = features.shape
  blocks = features.reshape(batch, height // 2, 2, width // 2, 2, channels)
  return jnp.mean(blocks, axis=(2, 4))


class CNN(nnx.Module):
  """A small conv net for 8×8×1 digits: two 3×3 convs with pooling, two dense.

  ``conv(16) → relu → avgpool 2 → conv(32) → relu → avgpool 2 → dense(64) →
  relu → dense(num_classes) → × logit_scales``. Works on any NHWC input whose
  height and width are divisible by 4.

  Args:
    num_classes: the number of logits.
    logit_scales: fixed per-logit scales, or ``None`` (see :class:`MLP`).
    in_channels: channels of the input images.
    image_size: height (= width) of the input images.
    rngs: the ``nnx.Rngs`` that initialize the weights.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from kwng_jax.examples import models
    >>> models.CNN(10, rngs=nnx.Rngs(0))(jnp.ones((3, 8, 8, 1))).shape
    (3, 10)
  """

  def __init__(
      self,
      num_classes: int,
      *,
      logit_scales: Any = None,
      in_channels: int = 1,
      image_size: int = 8,
      rngs: nnx.Rngs,
  ):
    if image_size % 4:
      raise ValueError(
          f'image_size={image_size} must be divisible by 4 (two 2×2 poolings).'
      )
    self.conv1 = nnx.Conv(in_channels, 16, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    pooled = image_size // 4
    self.dense = nnx.Linear(32 * pooled * pooled, 64, rngs=rngs)
    self.head = nnx.Linear(64, num_classes, rngs=rngs)
    self.logit_scales = _logit_scales(logit_scales, num_classes)

  def __call__(self, images: jax.Array) -> jax.Array:
    features = _avg_pool_2x2(jax.nn.relu(self.conv1(images)))
    features = _avg_pool_2x2(jax.nn.relu(self.conv2(features)))
    features = jax.nn.relu(self.dense(features.reshape(features.shape[0], -1)))
    return _scale_logits(self.head(features), self.logit_scales)


# PyTorch's default initialization of Conv2d and Linear weights (Kaiming
# uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so that the
# ResNet starts where the published one does.
_torch_kernel_init = nnx.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform'
)


def _torch_bias_init(fan_in: int) -> nnx.Initializer:
  bound = float(1.0 / np.sqrt(fan_in))

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # PyTorch's BatchNorm2d defaults: running average momentum 0.1 (Flax 0.9),
  # epsilon 1e-5.
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


def _conv3x3(in_features: int, out_features: int, stride: int, rngs: nnx.Rngs):
  # Symmetric padding 1, as PyTorch's padding=1: 'SAME' would pad (0, 1) at
  # stride 2 and shift every downsampled feature map by one pixel.
  return nnx.Conv(
      in_features,
      out_features,
      kernel_size=(3, 3),
      strides=(stride, stride),
      padding=((1, 1), (1, 1)),
      use_bias=False,
      kernel_init=_torch_kernel_init,
      rngs=rngs,
  )


class BasicBlock(nnx.Module):
  """The ResNet basic block: two 3×3 conv–BatchNorm layers and a shortcut.

  The shortcut is the identity, or a strided 1×1 conv with BatchNorm when the
  stride or the width changes.
  """

  def __init__(
      self, in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs
  ):
    self.conv1 = _conv3x3(in_features, out_features, stride, rngs)
    self.bn1 = _batch_norm(out_features, rngs)
    self.conv2 = _conv3x3(out_features, out_features, 1, rngs)
    self.bn2 = _batch_norm(out_features, rngs)
    self.shortcut_conv: nnx.Conv | None
    self.shortcut_bn: nnx.BatchNorm | None
    if stride != 1 or in_features != out_features:
      self.shortcut_conv = nnx.Conv(
          in_features,
          out_features,
          kernel_size=(1, 1),
          strides=(stride, stride),
          padding='VALID',
          use_bias=False,
          kernel_init=_torch_kernel_init,
          rngs=rngs,
      )
      self.shortcut_bn = _batch_norm(out_features, rngs)
    else:
      self.shortcut_conv = None
      self.shortcut_bn = None

  def __call__(self, inputs: jax.Array) -> jax.Array:
    features = jax.nn.relu(self.bn1(self.conv1(inputs)))
    features = self.bn2(self.conv2(features))
    if self.shortcut_conv is None or self.shortcut_bn is None:
      shortcut = inputs
    else:
      shortcut = self.shortcut_bn(self.shortcut_conv(inputs))
    return jax.nn.relu(features + shortcut)


class ResNet18(nnx.Module):
  """The CIFAR ResNet-18 of the published KWNG code, with its optional
  ill-conditioned head.

  A 3×3 stem conv (64 channels, stride 1, no max-pool), four stages of two
  :class:`BasicBlock` (64, 128, 256, 512 channels by default; strides 1, 2, 2,
  2), global
  average pooling, a dense layer to the logits, then ``× logit_scales``. As in
  the published ``ResNet18IllCond`` (the ``ResNet`` class its ``resnet.py``
  actually uses), the stem conv is followed by a ReLU without BatchNorm; the
  blocks have BatchNorm. Weights are initialized as PyTorch does by default.
  With the published ``width=64``: 11,173,834
  parameters, as the PyTorch model.

  BatchNorm normalizes with the batch statistics and updates its running
  averages in train mode (``model.train()``, the default after construction),
  and uses the running averages in eval mode (``model.eval()``).

  Args:
    num_classes: the number of logits (10 for CIFAR-10, 100 for CIFAR-100).
    logit_scales: fixed per-logit scales, or ``None`` (see :class:`MLP`).
    in_channels: channels of the input images.
    width: channels of the first stage (published: 64); the stages have
      ``width × (1, 2, 4, 8)``. Smaller widths make fast tests.
    rngs: the ``nnx.Rngs`` that initialize the weights.

  Example:
    Shapes only (``nnx.eval_shape`` allocates nothing):

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from kwng_jax.examples import datasets, models
    >>> model = nnx.eval_shape(lambda: models.ResNet18(
    ...     10, logit_scales=datasets.ill_conditioned_scales(), rngs=nnx.Rngs(0)))
    >>> sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    11173834
    >>> images = jax.ShapeDtypeStruct((128, 32, 32, 3), jnp.float32)
    >>> nnx.eval_shape(lambda m, x: m(x), model, images).shape
    (128, 10)
  """

  def __init__(
      self,
      num_classes: int = 10,
      *,
      logit_scales: Any = None,
      in_channels: int = 3,
      width: int = 64,
      rngs: nnx.Rngs,
  ):
    self.stem = _conv3x3(in_channels, width, 1, rngs)
    blocks = []
    in_features = width
    for multiplier, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
      out_features = width * multiplier
      blocks.append(BasicBlock(in_features, out_features, stride, rngs=rngs))
      blocks.append(BasicBlock(out_features, out_features, 1, rngs=rngs))
      in_features = out_features
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(
        8 * width,
        num_classes,
        kernel_init=_torch_kernel_init,
        bias_init=_torch_bias_init(8 * width),
        rngs=rngs,
    )
    self.logit_scales = _logit_scales(logit_scales, num_classes)
    self.train()

  def __call__(self, images: jax.Array) -> jax.Array:
    features = jax.nn.relu(self.stem(images))
    for block in self.blocks:
      features = block(features)
    features = jnp.mean(features, axis=(1, 2))
    return _scale_logits(self.head(features), self.logit_scales)
