"""Data that needs no download: scikit-learn's bundled digits, and the
ill-conditioned classification head of the paper.

The published experiments make classification ill-conditioned by multiplying
the logits by a fixed vector spanning several orders of magnitude
(:func:`ill_conditioned_scales`): plain SGD then barely moves the small-scale
logits, while a natural gradient, invariant to that reparametrization, does.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
  """A train/test split of images and integer labels (NumPy arrays)."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def ill_conditioned_scales(
    num_classes: int = 10, low: float = -6.0, high: float = 1.0
) -> np.ndarray:
  """Per-logit scales ``logspace(low, high, num_classes)`` (condition 1e7).

  Example:
    >>> from kwng_jax.examples import datasets
    >>> scales = datasets.ill_conditioned_scales()
    >>> float(scales.max() / scales.min())
    10000000.0...
  """
  return np.logspace(low, high, num_classes).astype(np.float32)


def load_digits(test_fraction: float = 0.25, *, seed: int = 0) -> Split:
  """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes).

  Pixels are scaled to [0, 1]; images have shape ``(8, 8, 1)``. The split is
  stratified and fixed by ``seed``. Needs scikit-learn (``kwng_jax[examples]``).

  Example:
    >>> from kwng_jax.examples import datasets
    >>> split = datasets.load_digits()
    >>> split.train_images.shape[1:], int(split.train_labels.max())
    ((8, 8, 1), 9)
  """
  try:
    from sklearn import datasets as sk_datasets
    from sklearn import model_selection
  except ImportError as error:
    raise ImportError(
        'load_digits needs scikit-learn: pip install "kwng_jax[examples]".'
    ) from error
  digits = sk_datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, labels, test_size=test_fraction, random_state=seed, stratify=labels
  )
  return Split(train_x, train_y, test_x, test_y)
