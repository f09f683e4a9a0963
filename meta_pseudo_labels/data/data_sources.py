"""Where examples come from: TFDS, an image folder, a .npz file, MNIST-format idx files, scikit-learn's digits or the
TwoMoon generator.

Every source yields (image, label) pairs; `input_pipeline` does the splitting, the views and batching, so custom data
goes through exactly the same pipeline as the paper's data sets, chosen by `config.dataset.source` alone.
`open_examples` is the one entry: it loads (or opens the stream of) the source, the optional extra unlabeled pool
`dataset.unlabeled_source`, and returns `InMemoryExamples` or `StreamingExamples`, which hand the pipeline host-local
numpy batches of stored-size uint8 images (or float vectors) by position.

In-memory sources are `Arrays`: uint8 NHWC images (RGB, resized to one stored size) or float32 [N, D] vectors; they
need numpy and PIL only. TFDS (in memory or streamed) is the one source that needs TensorFlow and TFDS, imported
when it is used: tf.data reads and decodes the records and resizes them to the stored size; every random view is
made on the device (`augment.py`).
"""

import dataclasses
import functools
import gzip
import io
import itertools
import os

import numpy as np
from PIL import Image

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
POOLS = ('labeled', 'validation', 'unlabeled')


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


def load_in_memory(dataset_config, stored_size):
  """The source's train and test `Arrays`; images are resized to stored_size x stored_size."""
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
    train = Arrays(*make_two_moons(TWO_MOONS_POINTS, TWO_MOONS_NOISE, seed=dataset_config.split_seed))
    test = Arrays(*make_two_moons(TWO_MOONS_POINTS, TWO_MOONS_NOISE, seed=dataset_config.split_seed + 1))
  else:
    raise ConfigError(f"dataset.source: unknown source '{source}'; choose one of {list(SOURCES)}")
  check_labels(train.labels, dataset_config, dataset_config.train_split)
  check_labels(test.labels, dataset_config, dataset_config.test_split)
  return InMemoryData(train, test)


def open_examples(dataset_config, stored_size, split_pools):
  """The source's examples for the pipeline: in memory (every source but TFDS with `dataset.in_memory=False`) or
  streamed from TFDS; `split_pools(train_labels)` -> {'labeled', 'validation', 'unlabeled'} index arrays. The
  extra unlabeled pool `dataset.unlabeled_source` (a TFDS 'name[:split]') joins the unlabeled pool here."""
  extra_source = parse_unlabeled_source(dataset_config.unlabeled_source) if dataset_config.unlabeled_source else None
  # dataset.data_dir is TFDS's data_dir only for source 'tfds' (else it is the image folder or the .npz file);
  # other sources read the extra pool from TFDS's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  tfds_data_dir = dataset_config.data_dir if dataset_config.source == 'tfds' else ''
  if dataset_config.source == 'tfds' and not dataset_config.in_memory:
    return StreamingExamples.open(dataset_config, stored_size, split_pools, extra_source)
  data = load_in_memory(dataset_config, stored_size)
  train, test = data.train, data.test
  pools = split_pools(train.labels)
  own_train_size = len(train)
  if extra_source is not None:
    name, split = extra_source
    images = _tfds_arrays(tfds_builder(name, tfds_data_dir), split, tfds_data_dir, stored_size).images
    pools['unlabeled'] = np.concatenate([pools['unlabeled'], len(train) + np.arange(len(images))])
    train = Arrays(np.concatenate([train.images, images]),
                   np.concatenate([train.labels, np.full(len(images), -1, np.int32)]))
  return InMemoryExamples(train, test, pools, own_train_size)


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

@functools.cache
def _tensorflow():
  """TensorFlow, imported by the TFDS source alone and kept on the CPU (it would otherwise reserve the GPU/TPU
  memory that JAX needs); once, before TensorFlow initialises its devices."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # only TFDS sources need TensorFlow
  for device_type in ('GPU', 'TPU'):
    if tf.config.list_physical_devices(device_type):
      tf.config.set_visible_devices([], device_type)
  return tf


def _tfds():
  _tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # only TFDS sources need TFDS
  return tfds


def tfds_builder(name, data_dir):
  tfds = _tfds()
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
  tf, tfds = _tensorflow(), _tfds()
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


def _tf_fit_image(image, stored_size):
  """The TFDS records' `fit_image` inside tf.data: shorter side to stored_size, central square (bicubic)."""
  tf = _tensorflow()
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  square = tf.image.resize(image[top:top + side, left:left + side], [stored_size, stored_size], method='bicubic')
  return tf.cast(tf.clip_by_value(tf.round(square), 0.0, 255.0), tf.uint8)


def _tfds_fitted(records, stored_size, *, encoded):
  """(image, label, ...) records -> (uint8 stored_size image, label, ...), decoding the image first if `encoded`."""
  tf = _tensorflow()
  decode = lambda image: tf.io.decode_image(image, channels=3, expand_animations=False) if encoded else image
  return records.map(lambda image, *rest: (_tf_fit_image(decode(image), stored_size), *rest), tf.data.AUTOTUNE)


def _tfds_arrays(builder, split, data_dir, stored_size):
  records = _tfds_fitted(tfds_records(builder, split, data_dir, decode_images=True), stored_size, encoded=False)
  images, labels = [], []
  for image_batch, label_batch in records.batch(_LOAD_BATCH).as_numpy_iterator():
    images.append(image_batch)
    labels.append(label_batch)
  if not images:
    raise DataError(f"TFDS dataset '{builder.name}': split '{split}' is empty")
  return Arrays(np.concatenate(images), np.concatenate(labels).astype(np.int32))


# ---- fitting images to the stored size (PIL) ------------------------------------------------------------------

def fit_image(image, stored_size):
  """uint8 [H, W, 1|3] -> [stored_size, stored_size, 3]: the central square, resized (PIL bicubic) when the size
  differs."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  height, width = image.shape[:2]
  if height == width == stored_size:
    return image
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  square = Image.fromarray(np.ascontiguousarray(image[top:top + side, left:left + side]))
  return np.asarray(square.resize((stored_size, stored_size), Image.BICUBIC))


def read_image(path):
  """The file's image as uint8 RGB [H, W, 3] (PNG/JPEG, through PIL); DataError if it is not a readable image."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError, Image.DecompressionBombError):
    raise DataError(f'{path}: unreadable image (not a valid PNG/JPEG); remove or replace it') from None


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
  images = [fit_image(read_image(path), stored_size) for path in paths]
  return Arrays(np.stack(images), np.asarray(labels, np.int32))


# ---- TwoMoon (paper, Sec. 3.1; pure numpy) -------------------------------------------------------------------

def make_two_moons(num_points=2000, noise=0.1, seed=0):
  """Two interleaving half circles, num_points // 2 per moon (the paper uses 2000 points, 1000 per moon).

  Moon 0 is the upper half of the unit circle, moon 1 the lower half shifted to (1, 0.5); points are spread evenly
  along each arc, perturbed by isotropic Gaussian noise of std `noise`, and returned in a seeded random order.

  Returns:
    x: float32 [num_points, 2]; y: int32 [num_points], the moon of each point.
  """
  if num_points < 2:
    raise ValueError(f'num_points must be at least 2, got {num_points}')
  rng = np.random.default_rng(seed)
  num_first = num_points // 2
  num_second = num_points - num_first
  angle_first = np.linspace(0.0, np.pi, num_first)
  angle_second = np.linspace(0.0, np.pi, num_second)
  first = np.stack([np.cos(angle_first), np.sin(angle_first)], axis=1)
  second = np.stack([1.0 - np.cos(angle_second), 0.5 - np.sin(angle_second)], axis=1)
  x = np.concatenate([first, second]) + noise * rng.standard_normal((num_points, 2))
  y = np.concatenate([np.zeros(num_first, np.int32), np.ones(num_second, np.int32)])
  order = rng.permutation(num_points)
  return x[order].astype(np.float32), y[order]


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
  return np.stack([fit_image(image, stored_size) for image in images])


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
    out_of_range = (y < np.iinfo(np.int32).min) | (y > np.iinfo(np.int32).max)
    if out_of_range.any():   # the int32 cast below would wrap them silently onto other classes
      row = int(np.flatnonzero(out_of_range)[0])
      raise DataError(f'{path}: y_{split}[{row}] = {int(y[row])} does not fit int32; labels must be class indices '
                      '0..num_classes-1')
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


# ---- example sources: host-local numpy batches by position ----------------------------------------------------

def _positions(step, rows_per_step, rows):
  """Global positions of this host's rows [lo, hi) of step `step`'s batch of `rows_per_step`."""
  return step * rows_per_step + np.arange(*rows)


class InMemoryExamples:
  """Examples from arrays, addressed by position through seeded per-epoch permutations of each pool: position p of
  a pool of n is example perm_e(p mod n), perm_e a permutation seeded by (key, epoch e = p // n)."""

  def __init__(self, train, test, pools, own_train_size=None):
    self._arrays = {'train': train, 'test': test}
    self._pools = dict(pools, test=np.arange(len(test)))
    self._pools['train_labeled'] = self._pools['labeled']
    self.vectors = train.images.ndim == 2
    self.vector_size = train.images.shape[1] if self.vectors else None
    # The training split's own images (not the extra unlabeled pool's): their channel statistics normalise inputs.
    self.train_images = None if self.vectors else train.images[:own_train_size]

  def size(self, pool):
    return len(self._pools[pool])

  def ids(self, pool):
    """The pool's example ids: indices into the training split, the extra unlabeled pool numbered after it."""
    return self._pools[pool]

  def _array_of(self, pool):
    return self._arrays['test' if pool == 'test' else 'train']

  def train_batches(self, pool, *, start_step, rows_per_step, rows, key):
    """Endless (images, labels, ids) of this host's `rows` of every step from `start_step`."""
    arrays, indices = self._array_of(pool), self._pools[pool]
    size = len(indices)
    permutations = {}
    for step in itertools.count(start_step):
      positions = _positions(step, rows_per_step, rows)
      epochs = positions // size
      chosen = np.empty(len(positions), np.int64)
      for epoch in np.unique(epochs):
        if epoch not in permutations:
          permutations = {e: p for e, p in permutations.items() if e >= epoch - 1}
          permutations[epoch] = np.random.default_rng([key, int(epoch)]).permutation(size)
        here = epochs == epoch
        chosen[here] = indices[permutations[epoch][positions[here] % size]]
      yield arrays.images[chosen], arrays.labels[chosen], chosen

  def eval_batches(self, pool, *, batch_size, rows):
    """One pass: (images, labels, mask, ids) of this host's rows, the last batch padded with copies of the pool's last
    example (mask 0)."""
    arrays, indices = self._array_of(pool), self._pools[pool]
    size = len(indices)
    for step in range(-(-size // batch_size)):
      positions = _positions(step, batch_size, rows)
      chosen = indices[np.minimum(positions, size - 1)]
      yield arrays.images[chosen], arrays.labels[chosen], (positions < size).astype(np.float32), chosen


class StreamingExamples:
  """Examples streamed from TFDS records with tf.data (ImageNet-size data): records in stored order, filtered into
  the pools, shuffled with a seeded buffer re-shuffled each epoch; images are decoded and resized to the stored size
  only after each host has kept its rows. Resuming at step s skips s * rows records of each pool stream (read and
  shuffled, not decoded). Selecting the labeled subset reads every label once at start-up (no image decoding)."""

  def __init__(self, dataset_config, builder, stored_size, train_size, test_size, pools, extra):
    self._config = dataset_config
    self._builder = builder
    self._stored_size = stored_size
    self._extra = extra  # (builder, split, size) of dataset.unlabeled_source, or None
    membership = np.full(train_size, -1, np.int8)
    for code, pool in enumerate(POOLS):
      membership[pools[pool]] = code
    self._membership = membership
    self._ids = {pool: pools[pool] for pool in POOLS}
    if extra is not None:   # the extra pool's records are numbered after the training split's
      self._ids['unlabeled'] = np.concatenate([pools['unlabeled'], train_size + np.arange(extra[2])])
    self._sizes = {pool: len(pools[pool]) for pool in POOLS}
    self._sizes.update(test=test_size, train_labeled=len(pools['labeled']))
    if extra is not None:
      self._sizes['unlabeled'] += extra[2]
    self.vectors = False
    self.train_images = None   # not in memory: normalised with the ImageNet statistics

  @classmethod
  def open(cls, dataset_config, stored_size, split_pools, extra_source):
    builder = tfds_builder(dataset_config.name, dataset_config.data_dir)
    train_labels = tfds_labels(builder, dataset_config.train_split, dataset_config.data_dir)
    test_labels = tfds_labels(builder, dataset_config.test_split, dataset_config.data_dir)
    check_labels(train_labels, dataset_config, dataset_config.train_split)
    check_labels(test_labels, dataset_config, dataset_config.test_split)
    extra = None
    if extra_source is not None:
      name, split = extra_source
      extra_builder = tfds_builder(name, dataset_config.data_dir)
      extra = (extra_builder, split, len(tfds_labels(extra_builder, split, dataset_config.data_dir)))
    return cls(dataset_config, builder, stored_size, len(train_labels), len(test_labels), split_pools(train_labels),
               extra)

  def size(self, pool):
    return self._sizes[pool]

  def ids(self, pool):
    return self._ids['labeled' if pool == 'train_labeled' else pool]

  def _records(self, pool):
    """The pool's (encoded image, label, id) records in stored order (id: the index in its split)."""
    tf, config = _tensorflow(), self._config
    if pool == 'test':
      records = tfds_records(self._builder, config.test_split, config.data_dir, decode_images=False)
      return records.enumerate().map(lambda i, record: (*record, i))
    code = POOLS.index('labeled' if pool == 'train_labeled' else pool)
    membership = tf.constant(self._membership)
    records = tfds_records(self._builder, config.train_split, config.data_dir, decode_images=False)
    return records.enumerate().filter(lambda i, _: membership[i] == code).map(lambda i, record: (*record, i))

  def _extra_records(self):
    """The extra unlabeled pool's (encoded image, -1, id) records, ids numbered after the training split's."""
    tf = _tensorflow()
    builder, split, _ = self._extra
    records = tfds_records(builder, split, self._config.data_dir, decode_images=False)
    return records.enumerate(start=len(self._membership)).map(
        lambda i, record: (record[0], tf.constant(-1, tf.int32), i))

  def _batches(self, stream, rows):
    tf = _tensorflow()
    stream = _tfds_fitted(stream, self._stored_size, encoded=True).batch(rows[1] - rows[0], drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return stream.with_options(options).prefetch(self._config.prefetch or tf.data.AUTOTUNE).as_numpy_iterator()

  def train_batches(self, pool, *, start_step, rows_per_step, rows, key):
    tf = _tensorflow()
    buffer = self._config.shuffle_buffer
    stream = self._records(pool).shuffle(buffer, seed=key, reshuffle_each_iteration=True).repeat()
    if pool == 'unlabeled' and self._extra is not None:
      extra_size = self._extra[2]
      extra = self._extra_records().shuffle(buffer, seed=key + 1, reshuffle_each_iteration=True).repeat()
      own_size = self._sizes['unlabeled'] - extra_size
      stream = tf.data.Dataset.sample_from_datasets([stream, extra], weights=[float(own_size), float(extra_size)],
                                                    seed=key + 2)
    lo, hi = rows
    start = start_step * rows_per_step
    stream = stream.skip(start).enumerate(start=start)
    stream = stream.filter(lambda p, _: (p % rows_per_step >= lo) & (p % rows_per_step < hi))
    return self._batches(stream.map(lambda _, record: record), rows)

  def eval_batches(self, pool, *, batch_size, rows):
    tf = _tensorflow()
    size = self._sizes[pool]
    records = self._records(pool)
    if pool == 'unlabeled' and self._extra is not None:
      records = records.concatenate(self._extra_records())
    padding = -(-size // batch_size) * batch_size - size
    records = records.concatenate(records.take(1).repeat(padding))  # copies of the first example, mask 0
    lo, hi = rows
    stream = records.enumerate().filter(lambda p, _: (p % batch_size >= lo) & (p % batch_size < hi))
    return self._batches(stream.map(lambda p, record: (*record[:2], tf.cast(p < size, tf.float32), record[2])),
                         rows)
