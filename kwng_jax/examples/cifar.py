"""CIFAR-10 / CIFAR-100 from the standard python-pickle batches on disk.

Nothing is downloaded: the files must already be there, as distributed in
``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (extracted):

* CIFAR-10: ``data_batch_1`` … ``data_batch_5`` and ``test_batch``, each a
  pickled dict with ``b'data'`` (uint8, shape (n, 3072), channel-major rows)
  and ``b'labels'``;
* CIFAR-100: ``train`` and ``test``, with ``b'data'`` and ``b'fine_labels'``.

Images are returned NHWC float32, normalized per channel with the means and
standard deviations the published KWNG code uses.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from kwng_jax.examples.datasets import Split

#: Per-channel (mean, std) of the published code's torchvision transforms.
NORMALIZATION = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': (
        (129.3 / 255, 124.1 / 255, 112.4 / 255),
        (68.2 / 255, 65.4 / 255, 70.4 / 255),
    ),
}

_FILES = {
    'cifar10': (
        tuple(f'data_batch_{i}' for i in range(1, 6)),
        ('test_batch',),
        b'labels',
    ),
    'cifar100': (('train',), ('test',), b'fine_labels'),
}

_ARCHIVES = {
    'cifar10': ('cifar-10-python.tar.gz', 'cifar-10-batches-py'),
    'cifar100': ('cifar-100-python.tar.gz', 'cifar-100-python'),
}


def _read_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
  with open(path, 'rb') as file:
    batch = pickle.load(file, encoding='bytes')
  data = np.asarray(batch[b'data'], np.uint8)
  labels = np.asarray(batch[label_key], np.int32)
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
    raise ValueError(
        f'{path} is not a CIFAR python batch: expected data of shape (n, 3072) '
        f'and n labels, got data {data.shape} and {len(labels)} labels.'
    )
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels


def _normalize(images: np.ndarray, dataset: str) -> np.ndarray:
  mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION[dataset])
  return (images.astype(np.float32) / 255.0 - mean) / std


def load_cifar(data_dir: str, dataset: str = 'cifar10') -> Split:
  """Loads CIFAR-10 or CIFAR-100 from the extracted python batches.

  Args:
    data_dir: the folder holding the batch files (``cifar-10-batches-py`` or
      ``cifar-100-python``), or a folder that contains that folder.
    dataset: ``'cifar10'`` or ``'cifar100'`` (fine labels).

  Returns:
    A :class:`kwng_jax.examples.datasets.Split`: images NHWC float32 (n, 32, 32, 3),
    normalized per channel (:data:`NORMALIZATION`), labels int32.

  Raises:
    FileNotFoundError: when a batch file is missing; no download happens,
      and the message says where to put the files.
    ValueError: for an unknown ``dataset`` or a malformed file.

  Example:
    >>> from kwng_jax.examples import cifar
    >>> cifar.load_cifar('/nonexistent')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: CIFAR-10 batch file data_batch_1 not found in /nonexistent...
  """
  if dataset not in _FILES:
    raise ValueError(
        f"dataset={dataset!r} is unknown; use 'cifar10' or 'cifar100'."
    )
  train_files, test_files, label_key = _FILES[dataset]
  archive, folder = _ARCHIVES[dataset]
  if os.path.isdir(os.path.join(data_dir, folder)):
    data_dir = os.path.join(data_dir, folder)
  for name in train_files + test_files:
    if not os.path.isfile(os.path.join(data_dir, name)):
      pretty = 'CIFAR-10' if dataset == 'cifar10' else 'CIFAR-100'
      raise FileNotFoundError(
          f'{pretty} batch file {name} not found in {data_dir}. kwng_jax '
          f'downloads nothing: extract {archive} (from '
          'https://www.cs.toronto.edu/~kriz/cifar.html) so that '
          f'{data_dir}/{folder}/ or {data_dir}/ holds '
          f'{", ".join(train_files + test_files)}, and pass that folder.'
      )

  def read(names):
    parts = [_read_batch(os.path.join(data_dir, n), label_key) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _normalize(images, dataset), labels

  train_images, train_labels = read(train_files)
  test_images, test_labels = read(test_files)
  return Split(train_images, train_labels, test_images, test_labels)
