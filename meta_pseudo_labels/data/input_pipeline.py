"""Input pipeline: splits, per-host batches of uint8 images, and the views, made on the device by JAX.

`create(dataset_config, batch_spec, seed=, process_index=, process_count=)` returns a `Pipeline` (contract in
docs/ARCHITECTURE.md):

- Splits (all from the training split, chosen by `dataset.split_seed`, disjoint by construction): a class-balanced
  labeled subset of `num_labeled` (num_labeled // C per class, the remainder going one each to classes 0..r-1), a
  validation split of `num_validation` (uniform over the rest; for model selection, never the test split), and the
  unlabeled pool = everything left (or `num_unlabeled` of it), plus the optional extra TFDS pool
  `dataset.unlabeled_source`. The test split is `dataset.test_split`. Where the examples come from (in memory or
  streamed from TFDS) is `data_sources.open_examples`'s business.
- Host batches: rows j of the labeled pool (B rows) and the unlabeled pool (mu*B rows) of step s are the pools'
  examples at global position p = s * rows + j (in memory: a seeded per-epoch permutation, so a batch is a pure
  function of (seed, s)); they are uint8 images at the stored size (or float vectors), no view yet.
- Views (`augment.py`), on the device, inside the jitted step: `with_views(step_fn)` turns the host batch into
  the model's (x_l weak, x_w, x_s, standardised) with keys fold_in(fold_in(step key, stream), row), the step key
  being fold_in(rng, state.step): resuming at step s makes the same views as the uninterrupted run, at no cost, and
  the views of a global batch do not depend on how its rows are split over hosts.
- Hosts: process i of n reads only rows [i*R/n, (i+1)*R/n) of every global batch of R rows; the hosts' slices
  concatenated in process order are exactly the single-host batch.
- Vector data (two_moons, .npz float [N, D]): no augmentation, the weak and strong views are the inputs themselves,
  and no normalisation. Images are standardised per channel with the training split's mean and std (in memory) or
  the ImageNet RGB statistics (streaming).
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from meta_pseudo_labels.data import augment
from meta_pseudo_labels.data import data_sources
from meta_pseudo_labels.data.dataset_choices import AUGMENTATIONS
from meta_pseudo_labels.data.input_spec import InputSpec
from meta_pseudo_labels.errors import ConfigError, DataError

EVAL_SPLITS = ('validation', 'test', 'train_labeled')
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


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


# ---- the views ------------------------------------------------------------------------------------------------

def _normalize(image, mean, std):
  image = image.astype(jnp.float32) if isinstance(image, jax.Array) else np.asarray(image, np.float32)
  if mean is None:
    return image
  return (image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def eval_input(image, spec):
  """A decoded uint8 image [H, W, 3] (any size) or a vector -> the model input, as the eval splits are prepared
  (`spec`: an `input_spec.InputSpec`, the pipeline's `input_spec` or a saved one). numpy in, numpy out."""
  if spec.stored_size:
    image = data_sources.fit_image(image, spec.stored_size)
  if spec.kind != 'none':
    image = augment.eval_view(image, kind=spec.kind, image_size=spec.image_size)
  return _normalize(np.asarray(image), spec.mean, spec.std)


@dataclasses.dataclass(frozen=True)
class Views:
  """The views of one data kind and their normalisation, as JAX functions (hashable: static under jit)."""
  kind: str                  # 'cifar' | 'digits' | 'imagenet' | 'none' (vectors are always 'none')
  image_size: int
  pad: int
  num_ops: int
  magnitude: float
  cutout_size: int
  mean: tuple | None         # per-channel; None: no normalisation (vectors)
  std: tuple | None

  def weak(self, image, key):
    return _normalize(augment.weak_view(image, key, kind=self.kind, image_size=self.image_size, pad=self.pad),
                      self.mean, self.std)

  def strong(self, image, key):
    return _normalize(augment.strong_view(
        image, key, kind=self.kind, image_size=self.image_size, pad=self.pad, num_ops=self.num_ops,
        magnitude=self.magnitude, cutout_size=self.cutout_size), self.mean, self.std)

  def eval(self, image):
    """The evaluation view of an image or a batch of them (numpy or JAX)."""
    return _normalize(augment.eval_view(image, kind=self.kind, image_size=self.image_size), self.mean, self.std)

  def of_batch(self, view, images, key, first_row=0):
    """`view` ('weak' | 'strong') of every row of `images`, row r with key fold_in(key, first_row + r) (first_row:
    where these rows start in the global batch)."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, first_row + jnp.arange(images.shape[0]))
    return jax.vmap(getattr(self, view))(images, keys)


# Streams of views within a step's key (fold_in constants; the step's own keys come from splitting it, mpl.py).
_LABELED_WEAK, _UNLABELED_WEAK, _UNLABELED_STRONG, _VIEWS = 1, 2, 3, 0x5649  # 0x5649: 'VI'


def step_views_key(rng, step):
  """The key of step `step`'s views: fold_in(fold_in(rng, step), _VIEWS), beside mpl.step_keys's split of it."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), _VIEWS)


def model_batch(views, batch, key, labeled_view='weak'):
  """A host-format batch (uint8 'labeled_image', optional 'unlabeled_image') -> the model's batch: the labeled
  images' `labeled_view` ('weak', or 'strong': the RandAugment baseline, `dataset.labeled_view`), and the unlabeled
  images' weak (x_w) and strong (x_s) views (no x_w beside stored teacher targets, 'unlabeled_targets': Reduced
  MPL's teacher reads no image); other entries (labels, 'unlabeled_index', the targets) pass through."""
  out = dict(batch)
  out['labeled_image'] = views.of_batch(labeled_view, batch['labeled_image'], jax.random.fold_in(key, _LABELED_WEAK))
  if 'unlabeled_image' in batch:
    unlabeled = out.pop('unlabeled_image')
    if 'unlabeled_targets' not in batch:
      out['unlabeled_weak'] = views.of_batch('weak', unlabeled, jax.random.fold_in(key, _UNLABELED_WEAK))
    out['unlabeled_strong'] = views.of_batch('strong', unlabeled, jax.random.fold_in(key, _UNLABELED_STRONG))
  return out


def with_views(views, step_fn, labeled_view='weak'):
  """`step_fn(state, model batch, rng)` as a step on host-format batches: the views are made inside the (jitted)
  step from `step_views_key(rng, state.step)`."""
  def step(state, batch, rng):
    return step_fn(state, model_batch(views, batch, step_views_key(rng, state.step), labeled_view), rng)
  return step


# ---- the pipeline ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """The global batch sizes the pipeline serves: `batch_size` labeled rows per step (MPL and supervised), `uda_ratio`
  unlabeled rows per labeled row (mu, paper App. C), `finetune_batch_size`, `eval_batch_size`."""
  batch_size: int
  uda_ratio: int
  finetune_batch_size: int
  eval_batch_size: int

  @classmethod
  def from_config(cls, config):
    return cls(batch_size=config.batch_size, uda_ratio=config.uda_ratio,
               finetune_batch_size=config.finetune.batch_size, eval_batch_size=config.eval_batch_size)


class Pipeline:
  """Host-local numpy batches for training (views made on the device, `with_views`) and evaluation."""

  def __init__(self, dataset_config, batch_spec, seed, examples, views, *, input_shape, process_index,
               process_count, stored_size=None):
    self._batch_spec = batch_spec
    self._seed = seed
    self._examples = examples
    self.views = views
    self._process = (process_index, process_count)
    self.num_classes = dataset_config.num_classes
    self.input_shape = tuple(input_shape)
    self.input_spec = InputSpec(
        kind=views.kind, image_size=views.image_size, stored_size=stored_size, mean=views.mean, std=views.std,
        input_shape=self.input_shape, num_classes=self.num_classes,
        class_names=data_sources.class_names(dataset_config))
    self.split_sizes = {split: examples.size(split) for split in ('train_labeled', 'validation', 'unlabeled',
                                                                  'test')}
    self._eval_split_views = jax.jit(views.of_batch, static_argnums=0)

  def _rows(self, num_rows, field):
    return host_rows(num_rows, *self._process, field)

  def with_views(self, step_fn, labeled_view='weak'):
    """`step_fn` on this pipeline's training batches (see the module-level `with_views`)."""
    return with_views(self.views, step_fn, labeled_view)

  def unlabeled_ids(self):
    """The unlabeled pool's example ids, in pool order: an example's index in the training split, the extra
    `unlabeled_source` numbered after it. Stable for a given dataset config (what stored teacher targets key on)."""
    return np.asarray(self._examples.ids('unlabeled'), np.int64)

  def _train(self, pool, stream_name, start_step, batch_size, field):
    return self._examples.train_batches(pool, start_step=start_step, rows_per_step=batch_size,
                                        rows=self._rows(batch_size, field),
                                        key=_key(self._seed, stream_name, 'order'))

  def mpl_batches(self, start_step=0, *, with_unlabeled_index=False):
    """Endless MPL host batches from step `start_step`: labeled_image, labeled_label, unlabeled_image, and with
    `with_unlabeled_index` unlabeled_index (int32: each unlabeled example's id, `unlabeled_ids`)."""
    spec = self._batch_spec
    if self._examples.size('unlabeled') == 0:
      raise DataError('dataset: the unlabeled pool is empty (num_labeled + num_validation uses the whole training '
                      'split and no dataset.unlabeled_source is set)')
    labeled = self._train('labeled', 'labeled', start_step, spec.batch_size, 'batch_size')
    unlabeled = self._train('unlabeled', 'unlabeled', start_step, spec.uda_ratio * spec.batch_size,
                            'uda_ratio * batch_size')
    def batch(labeled, unlabeled):
      (images, labels, _), (unlabeled_images, _, ids) = labeled, unlabeled
      batch = {'labeled_image': images, 'labeled_label': labels, 'unlabeled_image': unlabeled_images}
      return dict(batch, unlabeled_index=ids.astype(np.int32)) if with_unlabeled_index else batch
    return (batch(lab, unl) for lab, unl in zip(labeled, unlabeled))

  def labeled_batches(self, start_step=0, batch_size=None):
    """Endless labeled-only host batches (the supervised baseline, finetuning); batch_size defaults to the spec's
    finetune_batch_size. Their view (weak, or strong for the RandAugment baseline) is the step's: `with_views`."""
    batch_size = batch_size or self._batch_spec.finetune_batch_size
    return ({'labeled_image': images, 'labeled_label': labels}
            for images, labels, _ in self._train('labeled', 'finetune', start_step, batch_size,
                                                 'finetune.batch_size'))

  def eval_batches(self, split, batch_size=None, view='eval'):
    """One pass over 'validation' | 'test' | 'train_labeled'; the last batch padded (mask 0); model inputs.

    `view`: 'eval' (no augmentation, numpy), or 'weak' / 'strong', the training views of each example (jitted on
    the default device), keyed by its position (diagnostics: what the teacher's labels on x_s are worth).
    """
    if split not in EVAL_SPLITS:
      raise ConfigError(f"eval split '{split}' is not one of {list(EVAL_SPLITS)}")
    batch_size = batch_size or self._batch_spec.eval_batch_size
    rows = self._rows(batch_size, 'eval_batch_size')
    key = jax.random.key(_key(self._seed, split, view))

    def prepare(step, images):
      if view == 'eval':
        return self.views.eval(images)
      # Row r of the global batch of step s has the key fold_in(fold_in(key, s), r), whatever the host split.
      return np.asarray(self._eval_split_views(view, images, jax.random.fold_in(key, step), rows[0]))

    batches = self._examples.eval_batches(split, batch_size=batch_size, rows=rows)
    return ({'image': prepare(step, images), 'label': labels, 'mask': mask}
            for step, (images, labels, mask, _) in enumerate(batches))

  def unlabeled_eval_batches(self, batch_size):
    """One pass over the unlabeled pool in pool order, without augmentation (what a teacher's stored targets are
    computed on): image, index (the example's id, `unlabeled_ids`), mask (0: padding of the last batch).

    Host i of n gets rows [i B/n, (i+1) B/n) of every global batch of B, as `eval_batches`."""
    rows = self._rows(batch_size, 'reduced.chunk_size')
    batches = self._examples.eval_batches('unlabeled', batch_size=batch_size, rows=rows)
    return ({'image': self.views.eval(images), 'index': ids, 'mask': mask} for images, _, mask, ids in batches)


# ---- creation -------------------------------------------------------------------------------------------------

def _channel_stats(images):
  count = images.size // images.shape[-1]
  mean = images.sum(axis=(0, 1, 2), dtype=np.float64) / count
  square = np.einsum('nhwc,nhwc->c', images, images, dtype=np.float64) / count
  std = np.sqrt(np.maximum(square - mean**2, 1.0))
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def create(dataset_config, batch_spec, *, seed, process_index=0, process_count=1):
  """The pipeline of `dataset_config` serving `batch_spec` (a `BatchSpec`) for host `process_index` of
  `process_count`; `seed`: the run's seed (batch order and evaluation views)."""
  host_rows(batch_spec.batch_size, process_index, process_count, 'batch_size')
  host_rows(batch_spec.eval_batch_size, process_index, process_count, 'eval_batch_size')
  if dataset_config.augment not in AUGMENTATIONS:   # before any data is read; the source is checked by its reader
    raise ConfigError(f"dataset.augment: unknown augmentation '{dataset_config.augment}'; choose one of "
                      f'{list(AUGMENTATIONS)}')
  stored_size = augment.stored_size(dataset_config.augment, dataset_config.image_size)
  split_pools = lambda labels: split_indices(
      labels, dataset_config.num_classes, num_labeled=dataset_config.num_labeled,
      num_validation=dataset_config.num_validation, num_unlabeled=dataset_config.num_unlabeled,
      seed=dataset_config.split_seed)
  examples = data_sources.open_examples(dataset_config, stored_size, split_pools)
  if examples.vectors:
    mean = std = None
  elif examples.train_images is not None:
    mean, std = _channel_stats(examples.train_images)
  else:
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  views = Views(kind='none' if examples.vectors else dataset_config.augment, image_size=dataset_config.image_size,
                pad=dataset_config.pad_crop, num_ops=dataset_config.randaugment_num_ops,
                magnitude=float(dataset_config.randaugment_magnitude), cutout_size=dataset_config.cutout_size,
                mean=mean, std=std)
  input_shape = ((examples.vector_size,) if examples.vectors
                 else (dataset_config.image_size, dataset_config.image_size, 3))
  return Pipeline(dataset_config, batch_spec, seed, examples, views, input_shape=input_shape,
                  process_index=process_index, process_count=process_count,
                  stored_size=None if examples.vectors else stored_size)
