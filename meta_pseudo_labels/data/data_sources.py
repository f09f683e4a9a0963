"""Where examples come from: TFDS, an image folder, a .npz file, MNIST-format idx files, scikit-learn's digits or the
TwoMoon generator.

Every source yields (image, label) pairs; `input_pipeline` does the splitting, batching and augmentation, so custom
data goes through exactly the same pipeline as the paper's data sets, chosen by `config.dataset.source` alone.

In-memory sources return `Arrays`: uint8 NHWC images (RGB, resized to one stored size) or float32 [N, D] vectors.
The TFDS streaming mode returns `tf.data` record streams whose images are still encoded (decoded per example, after
each host has kept only its share).
"""

import dataclasses
import gzip
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from meta_pseudo_labels.data import augment
from meta_pseudo_labels.data import synthetic
from meta_pseudo_labels.data.dataset_choices import SOURCES
from meta_pseudo_labels.errors import ConfigError, DataError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')
TWO_MOONS_POINTS = 2000  # paper, Sec. 3.1: 1000 per moon
TWO_MOONS_NOISE = 0.1    # ours: the paper shows the moons but does not state the noise
_LOAD_BATCH = 1024
# scikit-learn's bundled digits (the UCI optdigits test set: 1797 8x8 images, 17 grey levels 0..16). Fixed split:
# the last DIGITS_TEST_SIZE images in the stored order are the test split (46..51 of every class), the first 1297
# the training split, out of which the pipeline draws the labeled, validation and unlabeled pools.
DIGITS_TEST_SIZE = 500
DIGITS_MAX_LEVEL = 16


@dataclasses.dataclass(frozen=True)
class Arrays:
  """One split in memory: `images` uint8 [N, H, W, 3] or float32 [N, D]; `labels` int32 [N] (-1: unlabeled)."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self):
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class InMemoryData:
  train: Arrays
  test: Arrays
  extra_unlabeled: Arrays | None  # config.dataset.unlabeled_source, labels all -1


def load_in_memory(dataset_config, stored_size):
  """Loads train, test and the optional extra unlabeled pool; images are resized to stored_size x stored_size."""
  source = dataset_config.source
  if source == 'tfds':
    builder = tfds_builder(dataset_config.name, dataset_config.data_dir)
    train = _tfds_arrays(builder, dataset_config.train_split, dataset_config.data_dir, stored_size)
    test = _tfds_arrays(builder, dataset_config.test_split, dataset_config.data_dir, stored_size)
  elif source == 'folder':
    class_names = folder_class_names(dataset_config.data_dir, dataset_config.train_split)
    train = _folder_arrays(dataset_config.data_dir, dataset_config.train_split, class_names, stored_size)
    test = _folder_arrays(dataset_config.data_dir, dataset_config.test_split, class_names, stored_size)
  elif source == 'npz':
    train, test = _npz_arrays(dataset_config.data_dir, stored_size)
  elif source == 'idx':
    train, test = (Arrays(_fit_images(np.repeat(images, 3, axis=-1), stored_size), labels)
                   for images, labels in idx_splits(dataset_config.data_dir))
  elif source == 'digits':
    train, test = _digits_arrays(stored_size)
  elif source == 'two_moons':
    train = Arrays(*synthetic.make_two_moons(TWO_MOONS_POINTS, TWO_MOONS_NOISE, seed=dataset_config.split_seed))
    test = Arrays(*synthetic.make_two_moons(TWO_MOONS_POINTS, TWO_MOONS_NOISE, seed=dataset_config.split_seed + 1))
  else:
    raise ConfigError(f"dataset.source: unknown source '{source}'; choose one of {list(SOURCES)}")
  check_labels(train.labels, dataset_config, dataset_config.train_split)
  check_labels(test.labels, dataset_config, dataset_config.test_split)
  extra = None
  if dataset_config.unlabeled_source:
    name, split = parse_unlabeled_source(dataset_config.unlabeled_source)
    # dataset.data_dir is TFDS's data_dir only for source 'tfds' (else it is the image folder or the .npz file);
    # other sources read the extra pool from TFDS's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    tfds_data_dir = dataset_config.data_dir if source == 'tfds' else ''
    builder = tfds_builder(name, tfds_data_dir)
    images = _tfds_arrays(builder, split, tfds_data_dir, stored_size).images
    extra = Arrays(images, np.full(len(images), -1, np.int32))
  return InMemoryData(train, test, extra)


def class_names(dataset_config):
  """Label -> name: the class folders of an image folder, a TFDS data set's ClassLabel names; else None."""
  if dataset_config.source == 'folder':
    return tuple(folder_class_names(dataset_config.data_dir, dataset_config.train_split))
  if dataset_config.source == 'tfds':
    features = tfds_builder(dataset_config.name, dataset_config.data_dir).info.features
    names = getattr(features['label'], 'names', None) if 'label' in features else None
    if names and len(names) == dataset_config.num_classes:
      return tuple(names)
  return None


def parse_unlabeled_source(value):
  """'name[:split]' -> (name, split); the split defaults to 'train'."""
  name, _, split = value.partition(':')
  if not name:
    raise ConfigError(f"dataset.unlabeled_source: '{value}' is not a TFDS 'name[:split]'")
  return name, split or 'train'


def check_labels(labels, dataset_config, split):
  """Raises a one-line error unless the split is non-empty and its labels lie in [0, dataset.num_classes)."""
  if not len(labels):
    raise DataError(f'dataset: the {split} split of {_describe(dataset_config)} has no examples')
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0:   # no num_classes fixes this: the data is wrong (an unlabeled marker, a shifted encoding)
    raise DataError(f'{_describe(dataset_config)}: the {split} labels include {lo}, which is not a class index; '
                    f'labels must be class indices 0..{dataset_config.num_classes - 1} (dataset.num_classes='
                    f'{dataset_config.num_classes}): fix the labels in the data')
  if hi >= dataset_config.num_classes:
    raise ConfigError(f'dataset.num_classes={dataset_config.num_classes} but the {split} labels of '
                      f'{_describe(dataset_config)} range over [{lo}, {hi}]; set dataset.num_classes={hi + 1}')


def _describe(dataset_config):
  if dataset_config.source == 'tfds':
    return f"TFDS '{dataset_config.name}'"
  return f"{dataset_config.source} '{dataset_config.data_dir}'"


# ---- TFDS -----------------------------------------------------------------------------------------------------

def tfds_builder(name, data_dir):
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"dataset.name: TFDS has no dataset '{name}' (see `tfds.list_builders()`)") from None


def _prepare_hint(name, data_dir):
  data_dir_flag = f' --data_dir={data_dir}' if data_dir else ''
  hint = f'run `tfds build {name}{data_dir_flag}`'
  if name.startswith('imagenet2012'):
    hint += (' with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in its manual_dir (--manual_dir=DIR, '
             'default <data_dir>/downloads/manual)')
  return hint


def tfds_records(builder, split, data_dir, *, decode_images):
  """The split's records in their stored order as (image, label) (image still encoded unless `decode_images`).

  Never downloads: data that is not prepared raises DataError saying how to prepare it.
  """
  decoders = None if decode_images else {'image': tfds.decode.SkipDecoding()}
  try:
    dataset = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  except AssertionError:  # TFDS's "could not find data in <data_dir>" (download_and_prepare not run)
    raise DataError(f"TFDS dataset '{builder.name}' is not prepared in {builder.data_dir}: "
                    f'{_prepare_hint(builder.name, data_dir)}') from None
  except (ValueError, KeyError) as e:
    raise DataError(f"TFDS dataset '{builder.name}' has no split '{split}' ({e})") from None
  if 'image' not in dataset.element_spec:
    raise DataError(f"TFDS dataset '{builder.name}' has no 'image' feature; features: "
                    f'{sorted(dataset.element_spec)}')
  has_label = 'label' in dataset.element_spec
  return dataset.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32) if has_label else tf.constant(-1)))


def tfds_labels(builder, split, data_dir):
  """All labels of a split in stored order, reading the records without decoding images (one pass over the split)."""
  labels = tfds_records(builder, split, data_dir, decode_images=False).map(lambda _, label: label)
  return np.concatenate([np.zeros([0], np.int32)] + list(labels.batch(65536).as_numpy_iterator()))


def decode_image(encoded):
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def fit_image(image, stored_size):
  """Resizes to stored_size x stored_size (shorter side, then central square) when the shape differs."""
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  if image.shape[0] == stored_size and image.shape[1] == stored_size:
    return image
  return augment.resize_shorter_and_center_crop(image, stored_size)


def _tfds_arrays(builder, split, data_dir, stored_size):
  records = tfds_records(builder, split, data_dir, decode_images=True)
  records = records.map(lambda image, label: (fit_image(image, stored_size), label), tf.data.AUTOTUNE)
  images, labels = [], []
  for image_batch, label_batch in records.batch(_LOAD_BATCH).as_numpy_iterator():
    images.append(image_batch)
    labels.append(label_batch)
  if not images:
    raise DataError(f"TFDS dataset '{builder.name}': split '{split}' is empty")
  return Arrays(np.concatenate(images), np.concatenate(labels).astype(np.int32))


# ---- image folder ---------------------------------------------------------------------------------------------

def folder_class_names(root, split):
  """Sorted names of the class sub-folders of <root>/<split>; their positions are the labels."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise DataError(f'dataset.data_dir: image folder {split_dir} does not exist; expected <root>/<split>/<class>/'
                    f'*.png|jpg')
  class_names = sorted(entry for entry in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, entry)))
  if not class_names:
    raise DataError(f'dataset.data_dir: image folder {split_dir} has no class sub-folders; expected '
                    f'<root>/<split>/<class>/*.png|jpg')
  return class_names


def _folder_arrays(root, split, class_names, stored_size):
  split_dir = os.path.join(root, split)
  found = folder_class_names(root, split)
  unknown = sorted(set(found) - set(class_names))
  if unknown:
    raise DataError(f'{split_dir}: classes {unknown} do not appear in the training split')
  paths, labels = [], []
  for label, class_name in enumerate(class_names):
    class_dir = os.path.join(split_dir, class_name)
    if not os.path.isdir(class_dir):
      continue
    for file_name in sorted(os.listdir(class_dir)):
      if file_name.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(class_dir, file_name))
        labels.append(label)
  if not paths:
    raise DataError(f'{split_dir}: no images (*.png, *.jpg, *.jpeg) in its class folders; add images as '
                    f'{split_dir}/<class>/<name>.png|jpg')
  images = []
  for path in paths:
    try:
      image = decode_image(tf.io.read_file(path))
    except tf.errors.InvalidArgumentError:
      raise DataError(f'{path}: unreadable image (not a valid PNG/JPEG); remove or replace it') from None
    images.append(fit_image(image, stored_size).numpy())
  return Arrays(np.stack(images), np.asarray(labels, np.int32))


# ---- scikit-learn digits -------------------------------------------------------------------------------------

def _digits_arrays(stored_size):
  """(train, test) of the bundled digits as uint8 RGB images (grey level g -> round(255 g / 16)), no download."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  # only this source needs scikit-learn
  digits = datasets.load_digits()
  grey = np.round(digits.images * (255.0 / DIGITS_MAX_LEVEL)).astype(np.uint8)
  images = _fit_images(np.repeat(grey[..., None], 3, axis=-1), stored_size)
  labels = digits.target.astype(np.int32)
  cut = len(labels) - DIGITS_TEST_SIZE
  return Arrays(images[:cut], labels[:cut]), Arrays(images[cut:], labels[cut:])


def _fit_images(images, stored_size):
  """uint8 [N, H, W, 3] images resized to stored_size x stored_size (unchanged when they already are)."""
  if images.shape[1:3] == (stored_size, stored_size):
    return images
  resized = tf.data.Dataset.from_tensor_slices(images).map(lambda image: fit_image(image, stored_size))
  return np.concatenate(list(resized.batch(_LOAD_BATCH).as_numpy_iterator()))


# ---- MNIST-format idx files -----------------------------------------------------------------------------------

# The files of an MNIST-format release (MNIST, Fashion-MNIST, KMNIST, EMNIST), each optionally gzipped. Format
# (yann.lecun.com/exdb/mnist): a big-endian header, magic 0x00000801 (labels, uint8 [N]) or 0x00000803 (images, uint8
# [N, rows, cols]), then the N sizes, then the bytes.
IDX_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
             'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}   # number of dimensions -> magic number (uint8 data)
IDX_INSTALL_HINT = ('install it with `apt-get install dataset-fashion-mnist` (files under /usr/share/datasets/'
                    'fashion-mnist/) or read TFDS instead: --config.dataset.source=tfds '
                    '--config.dataset.name=fashion_mnist')


def idx_splits(directory):
  """[(images uint8 [N, rows, cols, 1], labels int32 [N]) of the train files, the same of the test files]."""
  if not os.path.isdir(directory):
    raise DataError(f'dataset.data_dir: idx directory {directory!r} does not exist; {IDX_INSTALL_HINT}')
  splits = []
  for images_name, labels_name in IDX_FILES.values():
    images = read_idx(_idx_path(directory, images_name), num_dims=3)
    labels = read_idx(_idx_path(directory, labels_name), num_dims=1)
    if len(images) != len(labels):
      raise DataError(f'{directory}: {images_name} holds {len(images)} images but {labels_name} {len(labels)} '
                      'labels; the two files must come from the same release')
    splits.append((images[..., None], labels.astype(np.int32)))
  return splits


def _idx_path(directory, name):
  for path in (os.path.join(directory, name), os.path.join(directory, name + '.gz')):
    if os.path.isfile(path):
      return path
  raise DataError(f'{directory}: no {name}[.gz]; an idx directory holds {sum(IDX_FILES.values(), ())} '
                  f'(gzipped or not); {IDX_INSTALL_HINT}')


def read_idx(path, *, num_dims):
  """The uint8 array of an idx file (gzipped if its name ends in .gz) of `num_dims` dimensions."""
  try:
    with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:   # a .gz cut short raises EOFError, a corrupt one BadGzipFile (an OSError)
    raise DataError(f'{path}: unreadable idx file ({e}); download it again') from None
  header_size = 4 * (1 + num_dims)
  magic = int.from_bytes(data[:4], 'big') if len(data) >= 4 else None
  if magic != IDX_MAGIC[num_dims]:
    found = f'0x{magic:08x}' if magic is not None else 'no header'
    raise DataError(f'{path}: magic number {found}, expected 0x{IDX_MAGIC[num_dims]:08x} (uint8, {num_dims} '
                    f'dimension{"s" if num_dims > 1 else ""}); not an idx {"image" if num_dims == 3 else "label"} '
                    'file')
  if len(data) < header_size:
    raise DataError(f'{path}: truncated idx file ({len(data)} bytes, the header alone is {header_size}); download '
                    'it again')
  shape = tuple(int.from_bytes(data[4 * i:4 * i + 4], 'big') for i in range(1, 1 + num_dims))
  expected = header_size + int(np.prod(shape))
  if len(data) != expected:
    state = 'truncated' if len(data) < expected else 'too long for its header'
    raise DataError(f'{path}: {state} ({len(data)} bytes, its header\'s shape {shape} needs {expected}); '
                    'download it again')
  return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


# ---- .npz -----------------------------------------------------------------------------------------------------

def _npz_arrays(path, stored_size):
  if not os.path.isfile(path):
    raise DataError(f'dataset.data_dir: .npz file {path} does not exist')
  try:
    with np.load(path) as npz:
      missing = [key for key in NPZ_KEYS if key not in npz.files]
      if missing:
        raise DataError(f'{path}: missing arrays {missing}; a .npz source needs {list(NPZ_KEYS)}')
      arrays = {key: npz[key] for key in NPZ_KEYS}
  except (OSError, ValueError) as e:
    raise DataError(f'{path}: not a readable .npz file ({e})') from None
  splits = []
  for split in ('train', 'test'):
    x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
      raise DataError(f'{path}: y_{split} must be integer labels [N] matching x_{split} (got {y.dtype} '
                      f'{y.shape} for x {x.shape})')
    splits.append(Arrays(_npz_inputs(path, split, x, stored_size), y.astype(np.int32)))
  return splits


def _npz_inputs(path, split, x, stored_size):
  """uint8 NHWC images (resized to stored_size) or finite float [N, D] vectors (kept as float32).

  A NaN or inf input would only surface as a non-finite loss after compiling (or be skipped with on_nonfinite='skip'
  and train on without a word), so it is refused here, naming the file, the array and the first row.
  """
  if x.ndim == 2 and np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
      bad_rows = np.flatnonzero(~finite.all(axis=1))
      count = int((~finite).sum())
      raise DataError(f'{path}: x_{split} has {count} non-finite value{"s" if count > 1 else ""} (NaN or inf), the '
                      f'first in row {bad_rows[0]}; remove or replace those rows')
    return x
  if x.ndim == 4 and x.dtype == np.uint8 and x.shape[-1] in (1, 3):
    return _fit_images(np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x, stored_size)
  raise DataError(f'{path}: x_{split} must be uint8 images [N, H, W, 1|3] or float vectors [N, D], got '
                  f'{x.dtype} {x.shape}')
