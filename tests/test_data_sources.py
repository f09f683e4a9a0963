"""data_sources.py: each source loads what it should, and bad data gives a one-line error."""

import gzip
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import common
from meta_pseudo_labels.data import data_sources
from meta_pseudo_labels.errors import ConfigError, DataError


def _dataset_config(**overrides):
  config = common.get_base_config().dataset
  config.update(overrides)
  return config


def _load(**overrides):
  return data_sources.load_in_memory(_dataset_config(**overrides), stored_size=16)


def _assert_one_line(error_info, *fragments):
  message = str(error_info.value)
  assert '\n' not in message
  for fragment in fragments:
    assert fragment in message, (fragment, message)


def write_image_folder(root, splits=('train', 'test'), classes=('cat', 'ant', 'bee'), per_class=3, size=16):
  """<root>/<split>/<class>/<i>.png with the class index in the red channel and the example in green."""
  for split in splits:
    for label, name in enumerate(sorted(classes)):
      os.makedirs(os.path.join(root, split, name))
      for i in range(per_class):
        pixels = np.zeros((size, size, 3), np.uint8)
        pixels[..., 0], pixels[..., 1] = 10 * label, i
        extension = '.png' if i % 2 else '.JPG'
        Image.fromarray(pixels).save(os.path.join(root, split, name, f'{i}{extension}'),
                                     format='PNG' if i % 2 else 'JPEG', quality=100)


def test_two_moons_has_1000_points_per_moon_and_is_seeded():
  x, y = data_sources.make_two_moons(num_points=2000, noise=0.1, seed=3)
  assert x.shape == (2000, 2) and x.dtype == np.float32 and y.dtype == np.int32
  assert np.bincount(y).tolist() == [1000, 1000]
  np.testing.assert_array_equal(x, data_sources.make_two_moons(2000, 0.1, seed=3)[0])
  assert not np.array_equal(x, data_sources.make_two_moons(2000, 0.1, seed=4)[0])
  clean, labels = data_sources.make_two_moons(200, noise=0.0, seed=0)
  upper = clean[labels == 0]
  np.testing.assert_allclose(np.hypot(*upper.T), 1.0, atol=1e-6)  # moon 0 lies on the unit circle
  assert (upper[:, 1] >= -1e-6).all() and (clean[labels == 1][:, 1] <= 0.5 + 1e-6).all()


def test_two_moons_source():
  data = _load(source='two_moons', num_classes=2)
  assert data.train.images.shape == (2000, 2) and len(data.test) == 2000
  assert not np.array_equal(data.train.images, data.test.images)


def test_folder_source_sorted_classes_and_resizing(tmp_path):
  write_image_folder(str(tmp_path), size=20)
  data = _load(source='folder', data_dir=str(tmp_path), num_classes=3)
  assert data.train.images.shape == (9, 16, 16, 3) and data.train.images.dtype == np.uint8
  assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # ant, bee, cat
  red = data.train.images[:, 8, 8, 0].astype(int)
  np.testing.assert_allclose(red, 10 * data.train.labels, atol=3)  # JPEG is near-lossless at quality 100


def test_folder_errors_name_the_path(tmp_path):
  with pytest.raises(DataError) as info:
    _load(source='folder', data_dir=str(tmp_path / 'missing'))
  _assert_one_line(info, str(tmp_path / 'missing' / 'train'))
  os.makedirs(tmp_path / 'empty' / 'train')
  with pytest.raises(DataError) as info:
    _load(source='folder', data_dir=str(tmp_path / 'empty'))
  _assert_one_line(info, str(tmp_path / 'empty' / 'train'), 'no class sub-folders')
  os.makedirs(tmp_path / 'no_images' / 'train' / 'a')
  (tmp_path / 'no_images' / 'train' / 'a' / 'notes.txt').write_text('x')
  with pytest.raises(DataError) as info:
    _load(source='folder', data_dir=str(tmp_path / 'no_images'))
  _assert_one_line(info, str(tmp_path / 'no_images' / 'train'), 'no images')
  write_image_folder(str(tmp_path / 'broken'))
  bad = tmp_path / 'broken' / 'train' / 'bee' / 'zz.png'
  bad.write_bytes(b'not a png')
  with pytest.raises(DataError) as info:
    _load(source='folder', data_dir=str(tmp_path / 'broken'), num_classes=3)
  _assert_one_line(info, str(bad), 'unreadable')


def test_npz_images_and_vectors(tmp_path):
  path = str(tmp_path / 'images.npz')
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (12, 16, 16, 1)).astype(np.uint8), y_train=np.arange(12) % 3,
           x_test=rng.integers(0, 256, (6, 8, 8, 3)).astype(np.uint8), y_test=np.arange(6) % 3)
  data = _load(source='npz', data_dir=path, num_classes=3)
  assert data.train.images.shape == (12, 16, 16, 3)  # grey repeated to RGB
  assert data.test.images.shape == (6, 16, 16, 3)    # resized to the stored size
  assert data.train.labels.dtype == np.int32
  vectors = str(tmp_path / 'vectors.npz')
  np.savez(vectors, x_train=rng.normal(size=(10, 5)), y_train=np.arange(10) % 2, x_test=rng.normal(size=(4, 5)),
           y_test=np.arange(4) % 2)
  data = _load(source='npz', data_dir=vectors, num_classes=2)
  assert data.train.images.shape == (10, 5) and data.train.images.dtype == np.float32


def test_npz_errors_name_the_path(tmp_path):
  with pytest.raises(DataError) as info:
    _load(source='npz', data_dir=str(tmp_path / 'none.npz'))
  _assert_one_line(info, str(tmp_path / 'none.npz'))
  path = str(tmp_path / 'bad_keys.npz')
  np.savez(path, images=np.zeros((2, 2)), labels=np.zeros(2))
  with pytest.raises(DataError) as info:
    _load(source='npz', data_dir=path)
  _assert_one_line(info, path, 'x_train')
  path = str(tmp_path / 'bad_dtype.npz')
  np.savez(path, x_train=np.zeros((2, 4, 4, 3), np.float32), y_train=np.zeros(2, int),
           x_test=np.zeros((2, 4, 4, 3), np.float32), y_test=np.zeros(2, int))
  with pytest.raises(DataError) as info:
    _load(source='npz', data_dir=path)
  _assert_one_line(info, path, 'uint8')
  path = str(tmp_path / 'garbage.npz')
  with open(path, 'wb') as f:
    f.write(b'garbage')
  with pytest.raises(DataError) as info:
    _load(source='npz', data_dir=path)
  _assert_one_line(info, path)


def test_labels_out_of_range_name_num_classes():
  with pytest.raises(ConfigError) as info:
    _load(source='two_moons', num_classes=1)
  _assert_one_line(info, 'dataset.num_classes=1', 'dataset.num_classes=2')


def test_missing_tfds_data_says_how_to_prepare_it(tmp_path):
  with pytest.raises(DataError) as info:
    _load(source='tfds', name='cifar10', data_dir=str(tmp_path))
  _assert_one_line(info, 'tfds build cifar10', f'--data_dir={tmp_path}', str(tmp_path))
  builder = data_sources.tfds_builder('imagenet2012', str(tmp_path))
  with pytest.raises(DataError) as info:
    data_sources.tfds_labels(builder, 'train', str(tmp_path))
  _assert_one_line(info, 'tfds build imagenet2012', 'manual_dir', 'ILSVRC2012_img_train.tar')


def test_unknown_tfds_name_and_source():
  with pytest.raises(ConfigError) as info:
    _load(source='tfds', name='no_such_dataset_xyz')
  _assert_one_line(info, 'dataset.name', 'no_such_dataset_xyz')
  with pytest.raises(ConfigError) as info:
    _load(source='csv')
  _assert_one_line(info, 'dataset.source', 'csv')
  with pytest.raises(ConfigError) as info:
    data_sources.parse_unlabeled_source(':train')
  _assert_one_line(info, 'dataset.unlabeled_source')


def test_tfds_mock_cifar10_and_extra_unlabeled_pool():
  config = _dataset_config(source='tfds', name='cifar10', unlabeled_source='svhn_cropped:extra')
  pools = {'labeled': np.arange(4), 'validation': np.arange(4, 6), 'unlabeled': np.arange(6, 12)}
  with tfds.testing.mock_data(num_examples=12):
    data = data_sources.load_in_memory(config, stored_size=16)
    examples = data_sources.open_examples(config, 16, lambda labels: dict(pools))
  assert data.train.images.shape == (12, 16, 16, 3) and len(data.test) == 12
  assert examples.size('unlabeled') == 6 + 12   # the extra pool joins the unlabeled one
  assert examples.train_images.shape == (12, 16, 16, 3)   # channel statistics: the training split's own images
  images, labels, ids = next(examples.train_batches('unlabeled', start_step=0, rows_per_step=18, rows=(0, 18), key=0))
  assert images.shape == (18, 16, 16, 3) and sorted(labels.tolist()).count(-1) == 12
  assert sorted(ids.tolist()) == list(range(6, 24))   # the extra pool's ids follow the training split's
  assert data_sources.parse_unlabeled_source('jft') == ('jft', 'train')


def test_digits_source_is_scikit_learns_digits_with_a_fixed_test_split():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  data = data_sources.load_in_memory(_dataset_config(source='digits', num_classes=10), stored_size=8)
  assert data.train.images.shape == (1297, 8, 8, 3) and data.test.images.shape == (500, 8, 8, 3)
  assert data.train.images.dtype == np.uint8
  np.testing.assert_array_equal(np.concatenate([data.train.labels, data.test.labels]), digits.target)
  # Grey level g of 0..16 becomes round(255 g / 16), the same in the three channels; the test split is the last 500.
  np.testing.assert_array_equal(data.test.images[-1, ..., 1], np.round(digits.images[-1] * 255 / 16))
  assert np.array_equal(data.train.images[..., 0], data.train.images[..., 2])
  assert np.bincount(data.test.labels).tolist() == [50, 51, 49, 51, 51, 51, 51, 50, 46, 50]
  assert data_sources.load_in_memory(_dataset_config(source='digits', num_classes=10),
                                     stored_size=16).train.images.shape == (1297, 16, 16, 3)


# ---- MNIST-format idx files ----------------------------------------------------------------------------------

def write_idx(path, array):
  """An idx file of uint8 `array` (magic 0x0000080<ndim>, big-endian sizes), gzipped when the name ends in .gz."""
  header = (0x800 + array.ndim).to_bytes(4, 'big') + b''.join(n.to_bytes(4, 'big') for n in array.shape)
  with (gzip.open if str(path).endswith('.gz') else open)(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_idx_directory(root, *, num_train=12, num_test=5, gz=True, size=28):
  """The four files of an MNIST-format release; image i of a split has grey level i + 10 * label everywhere."""
  os.makedirs(root, exist_ok=True)
  for split, count in (('train', num_train), ('t10k', num_test)):
    labels = np.arange(count) % 10
    images = np.broadcast_to((np.arange(count) + 10 * labels)[:, None, None], (count, size, size))
    suffix = '.gz' if gz else ''
    write_idx(os.path.join(root, f'{split}-images-idx3-ubyte{suffix}'), images)
    write_idx(os.path.join(root, f'{split}-labels-idx1-ubyte{suffix}'), labels)


@pytest.mark.parametrize('gz', [True, False])
def test_idx_source_reads_the_four_files_gzipped_or_not(tmp_path, gz):
  write_idx_directory(str(tmp_path), gz=gz)
  train, test = data_sources.idx_splits(str(tmp_path))
  assert train[0].shape == (12, 28, 28, 1) and train[0].dtype == np.uint8 and test[0].shape == (5, 28, 28, 1)
  assert train[1].dtype == np.int32 and train[1].tolist() == [i % 10 for i in range(12)]
  np.testing.assert_array_equal(train[0][:, 3, 5, 0], np.arange(12) + 10 * train[1])
  data = _load(source='idx', data_dir=str(tmp_path))   # grey to RGB, resized to the stored size (16)
  assert data.train.images.shape == (12, 16, 16, 3) and len(data.test) == 5
  np.testing.assert_array_equal(data.test.images[:, 8, 8, 0], np.arange(5) + 10 * data.test.labels)


def test_idx_errors_are_one_line(tmp_path):
  with pytest.raises(DataError) as info:
    _load(source='idx', data_dir=str(tmp_path / 'missing'))
  _assert_one_line(info, 'missing', 'apt-get install dataset-fashion-mnist', '--config.dataset.source=tfds',
                   '--config.dataset.name=fashion_mnist')
  root = str(tmp_path / 'release')
  write_idx_directory(root, gz=False)
  labels = os.path.join(root, 't10k-labels-idx1-ubyte')
  with open(labels, 'rb') as f:
    good = f.read()
  with open(labels, 'wb') as f:
    f.write(good[:-2])
  with pytest.raises(DataError) as info:
    _load(source='idx', data_dir=root)
  _assert_one_line(info, labels, 'truncated')
  with open(labels, 'wb') as f:   # an image file where the labels belong
    f.write((0x803).to_bytes(4, 'big') + good[4:])
  with pytest.raises(DataError) as info:
    _load(source='idx', data_dir=root)
  _assert_one_line(info, labels, 'magic number 0x00000803, expected 0x00000801')
  write_idx(labels, np.arange(4))   # 4 labels for 5 images
  with pytest.raises(DataError) as info:
    _load(source='idx', data_dir=root)
  _assert_one_line(info, 't10k-images-idx3-ubyte holds 5 images but t10k-labels-idx1-ubyte 4 labels')
  os.remove(labels)
  with pytest.raises(DataError) as info:
    _load(source='idx', data_dir=root)
  _assert_one_line(info, 'no t10k-labels-idx1-ubyte[.gz]')
  gz_path = str(tmp_path / 'cut.gz')
  write_idx(gz_path, np.arange(1000))
  with open(gz_path, 'rb') as f:
    cut = f.read()[:-30]
  with open(gz_path, 'wb') as f:
    f.write(cut)
  with pytest.raises(DataError) as info:
    data_sources.read_idx(gz_path, num_dims=1)
  _assert_one_line(info, gz_path, 'unreadable idx file')


@pytest.mark.skipif(not os.path.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='apt package dataset-fashion-mnist not installed')
def test_idx_source_reads_the_installed_fashion_mnist():
  train, test = data_sources.idx_splits('/usr/share/datasets/fashion-mnist')
  assert train[0].shape == (60000, 28, 28, 1) and test[0].shape == (10000, 28, 28, 1)
  assert np.bincount(train[1]).tolist() == [6000] * 10 and np.bincount(test[1]).tolist() == [1000] * 10
