"""Input pipeline: splits, per-host batches, the weak and strong views (tf.data on CPU, numpy out).

`create(config, process_index=, process_count=)` returns a `Pipeline` (contract in docs/ARCHITECTURE.md):

- Splits (all from the training split, chosen by `dataset.split_seed`, disjoint by construction): a class-balanced
  labeled subset of `num_labeled` (num_labeled // C per class, the remainder going one each to classes 0..r-1), a
  validation split of `num_validation` (uniform over the rest; for model selection, never the test split), and the
  unlabeled pool = everything left (or `num_unlabeled` of it), plus the optional extra TFDS pool
  `dataset.unlabeled_source`. The test split is `dataset.test_split`.
- Global batch of step s: rows j of the labeled pool (B rows) and the unlabeled pool (mu*B rows) at global position
  p = s * rows + j. In memory, position p is example perm_e(p mod n) of its pool, perm_e a stateless permutation
  (`tf.random.experimental.index_shuffle`) seeded by (config.seed, pool, epoch e = p // n); every augmentation is
  seeded by (config.seed, pool, view, p). A batch is thus a pure function of (config.seed, s): resuming at step s
  reproduces the uninterrupted run bitwise, at no cost.
- Streaming (`dataset.in_memory=False`, TFDS only, ImageNet-size data): records in stored order, filtered into the
  pools, shuffled with a seeded buffer re-shuffled each epoch (deterministic given the seed), augmentations seeded
  as above. Resuming at step s skips s * rows records of each pool stream: they are read and shuffled but not
  decoded, so the cost grows with s (about one epoch of I/O per epoch already done). Selecting the labeled subset
  needs every label, read once at start-up from the records without decoding images (one pass over the split).
- Hosts: process i of n computes only rows [i*R/n, (i+1)*R/n) of every global batch of R rows (the same positions,
  so the same examples and augmentations); the hosts' slices concatenated in process order are exactly the
  single-host batch.
- Vector data (two_moons, .npz float [N, D]): no augmentation, the weak and strong views are the inputs themselves,
  and no normalisation. Images are standardised per channel with the training split's mean and std (in memory) or
  the ImageNet RGB statistics (streaming).
"""

import dataclasses
import math
import zlib

import numpy as np
import tensorflow as tf

from meta_pseudo_labels.data import augment
from meta_pseudo_labels.data import data_sources
from meta_pseudo_labels.data.dataset_choices import AUGMENTATIONS
from meta_pseudo_labels.data.input_spec import InputSpec
from meta_pseudo_labels.errors import ConfigError, DataError

EVAL_SPLITS = ('validation', 'test', 'train_labeled')
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_POOLS = ('labeled', 'validation', 'unlabeled')
_ENDLESS = 2**62


# ---- splits ---------------------------------------------------------------------------------------------------

def split_indices(labels, num_classes, *, num_labeled, num_validation, num_unlabeled=-1, seed=0):
  """Indices into the training split for the 'labeled', 'validation' and 'unlabeled' pools (sorted, disjoint).

  Labeled: num_labeled // C examples of every class, one more for classes 0..r-1 (r = num_labeled mod C), each
  class's examples drawn by a seeded permutation. Validation: num_validation drawn uniformly from the rest.
  Unlabeled: the remainder, or num_unlabeled of it drawn uniformly (-1: all).
  """
  labels = np.asarray(labels)
  total = len(labels)
  if num_labeled + num_validation > total:
    raise ConfigError(f'dataset.num_labeled={num_labeled} + dataset.num_validation={num_validation} exceeds the '
                      f'{total} training examples; lower them to at most {total} together')
  rng = np.random.default_rng(seed)
  per_class, remainder = divmod(num_labeled, num_classes)
  labeled = []
  for label in range(num_classes):
    wanted = per_class + (label < remainder)
    members = np.flatnonzero(labels == label)
    if len(members) < wanted:
      raise DataError(f'dataset.num_labeled={num_labeled}: class {label} has {len(members)} training examples, '
                      f'the class-balanced labeled subset needs {wanted}; add examples of class {label} or lower '
                      'dataset.num_labeled')
    labeled.append(rng.permutation(members)[:wanted])
  labeled = np.sort(np.concatenate(labeled))
  rest = rng.permutation(np.setdiff1d(np.arange(total), labeled))
  validation = np.sort(rest[:num_validation])
  rest = rest[num_validation:]
  if num_unlabeled > len(rest):
    raise ConfigError(f'dataset.num_unlabeled={num_unlabeled} but only {len(rest)} training examples are neither '
                      f'labeled nor validation; use -1 for all of them')
  unlabeled = np.sort(rest if num_unlabeled < 0 else rest[:num_unlabeled])
  return {'labeled': labeled, 'validation': validation, 'unlabeled': unlabeled}


def _key(seed, *names):
  """A stream key in [0, 2**32) from the config seed and names (pool, view), stable across runs and hosts."""
  entropy = [seed] + [zlib.crc32(name.encode()) for name in names]
  return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def host_rows(num_rows, process_index, process_count, field):
  """This host's contiguous rows [lo, hi) of a global batch of num_rows."""
  if num_rows % process_count:
    raise ConfigError(f'{field}={num_rows} is not divisible by the number of processes ({process_count})')
  per_host = num_rows // process_count
  return process_index * per_host, (process_index + 1) * per_host


def _host_position(counter, rows_per_step, lo, hi):
  """Global position of this host's `counter`-th example: rows lo..hi-1 of consecutive steps."""
  per_host = hi - lo
  return (counter // per_host) * rows_per_step + lo + counter % per_host


# ---- example sources ------------------------------------------------------------------------------------------

class _InMemoryExamples:
  """Examples from arrays, addressed by position through stateless per-epoch permutations of each pool."""

  def __init__(self, train, test, pools):
    self._arrays = {'train': train, 'test': test}
    # Eager tensors are captured by the tf.data functions as inputs, not copied into their graphs.
    self._tensors = {name: (tf.convert_to_tensor(a.images), tf.convert_to_tensor(a.labels))
                     for name, a in self._arrays.items()}
    self._pools = dict(pools, test=np.arange(len(test)))
    self._pools['train_labeled'] = self._pools['labeled']

  def size(self, pool):
    return len(self._pools[pool])

  def ids(self, pool):
    return self._pools[pool]

  def _array_of(self, pool):
    return self._tensors['test' if pool == 'test' else 'train']

  def train_examples(self, pool, *, start_step, rows_per_step, rows, key):
    images, labels = self._array_of(pool)
    indices = tf.constant(self._pools[pool], tf.int64)
    size = tf.constant(len(self._pools[pool]), tf.int64)
    lo, hi = rows

    def example(counter):
      position = _host_position(counter, rows_per_step, lo, hi)
      order_seed = tf.stack([tf.constant(key, tf.int64), position // size])
      index = indices[tf.random.experimental.index_shuffle(position % size, order_seed, size - 1)]
      return position, tf.gather(images, index), tf.gather(labels, index), index

    return tf.data.Dataset.range(start_step * (hi - lo), _ENDLESS).map(example, tf.data.AUTOTUNE)

  def eval_examples(self, pool, *, batch_size, rows):
    images, labels = self._array_of(pool)
    indices = tf.constant(self._pools[pool], tf.int64)
    size = len(self._pools[pool])
    lo, hi = rows

    def example(counter):
      position = _host_position(counter, batch_size, lo, hi)
      index = indices[tf.minimum(position, size - 1)]
      return tf.gather(images, index), tf.gather(labels, index), tf.cast(position < size, tf.float32), index

    num_batches = -(-size // batch_size)
    return tf.data.Dataset.range(num_batches * (hi - lo)).map(example, tf.data.AUTOTUNE)


class _StreamingExamples:
  """Examples streamed from TFDS records; images are decoded only after each host has kept its rows."""

  def __init__(self, dataset_config, builder, train_size, test_size, pools, prepare_image, extra):
    self._config = dataset_config
    self._builder = builder
    self._prepare_image = prepare_image
    self._extra = extra  # (builder, split, size) of config.dataset.unlabeled_source, or None
    membership = np.full(train_size, -1, np.int8)
    for code, pool in enumerate(_POOLS):
      membership[pools[pool]] = code
    self._membership = membership
    self._ids = {pool: pools[pool] for pool in _POOLS}
    if extra is not None:   # the extra pool's records are numbered after the training split's
      self._ids['unlabeled'] = np.concatenate([pools['unlabeled'], train_size + np.arange(extra[2])])
    self._sizes = {pool: len(pools[pool]) for pool in _POOLS}
    self._sizes.update(test=test_size, train_labeled=len(pools['labeled']))
    if extra is not None:
      self._sizes['unlabeled'] += extra[2]

  def size(self, pool):
    return self._sizes[pool]

  def ids(self, pool):
    return self._ids['labeled' if pool == 'train_labeled' else pool]

  def _records(self, pool):
    """The pool's (index in its split, encoded image, label) records in stored order."""
    config = self._config
    if pool == 'test':
      records = data_sources.tfds_records(self._builder, config.test_split, config.data_dir, decode_images=False)
      return records.enumerate().map(lambda i, record: (i, *record))
    code = _POOLS.index('labeled' if pool == 'train_labeled' else pool)
    membership = tf.constant(self._membership)
    records = data_sources.tfds_records(self._builder, config.train_split, config.data_dir, decode_images=False)
    return records.enumerate().filter(lambda i, _: membership[i] == code).map(lambda i, record: (i, *record))

  def _extra_records(self):
    """The extra unlabeled pool's (id, encoded image, -1) records, ids numbered after the training split's."""
    builder, split, _ = self._extra
    records = data_sources.tfds_records(builder, split, self._config.data_dir, decode_images=False)
    return records.enumerate(start=len(self._membership)).map(
        lambda i, record: (i, record[0], tf.constant(-1, tf.int32)))

  def _decode(self, position, index, encoded, label):
    return position, self._prepare_image(data_sources.decode_image(encoded)), label, index

  def train_examples(self, pool, *, start_step, rows_per_step, rows, key):
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
    return stream.map(lambda p, record: self._decode(p, *record), tf.data.AUTOTUNE)

  def eval_examples(self, pool, *, batch_size, rows):
    size = self._sizes[pool]
    records = self._records(pool)
    if pool == 'unlabeled' and self._extra is not None:
      records = records.concatenate(self._extra_records())
    padding = -(-size // batch_size) * batch_size - size
    records = records.concatenate(records.take(1).repeat(padding))  # copies of the first example, mask 0
    lo, hi = rows
    stream = records.enumerate().filter(lambda p, _: (p % batch_size >= lo) & (p % batch_size < hi))

    def example(position, record):
      _, image, label, index = self._decode(position, *record)
      return image, label, tf.cast(position < size, tf.float32), index

    return stream.map(example, tf.data.AUTOTUNE)


# ---- the pipeline ---------------------------------------------------------------------------------------------

def _normalize(image, mean, std):
  image = tf.cast(image, tf.float32)
  if mean is None:
    return image
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def eval_input(image, spec):
  """A decoded uint8 image [H, W, 3] (any size) or a vector -> the model input, as the eval splits are prepared
  (`spec`: an `input_spec.InputSpec`, the pipeline's `input_spec` or a saved one)."""
  if spec.stored_size:
    image = data_sources.fit_image(image, spec.stored_size)
  if spec.kind != 'none':
    image = augment.eval_view(image, kind=spec.kind, image_size=spec.image_size)
  return _normalize(image, spec.mean, spec.std)


@dataclasses.dataclass(frozen=True)
class _Views:
  """Per-example view functions and normalisation for one data kind."""
  kind: str                  # 'cifar' | 'imagenet' | 'none' (vectors are always 'none')
  image_size: int
  pad: int
  num_ops: int
  magnitude: float
  cutout_size: int
  mean: tuple | None         # per-channel; None: no normalisation (vectors)
  std: tuple | None

  def _normalize(self, image):
    return _normalize(image, self.mean, self.std)

  def weak(self, image, seed):
    return self._normalize(augment.weak_view(image, seed, kind=self.kind, image_size=self.image_size,
                                             pad=self.pad))

  def strong(self, image, seed):
    return self._normalize(augment.strong_view(
        image, seed, kind=self.kind, image_size=self.image_size, pad=self.pad, num_ops=self.num_ops,
        magnitude=self.magnitude, cutout_size=self.cutout_size))

  def eval(self, image):
    return self._normalize(augment.eval_view(image, kind=self.kind, image_size=self.image_size))


def _seed(key, position):
  return tf.stack([tf.constant(key, tf.int64), position])


class Pipeline:
  """Host-local numpy batches for training and evaluation (see the module docstring)."""

  def __init__(self, config, examples, views, *, num_classes, input_shape, process_index, process_count,
               stored_size=None):
    self._config = config
    self._examples = examples
    self._views = views
    self._process = (process_index, process_count)
    self.num_classes = num_classes
    self.input_shape = tuple(input_shape)
    self.input_spec = InputSpec(
        kind=views.kind, image_size=views.image_size, stored_size=stored_size, mean=views.mean, std=views.std,
        input_shape=self.input_shape, num_classes=num_classes,
        class_names=data_sources.class_names(config.dataset))
    self.split_sizes = {split: examples.size(split) for split in ('train_labeled', 'validation', 'unlabeled',
                                                                  'test')}

  def _rows(self, num_rows, field):
    return host_rows(num_rows, *self._process, field)

  def _finish(self, dataset):
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options).prefetch(self._config.dataset.prefetch or tf.data.AUTOTUNE)

  def _labeled(self, start_step, batch_size, field, stream_name, view='weak'):
    seed = self._config.seed
    order_key, view_key = _key(seed, stream_name, 'order'), _key(seed, stream_name, view)
    view_fn = {'weak': self._views.weak, 'strong': self._views.strong}[view]
    rows = self._rows(batch_size, field)
    examples = self._examples.train_examples('labeled', start_step=start_step, rows_per_step=batch_size,
                                             rows=rows, key=order_key)
    examples = examples.map(lambda p, image, label, _: (view_fn(image, _seed(view_key, p)), label),
                            tf.data.AUTOTUNE)
    return examples.batch(rows[1] - rows[0], drop_remainder=True)

  def unlabeled_ids(self):
    """The unlabeled pool's example ids, in pool order: an example's index in the training split, the extra
    `unlabeled_source` numbered after it. Stable for a given dataset config (what stored teacher targets key on)."""
    return np.asarray(self._examples.ids('unlabeled'), np.int64)

  def mpl_batches(self, start_step=0, *, with_unlabeled_index=False):
    """Endless MPL batches from step `start_step`: labeled_image, labeled_label, unlabeled_weak, unlabeled_strong,
    and with `with_unlabeled_index` unlabeled_index (int32: each unlabeled example's id, `unlabeled_ids`)."""
    config = self._config
    if self._examples.size('unlabeled') == 0:
      raise DataError('dataset: the unlabeled pool is empty (num_labeled + num_validation uses the whole training '
                      'split and no dataset.unlabeled_source is set)')
    labeled = self._labeled(start_step, config.batch_size, 'batch_size', 'labeled', config.dataset.labeled_view)
    unlabeled_rows = config.uda_ratio * config.batch_size
    rows = self._rows(unlabeled_rows, 'uda_ratio * batch_size')
    order_key = _key(config.seed, 'unlabeled', 'order')
    weak_key, strong_key = _key(config.seed, 'unlabeled', 'weak'), _key(config.seed, 'unlabeled', 'strong')
    unlabeled = self._examples.train_examples('unlabeled', start_step=start_step, rows_per_step=unlabeled_rows,
                                              rows=rows, key=order_key)
    unlabeled = unlabeled.map(
        lambda p, image, _, index: (self._views.weak(image, _seed(weak_key, p)),
                                    self._views.strong(image, _seed(strong_key, p)), tf.cast(index, tf.int32)),
        tf.data.AUTOTUNE).batch(rows[1] - rows[0], drop_remainder=True)

    def batch(lab, unl):
      batch = {'labeled_image': lab[0], 'labeled_label': lab[1], 'unlabeled_weak': unl[0], 'unlabeled_strong': unl[1]}
      return dict(batch, unlabeled_index=unl[2]) if with_unlabeled_index else batch
    batches = tf.data.Dataset.zip(labeled, unlabeled).map(batch)
    return self._finish(batches).as_numpy_iterator()

  def labeled_batches(self, start_step=0, batch_size=None, view='weak'):
    """Endless labeled-only batches (the supervised baseline, finetuning); batch_size defaults to
    finetune.batch_size, `view` 'weak' or 'strong' (the RandAugment baseline: `dataset.labeled_view`)."""
    batch_size = batch_size or self._config.finetune.batch_size
    labeled = self._labeled(start_step, batch_size, 'finetune.batch_size', 'finetune', view)
    batches = labeled.map(lambda image, label: {'labeled_image': image, 'labeled_label': label})
    return self._finish(batches).as_numpy_iterator()

  def eval_batches(self, split, batch_size=None, view='eval'):
    """One pass over 'validation' | 'test' | 'train_labeled'; the last batch padded (mask 0).

    `view`: 'eval' (no augmentation), or 'weak' / 'strong', the training views of each example, seeded by its
    position (diagnostics: what the teacher's labels on x_s are worth).
    """
    if split not in EVAL_SPLITS:
      raise ConfigError(f"eval split '{split}' is not one of {list(EVAL_SPLITS)}")
    batch_size = batch_size or self._config.eval_batch_size
    rows = self._rows(batch_size, 'eval_batch_size')
    key = _key(self._config.seed, split, view)
    view_fn = {'eval': lambda image, _: self._views.eval(image), 'weak': self._views.weak,
               'strong': self._views.strong}[view]
    examples = self._examples.eval_examples(split, batch_size=batch_size, rows=rows).enumerate()
    batches = examples.map(lambda p, example: {'image': view_fn(example[0], _seed(key, p)), 'label': example[1],
                                               'mask': example[2]}, tf.data.AUTOTUNE)
    return self._finish(batches.batch(rows[1] - rows[0], drop_remainder=True)).as_numpy_iterator()

  def unlabeled_eval_batches(self, batch_size):
    """One pass over the unlabeled pool in pool order, without augmentation (what a teacher's stored targets are
    computed on): image, index (the example's id, `unlabeled_ids`), mask (0: padding of the last batch).

    Host i of n gets rows [i B/n, (i+1) B/n) of every global batch of B, as `eval_batches`."""
    rows = self._rows(batch_size, 'reduced.chunk_size')
    examples = self._examples.eval_examples('unlabeled', batch_size=batch_size, rows=rows)
    batches = examples.map(lambda image, _, mask, index: {'image': self._views.eval(image), 'index': index,
                                                          'mask': mask}, tf.data.AUTOTUNE)
    return self._finish(batches.batch(rows[1] - rows[0], drop_remainder=True)).as_numpy_iterator()


# ---- creation -------------------------------------------------------------------------------------------------

def hide_accelerators():
  """Keeps TensorFlow on the CPU so it never takes GPU/TPU memory from JAX."""
  for device_type in ('GPU', 'TPU'):
    if tf.config.list_physical_devices(device_type):
      tf.config.set_visible_devices([], device_type)


def _stored_size(dataset_config):
  """In-memory image side: the model's size, or for ImageNet-style crops the size before the 87.5% centre crop."""
  if dataset_config.augment == 'imagenet':
    return round(dataset_config.image_size / augment.CENTER_CROP_FRACTION)
  return dataset_config.image_size


def _channel_stats(images):
  count = images.size // images.shape[-1]
  mean = images.sum(axis=(0, 1, 2), dtype=np.float64) / count
  square = np.einsum('nhwc,nhwc->c', images, images, dtype=np.float64) / count
  std = np.sqrt(np.maximum(square - mean**2, 1.0))
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _views_for(dataset_config, *, vectors, mean, std):
  return _Views(kind='none' if vectors else dataset_config.augment, image_size=dataset_config.image_size,
                pad=dataset_config.pad_crop, num_ops=dataset_config.randaugment_num_ops,
                magnitude=float(dataset_config.randaugment_magnitude), cutout_size=dataset_config.cutout_size,
                mean=None if vectors else mean, std=None if vectors else std)


def create(config, *, process_index=0, process_count=1):
  """Builds the pipeline of `config.dataset` for host `process_index` of `process_count`."""
  hide_accelerators()
  dataset_config = config.dataset
  host_rows(config.batch_size, process_index, process_count, 'batch_size')
  host_rows(config.eval_batch_size, process_index, process_count, 'eval_batch_size')
  if dataset_config.augment not in AUGMENTATIONS:   # before any data is read; the source is checked by its reader
    raise ConfigError(f"dataset.augment: unknown augmentation '{dataset_config.augment}'; choose one of "
                      f'{list(AUGMENTATIONS)}')
  if dataset_config.in_memory or dataset_config.source != 'tfds':
    return _create_in_memory(config, process_index, process_count)
  return _create_streaming(config, process_index, process_count)


def _split_pools(dataset_config, labels):
  return split_indices(labels, dataset_config.num_classes, num_labeled=dataset_config.num_labeled,
                       num_validation=dataset_config.num_validation, num_unlabeled=dataset_config.num_unlabeled,
                       seed=dataset_config.split_seed)


def _create_in_memory(config, process_index, process_count):
  dataset_config = config.dataset
  data = data_sources.load_in_memory(dataset_config, _stored_size(dataset_config))
  pools = _split_pools(dataset_config, data.train.labels)
  train = data.train
  if data.extra_unlabeled is not None:
    extra_indices = len(train) + np.arange(len(data.extra_unlabeled))
    pools['unlabeled'] = np.concatenate([pools['unlabeled'], extra_indices])
    train = data_sources.Arrays(np.concatenate([train.images, data.extra_unlabeled.images]),
                                np.concatenate([train.labels, data.extra_unlabeled.labels]))
  vectors = data.train.images.ndim == 2
  if vectors:
    mean = std = None
    input_shape = data.train.images.shape[1:]
  else:
    mean, std = _channel_stats(data.train.images)
    input_shape = (dataset_config.image_size, dataset_config.image_size, 3)
  views = _views_for(dataset_config, vectors=vectors, mean=mean, std=std)
  return Pipeline(config, _InMemoryExamples(train, data.test, pools), views,
                  num_classes=dataset_config.num_classes, input_shape=input_shape,
                  process_index=process_index, process_count=process_count,
                  stored_size=None if vectors else _stored_size(dataset_config))


def _create_streaming(config, process_index, process_count):
  dataset_config = config.dataset
  builder = data_sources.tfds_builder(dataset_config.name, dataset_config.data_dir)
  train_labels = data_sources.tfds_labels(builder, dataset_config.train_split, dataset_config.data_dir)
  test_labels = data_sources.tfds_labels(builder, dataset_config.test_split, dataset_config.data_dir)
  data_sources.check_labels(train_labels, dataset_config, dataset_config.train_split)
  data_sources.check_labels(test_labels, dataset_config, dataset_config.test_split)
  test_size = len(test_labels)
  pools = _split_pools(dataset_config, train_labels)
  extra = None
  if dataset_config.unlabeled_source:
    name, split = data_sources.parse_unlabeled_source(dataset_config.unlabeled_source)
    extra_builder = data_sources.tfds_builder(name, dataset_config.data_dir)
    extra = (extra_builder, split, len(data_sources.tfds_labels(extra_builder, split, dataset_config.data_dir)))
  if dataset_config.augment == 'imagenet':
    prepare_image = tf.identity  # the views crop and resize the decoded image themselves
  else:
    prepare_image = lambda image: data_sources.fit_image(image, dataset_config.image_size)
  views = _views_for(dataset_config, vectors=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)
  examples = _StreamingExamples(dataset_config, builder, len(train_labels), test_size, pools, prepare_image, extra)
  return Pipeline(config, examples, views, num_classes=dataset_config.num_classes,
                  input_shape=(dataset_config.image_size, dataset_config.image_size, 3),
                  process_index=process_index, process_count=process_count,
                  stored_size=None if dataset_config.augment == 'imagenet' else dataset_config.image_size)
