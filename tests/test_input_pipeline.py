"""input_pipeline.py: splits, batch contents, bitwise resume, multi-host slices, every source through create()."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from meta_pseudo_labels.data import data_sources
from meta_pseudo_labels.data import input_pipeline
from meta_pseudo_labels.errors import ConfigError, DataError
from mock_tfds_main import mock_as_dataset  # pylint: disable=g-bad-import-order
from test_data_sources import write_image_folder  # pylint: disable=g-bad-import-order

MPL_KEYS = ('labeled_image', 'labeled_label', 'unlabeled_weak', 'unlabeled_strong')


def _config(**dataset):
  config = common.get_base_config()
  config.batch_size, config.uda_ratio, config.eval_batch_size = 4, 2, 8
  config.finetune.batch_size = 6
  config.dataset.update(dict(num_labeled=20, num_validation=10, cutout_size=8), **dataset)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _one_line(error_info, *fragments):
  message = str(error_info.value)
  assert '\n' not in message
  for fragment in fragments:
    assert fragment in message, (fragment, message)


# ---- splits ---------------------------------------------------------------------------------------------------

def test_split_indices_are_disjoint_balanced_and_seeded():
  labels = np.random.default_rng(0).choice(10, size=1000, p=np.linspace(1, 3, 10) / 20)
  pools = input_pipeline.split_indices(labels, 10, num_labeled=43, num_validation=100, seed=5)
  labeled, validation, unlabeled = pools['labeled'], pools['validation'], pools['unlabeled']
  assert (len(labeled), len(validation), len(unlabeled)) == (43, 100, 857)
  assert len(np.unique(np.concatenate([labeled, validation, unlabeled]))) == 1000
  assert np.bincount(labels[labeled]).tolist() == [5, 5, 5, 4, 4, 4, 4, 4, 4, 4]  # remainder to classes 0..2
  again = input_pipeline.split_indices(labels, 10, num_labeled=43, num_validation=100, seed=5)
  other = input_pipeline.split_indices(labels, 10, num_labeled=43, num_validation=100, seed=6)
  assert all(np.array_equal(pools[k], again[k]) for k in pools)
  assert not np.array_equal(labeled, other['labeled'])
  some = input_pipeline.split_indices(labels, 10, num_labeled=43, num_validation=100, num_unlabeled=50, seed=5)
  assert len(some['unlabeled']) == 50 and np.isin(some['unlabeled'], unlabeled).all()


@pytest.mark.parametrize('kwargs, error, fragment', [
    (dict(num_labeled=20, num_validation=90), ConfigError, 'dataset.num_validation=90'),
    (dict(num_labeled=30, num_validation=0), DataError, 'class 9 has 1 training examples'),
    (dict(num_labeled=10, num_validation=10, num_unlabeled=90), ConfigError, 'dataset.num_unlabeled=90'),
])
def test_split_errors_name_the_field(kwargs, error, fragment):
  labels = np.concatenate([np.repeat(np.arange(9), 11), [9]])  # 100 examples, class 9 has one
  with pytest.raises(error) as info:
    input_pipeline.split_indices(labels, 10, **kwargs)
  _one_line(info, fragment)


# ---- batch contents on identifiable examples -------------------------------------------------------------------

def _identifiable_npz(path, num_train=200, num_test=13, num_classes=4):
  """Vectors [id, label, 0]: train ids 0..199, test ids 1000+; classes of unequal size."""
  rng = np.random.default_rng(1)
  arrays = {}
  for split, size, offset in (('train', num_train, 0), ('test', num_test, 1000)):
    labels = rng.choice(num_classes, size=size, p=[0.1, 0.2, 0.3, 0.4])
    arrays[f'x_{split}'] = np.stack([offset + np.arange(size), labels, np.zeros(size)], 1).astype(np.float32)
    arrays[f'y_{split}'] = labels
  np.savez(path, **arrays)
  return arrays


def _ids(batches, key='image'):
  return np.concatenate([b[key][b['mask'] > 0, 0] if 'mask' in b else b[key][:, 0] for b in batches]).astype(int)


def test_splits_disjoint_balanced_and_epochs_are_permutations(tmp_path):
  path = str(tmp_path / 'ids.npz')
  arrays = _identifiable_npz(path)
  config = _config(source='npz', data_dir=path, num_classes=4, num_labeled=20, num_validation=30)
  config.batch_size, config.uda_ratio = 5, 3  # 20 labeled = 4 steps, 150 unlabeled = 10 steps
  pipeline = input_pipeline.create(config)
  assert pipeline.input_shape == (3,) and pipeline.num_classes == 4
  assert pipeline.split_sizes == {'train_labeled': 20, 'validation': 30, 'unlabeled': 150, 'test': 13}
  labeled = _ids(pipeline.eval_batches('train_labeled'))
  validation = _ids(pipeline.eval_batches('validation'))
  test = _ids(pipeline.eval_batches('test'))
  batches = _take(pipeline.mpl_batches(0), 20)
  for batch in batches:  # vectors: no augmentation, both views are the inputs, labels are the inputs' labels
    np.testing.assert_array_equal(batch['unlabeled_weak'], batch['unlabeled_strong'])
    np.testing.assert_array_equal(batch['labeled_label'], batch['labeled_image'][:, 1].astype(int))
    np.testing.assert_array_equal(batch['labeled_image'], arrays['x_train'][batch['labeled_image'][:, 0].astype(int)])
  unlabeled_epochs = [_ids(batches[e * 10:(e + 1) * 10], 'unlabeled_weak') for e in range(2)]
  labeled_epochs = [_ids(batches[e * 4:(e + 1) * 4], 'labeled_image') for e in range(5)]
  # Each epoch visits its pool exactly once, in a new order.
  assert all(sorted(epoch) == sorted(labeled) for epoch in labeled_epochs)
  assert sorted(unlabeled_epochs[0]) == sorted(unlabeled_epochs[1])
  assert not np.array_equal(unlabeled_epochs[0], unlabeled_epochs[1])
  unlabeled = set(unlabeled_epochs[0])
  assert len(labeled) == 20 and len(validation) == 30 and len(unlabeled) == 150
  assert set(labeled) | set(validation) | unlabeled == set(range(200))
  assert len(set(labeled) | set(validation) | unlabeled) == 200  # pairwise disjoint
  assert sorted(test) == list(range(1000, 1013))
  assert np.bincount(arrays['y_train'][labeled]).tolist() == [5, 5, 5, 5]


def test_eval_batches_pad_the_last_batch():
  config = _config(source='two_moons', num_classes=2, num_labeled=6, num_validation=10)
  pipeline = input_pipeline.create(config)
  batches = list(pipeline.eval_batches('validation'))
  assert [len(b['mask']) for b in batches] == [8, 8]
  assert batches[1]['mask'].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
  assert batches[0]['image'].dtype == np.float32 and batches[0]['label'].dtype == np.int32
  assert sum(b['mask'].sum() for b in pipeline.eval_batches('test')) == 2000
  with pytest.raises(ConfigError):
    pipeline.eval_batches('unlabeled')


def test_empty_unlabeled_pool_is_an_error(tmp_path):
  path = str(tmp_path / 'ids.npz')
  _identifiable_npz(path, num_train=40)
  pipeline = input_pipeline.create(_config(source='npz', data_dir=path, num_classes=4, num_labeled=8,
                                           num_validation=32))
  with pytest.raises(DataError) as info:
    pipeline.mpl_batches(0)
  _one_line(info, 'unlabeled pool is empty')
  assert next(pipeline.labeled_batches(0, 4))['labeled_image'].shape == (4, 3)


# ---- images: resume, hosts, streaming ---------------------------------------------------------------------------

def _check_image_batch(batch, batch_size, uda_ratio, size=32):
  assert batch['labeled_image'].shape == (batch_size, size, size, 3)
  assert batch['unlabeled_weak'].shape == batch['unlabeled_strong'].shape == (uda_ratio * batch_size, size, size, 3)
  assert all(batch[k].dtype == np.float32 for k in ('labeled_image', 'unlabeled_weak', 'unlabeled_strong'))
  assert batch['labeled_label'].dtype == np.int32
  assert not np.array_equal(batch['unlabeled_weak'], batch['unlabeled_strong'])
  assert np.abs(batch['unlabeled_weak']).max() < 5  # standardised, not 0..255


def _check_resume_and_hosts(config, host_counts=(2, 4), host_steps=(0, 3)):
  pipeline = input_pipeline.create(config)
  run = _take(pipeline.mpl_batches(0), 6)  # 12 unlabeled per step over a pool of 30: crosses epochs
  _check_image_batch(run[0], config.batch_size, config.uda_ratio, config.dataset.image_size)
  for step in (1, 5):
    _assert_batches_equal(next(pipeline.mpl_batches(step)), run[step])
  fresh = input_pipeline.create(config)  # a restarted process
  _assert_batches_equal(next(fresh.mpl_batches(4)), run[4])
  finetune = _take(pipeline.labeled_batches(0, 6), 5)
  _assert_batches_equal(next(pipeline.labeled_batches(4, 6)), finetune[4])
  evaluation = list(pipeline.eval_batches('test'))
  for count in host_counts:
    hosts = [input_pipeline.create(config, process_index=i, process_count=count) for i in range(count)]
    for step in host_steps:
      slices = [next(host.mpl_batches(step)) for host in hosts]
      _assert_batches_equal({k: np.concatenate([s[k] for s in slices]) for k in MPL_KEYS}, run[step])
    host_eval = [list(host.eval_batches('test')) for host in hosts]
    for i, batch in enumerate(evaluation):
      _assert_batches_equal({k: np.concatenate([h[i][k] for h in host_eval]) for k in batch}, batch)
  return pipeline


def test_in_memory_cifar10_resume_and_multi_host():
  with tfds.testing.mock_data(num_examples=60):
    pipeline = _check_resume_and_hosts(_config(), host_counts=(4,))
    assert pipeline.split_sizes == {'train_labeled': 20, 'validation': 10, 'unlabeled': 30, 'test': 60}
    assert sum(b['mask'].sum() for b in pipeline.eval_batches('test')) == 60


def test_streaming_cifar10_resume_and_multi_host():
  with tfds.testing.mock_data(num_examples=60):
    # Fewer host checks than in memory: every streaming pipeline re-reads the split (the slicing code is shared).
    pipeline = _check_resume_and_hosts(_config(in_memory=False, shuffle_buffer=16), host_counts=(2,),
                                       host_steps=(3,))
    labeled = np.concatenate([b['label'][b['mask'] > 0] for b in pipeline.eval_batches('train_labeled')])
    assert len(labeled) == 20 and np.bincount(labeled, minlength=10).tolist() == [2] * 10


def test_indivisible_batch_names_the_field():
  config = _config(source='two_moons', num_classes=2, num_labeled=6)
  config.batch_size = 6
  with pytest.raises(ConfigError) as info:
    input_pipeline.create(config, process_index=0, process_count=4)
  _one_line(info, 'batch_size=6')
  config.batch_size, config.eval_batch_size = 8, 10
  with pytest.raises(ConfigError) as info:
    input_pipeline.create(config, process_index=0, process_count=4)
  _one_line(info, 'eval_batch_size=10')


@pytest.mark.parametrize('in_memory', [True, False])
def test_imagenet_preprocessing(in_memory):
  # ImageNet's builder with labels i mod 10 (TFDS's default mock draws labels at random, so some of 1000 classes
  # would have no example for the class-balanced labeled subset).
  config = _config(name='imagenet2012', num_classes=10, num_labeled=10, num_validation=0, augment='imagenet',
                   image_size=24, in_memory=in_memory, shuffle_buffer=16)
  with tfds.testing.mock_data(as_dataset_fn=mock_as_dataset(40, image_size=40, max_classes=10)):
    pipeline = input_pipeline.create(config)
    batch = next(pipeline.mpl_batches(0))
    _check_image_batch(batch, 4, 2, size=24)
    evaluation = next(pipeline.eval_batches('test'))
  assert evaluation['image'].shape == (8, 24, 24, 3)


def test_svhn_and_unlabeled_source_extend_the_pool():
  config = _config(name='svhn_cropped', unlabeled_source='svhn_cropped:extra')
  with tfds.testing.mock_data(num_examples=40):
    pipeline = input_pipeline.create(config)
    assert pipeline.split_sizes['unlabeled'] == 10 + 40
    _check_image_batch(next(pipeline.mpl_batches(0)), 4, 2)


def test_folder_source_through_create(tmp_path):
  write_image_folder(str(tmp_path), per_class=8, size=20)
  config = _config(source='folder', data_dir=str(tmp_path), num_classes=3, num_labeled=6, num_validation=3,
                   image_size=16)
  pipeline = input_pipeline.create(config)
  assert pipeline.split_sizes == {'train_labeled': 6, 'validation': 3, 'unlabeled': 15, 'test': 24}
  _check_image_batch(next(pipeline.mpl_batches(0)), 4, 2, size=16)
  labels = np.concatenate([b['labeled_label'] for b in _take(pipeline.labeled_batches(0, 6), 1)])
  assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_folder_source_with_a_tfds_unlabeled_pool(tmp_path, monkeypatch):
  """The extra TFDS pool of a folder (or .npz) run comes from TFDS's default data_dir, not from the folder."""
  write_image_folder(str(tmp_path), per_class=8, size=20)
  opened = []
  tfds_builder = data_sources.tfds_builder
  monkeypatch.setattr(data_sources, 'tfds_builder',
                      lambda name, data_dir: opened.append((name, data_dir)) or tfds_builder(name, data_dir))
  config = _config(source='folder', data_dir=str(tmp_path), num_classes=3, num_labeled=6, num_validation=3,
                   image_size=16, unlabeled_source='svhn_cropped:extra')
  with tfds.testing.mock_data(num_examples=10):
    pipeline = input_pipeline.create(config)
    batch = next(pipeline.mpl_batches(0))
  assert batch['unlabeled_strong'].shape == (8, 16, 16, 3)
  assert opened == [('svhn_cropped', '')]
  assert pipeline.split_sizes['unlabeled'] == 15 + 10


def test_digits_source_through_create():
  config = _config(source='digits', num_classes=10, image_size=8, augment='digits', pad_crop=1, cutout_size=3)
  pipeline = input_pipeline.create(config)
  assert pipeline.split_sizes == {'train_labeled': 20, 'validation': 10, 'unlabeled': 1267, 'test': 500}
  assert pipeline.input_shape == (8, 8, 3)
  batch = next(pipeline.mpl_batches())
  assert batch['labeled_image'].shape == (4, 8, 8, 3) and batch['unlabeled_strong'].shape == (8, 8, 8, 3)
  assert batch['labeled_image'].dtype == np.float32
  assert sum(len(b['label']) for b in pipeline.eval_batches('test')) == 504   # 63 batches of 8, the last padded
  # The training views of the eval splits (diagnostics): seeded by position, so repeatable, and not the eval view.
  views = {view: next(pipeline.eval_batches('validation', view=view))['image'] for view in ('eval', 'strong')}
  np.testing.assert_array_equal(views['strong'], next(pipeline.eval_batches('validation', view='strong'))['image'])
  assert not np.array_equal(views['eval'], views['strong'])
