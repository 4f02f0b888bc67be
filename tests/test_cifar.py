"""Tests of the CIFAR loader on tiny files in the official pickle format."""

import os
import pickle

import numpy as np
import pytest

from kwng_jax.examples import cifar


def _write_batch(path, data, labels, label_key=b'labels', extra=None):
  batch = {b'batch_label': b'testing', b'data': data, label_key: list(labels)}
  batch.update(extra or {})
  with open(path, 'wb') as file:
    pickle.dump(batch, file)


def _random_data(rng, n):
  return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _expected_image(row, dataset):
  # The official layout: 1024 red, then 1024 green, then 1024 blue values,
  # each a 32×32 image in row-major order.
  mean, std = (np.asarray(v, np.float32) for v in cifar.NORMALIZATION[dataset])
  image = np.stack([row[c * 1024:(c + 1) * 1024].reshape(32, 32) for c in range(3)], -1)
  return (image.astype(np.float32) / 255.0 - mean) / std


@pytest.fixture
def cifar10_dir(tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  rows, labels = [], []
  for i in range(1, 6):
    data, batch_labels = _random_data(rng, 2), [i, (i + 3) % 10]
    _write_batch(folder / f'data_batch_{i}', data, batch_labels)
    rows.append(data)
    labels += batch_labels
  test_data = _random_data(rng, 3)
  _write_batch(folder / 'test_batch', test_data, [7, 8, 9])
  return tmp_path, np.concatenate(rows), np.array(labels), test_data


def test_cifar10_layout_labels_and_normalization(cifar10_dir):
  root, train_rows, train_labels, test_rows = cifar10_dir
  split = cifar.load_cifar(str(root / 'cifar-10-batches-py'))
  assert split.train_images.shape == (10, 32, 32, 3)
  assert split.train_images.dtype == np.float32
  assert split.test_images.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(split.train_labels, train_labels)
  np.testing.assert_array_equal(split.test_labels, [7, 8, 9])
  assert split.train_labels.dtype == np.int32
  for i in (0, 9):
    np.testing.assert_allclose(
        split.train_images[i], _expected_image(train_rows[i], 'cifar10'), rtol=1e-6
    )
  np.testing.assert_allclose(
      split.test_images[2], _expected_image(test_rows[2], 'cifar10'), rtol=1e-6
  )


def test_parent_folder_is_accepted(cifar10_dir):
  root, _, train_labels, _ = cifar10_dir
  split = cifar.load_cifar(str(root))
  np.testing.assert_array_equal(split.train_labels, train_labels)


def test_cifar100_uses_fine_labels(tmp_path):
  rng = np.random.default_rng(1)
  train, test = _random_data(rng, 4), _random_data(rng, 2)
  _write_batch(tmp_path / 'train', train, [10, 55, 99, 0], b'fine_labels',
               {b'coarse_labels': [1, 2, 3, 4]})
  _write_batch(tmp_path / 'test', test, [42, 17], b'fine_labels',
               {b'coarse_labels': [5, 6]})
  split = cifar.load_cifar(str(tmp_path), 'cifar100')
  np.testing.assert_array_equal(split.train_labels, [10, 55, 99, 0])
  np.testing.assert_array_equal(split.test_labels, [42, 17])
  np.testing.assert_allclose(
      split.train_images[1], _expected_image(train[1], 'cifar100'), rtol=1e-6
  )


def test_missing_files_say_nothing_is_downloaded(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    cifar.load_cifar(str(tmp_path / 'nowhere'))
  message = str(error.value)
  assert 'downloads nothing' in message
  assert 'cifar-10-python.tar.gz' in message and 'data_batch_1' in message
  assert str(tmp_path / 'nowhere') in message
  with pytest.raises(FileNotFoundError, match='cifar-100-python.tar.gz'):
    cifar.load_cifar(str(tmp_path), 'cifar100')


def test_bad_input_raises_value_error(cifar10_dir, tmp_path):
  with pytest.raises(ValueError, match="dataset='svhn'"):
    cifar.load_cifar(str(tmp_path), 'svhn')
  root, *_ = cifar10_dir
  folder = root / 'cifar-10-batches-py'
  _write_batch(folder / 'test_batch', np.zeros((2, 100), np.uint8), [0, 1])
  with pytest.raises(ValueError, match='not a CIFAR python batch'):
    cifar.load_cifar(str(folder))
  assert os.path.isfile(folder / 'data_batch_1')
