"""Reduced MPL end to end, quick: a teacher trained a few steps, its targets precomputed, Reduced MPL and finetuning.

An in-test dataset (3 Gaussian blobs of 6-d vectors in an .npz, the registry's MLP) keeps every compile small. Also:
the precompute's resume after a kill (the same bytes as an uninterrupted precompute), the join's determinism
across a resume, and the one-line errors for targets and teachers that do not fit.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from meta_pseudo_labels import errors
from meta_pseudo_labels.data import input_pipeline
from meta_pseudo_labels.experiments import precompute_targets
from meta_pseudo_labels.models import reduced_teacher
from meta_pseudo_labels.run import train
from meta_pseudo_labels.trained import teacher_targets
from meta_pseudo_labels.trained import trained_models

NUM_CLASSES = 3
CHUNK = 64


def _blobs(path, n=400, dim=6):
  rng = np.random.default_rng(0)
  labels = np.arange(n) % NUM_CLASSES
  centres = 2.0 * rng.normal(size=(NUM_CLASSES, dim))
  x = (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32)
  np.savez(path, x_train=x[:300], y_train=labels[:300], x_test=x[300:], y_test=labels[300:])
  return str(path)


def _config(data, **changes):
  config = common.get_base_config()
  config.dataset.source = 'npz'
  config.dataset.data_dir = data
  config.dataset.num_classes = NUM_CLASSES
  config.dataset.num_labeled = 32
  config.dataset.num_validation = 32
  config.dataset.augment = 'none'
  config.model.name = 'mlp'
  config.model.dropout_rate = 0.0
  config.batch_size = 8
  config.uda_ratio = 2
  config.eval_batch_size = 32
  config.uda.weight = 0.0
  config.num_train_steps = 4
  config.teacher_optimizer = common.optimizer_config(learning_rate=0.1, warmup_steps=0)
  config.student_optimizer = common.optimizer_config(learning_rate=0.1, warmup_steps=0)
  config.finetune.num_steps = 2
  config.finetune.batch_size = 8
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.reduced.chunk_size = CHUNK
  config.reduced.top_k = 2
  config.reduced.hidden_sizes = (8,)
  for field, value in changes.items():
    node = config
    *parents, leaf = field.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  root = tmp_path_factory.mktemp('reduced')
  data = _blobs(root / 'blobs.npz')
  workdir = root / 'teacher'
  train.train_and_evaluate(_config(data, method='supervised', **{'finetune.num_steps': 0}), str(workdir))
  return data, f'{workdir}:model_ema'


def _precompute(data, teacher_reference, targets_dir):
  config = _config(data, experiment='precompute_targets', **{'reduced.teacher': teacher_reference})
  return precompute_targets.run(config, str(targets_dir))


def test_precompute_then_reduced_mpl_and_finetuning_and_a_crash_resumes_to_the_same_metrics(teacher, tmp_path,
                                                                                              monkeypatch):
  data, reference = teacher
  assert _precompute(data, reference, tmp_path / 'targets') == 4   # 236 unlabeled examples, chunks of 64
  metadata = json.loads((tmp_path / 'targets' / teacher_targets.METADATA_FILENAME).read_text())
  assert metadata['num_examples'] == 236 and metadata['network'] == 'model_ema'
  config = _config(data, **{'mpl.teacher': 'reduced', 'reduced.targets_dir': str(tmp_path / 'targets')})
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert set(results['final']['test']) == {'student', 'student_ema', 'student_finetuned'}   # no image teacher

  def crash_after_step_3_of_mpl(phase_name):   # after the checkpoint of step 2: the rerun resumes there
    def hook(step, ckpt):
      if phase_name == 'mpl' and step == 3:
        ckpt.wait()
        raise KeyboardInterrupt('crash')
    return hook
  monkeypatch.setattr(train, '_fault_point', crash_after_step_3_of_mpl)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'crashed'))
  monkeypatch.undo()
  resumed = train.train_and_evaluate(config, str(tmp_path / 'crashed'))
  assert resumed['final'] == results['final']


def test_a_killed_precompute_resumes_to_the_same_bytes(teacher, tmp_path, monkeypatch):
  data, reference = teacher
  _precompute(data, reference, tmp_path / 'whole')
  write_chunk, written = teacher_targets.write_chunk, []

  def killed_after_two(*args):
    if len(written) == 2:
      raise KeyboardInterrupt('killed')
    written.append(args[1])
    write_chunk(*args)
  monkeypatch.setattr(teacher_targets, 'write_chunk', killed_after_two)
  with pytest.raises(KeyboardInterrupt):
    _precompute(data, reference, tmp_path / 'resumed')
  monkeypatch.setattr(teacher_targets, 'write_chunk', write_chunk)
  assert sorted(p.name for p in (tmp_path / 'resumed').glob('chunk-*')) == ['chunk-000000.npz', 'chunk-000001.npz']
  assert _precompute(data, reference, tmp_path / 'resumed') == 2   # the two finished chunks are kept
  for path in sorted((tmp_path / 'whole').iterdir()):
    assert (tmp_path / 'resumed' / path.name).read_bytes() == path.read_bytes(), path.name


def test_the_join_is_the_same_in_a_resumed_run(teacher, tmp_path):
  data, reference = teacher
  _precompute(data, reference, tmp_path / 'targets')
  config = _config(data, **{'mpl.teacher': 'reduced', 'reduced.targets_dir': str(tmp_path / 'targets')})
  pipeline = input_pipeline.create(config)
  targets = teacher_targets.load(config.reduced.targets_dir, pool_ids=pipeline.unlabeled_ids(),
                                 num_classes=NUM_CLASSES, top_k=2)
  whole = teacher_targets.joined_batches(pipeline.mpl_batches(0, with_unlabeled_index=True), targets)
  third = [next(whole) for _ in range(3)][2]
  resumed = next(teacher_targets.joined_batches(pipeline.mpl_batches(2, with_unlabeled_index=True), targets))
  assert set(resumed) == {'labeled_image', 'labeled_label', 'unlabeled_strong', 'unlabeled_targets'}
  for key in ('labeled_image', 'unlabeled_strong'):
    np.testing.assert_array_equal(resumed[key], third[key])
  for key, value in third['unlabeled_targets'].items():
    np.testing.assert_array_equal(resumed['unlabeled_targets'][key], value)
  # The targets joined to an example are its own: the row of its id in the stored (pool-order) arrays.
  ids = next(pipeline.mpl_batches(2, with_unlabeled_index=True))['unlabeled_index']
  rows = np.searchsorted(pipeline.unlabeled_ids(), ids)
  np.testing.assert_array_equal(resumed['unlabeled_targets']['top_classes'], targets.arrays['top_classes'][rows])


def _one_line(error_info, *fragments):
  message = str(error_info.value)
  assert '\n' not in message and isinstance(error_info.value, errors.MplError), message
  for fragment in fragments:
    assert fragment in message, message


def test_targets_and_teachers_that_do_not_fit_are_one_line_errors(teacher, tmp_path):
  data, reference = teacher
  targets_dir = tmp_path / 'targets'
  _precompute(data, reference, targets_dir)
  pool_ids = input_pipeline.create(_config(data)).unlabeled_ids()
  load = lambda directory=targets_dir, ids=pool_ids, num_classes=NUM_CLASSES: teacher_targets.load(
      directory, pool_ids=ids, num_classes=num_classes, top_k=2)
  with pytest.raises(errors.DataError) as missing:
    load(tmp_path / 'nothing')
  _one_line(missing, 'targets.json', 'precompute_targets')
  with pytest.raises(errors.DataError) as count:
    load(ids=pool_ids[:-1])
  _one_line(count, 'targets of 236 unlabeled examples', '235')
  with pytest.raises(errors.DataError) as wrong_ids:
    load(ids=pool_ids + 1)
  _one_line(wrong_ids, 'ids differ')
  with pytest.raises(errors.DataError) as classes:
    load(num_classes=NUM_CLASSES + 1)
  _one_line(classes, '3 classes', 'dataset.num_classes is 4')
  (targets_dir / 'chunk-000002.npz').unlink()
  with pytest.raises(errors.DataError) as unfinished:
    load()
  _one_line(unfinished, '1 of 4 target files missing', 'rerun')
  with pytest.raises(errors.MplError) as no_teacher:
    _precompute(data, str(tmp_path / 'no_such_run'), tmp_path / 'out')
  _one_line(no_teacher, 'no_such_run')
  empty_run = tmp_path / 'empty_run'
  empty_run.mkdir()
  teacher_dir = reference.rpartition(':')[0]
  shutil.copy(f'{teacher_dir}/config.json', empty_run / 'config.json')
  with pytest.raises(errors.MplError) as no_checkpoint:
    _precompute(data, f'{empty_run}:model_ema', tmp_path / 'out')
  _one_line(no_checkpoint, 'checkpoint')
  with pytest.raises(errors.ConfigError) as wrong_classes:
    precompute_targets.run(_config(data, **{'reduced.teacher': reference, 'dataset.num_classes': 4}),
                           str(tmp_path / 'out4'))
  _one_line(wrong_classes, 'the teacher has 3 classes')


def test_stored_targets_are_the_teachers_on_the_example_with_that_id(teacher, tmp_path):
  """An id is the example's index in the training split: T on x_train[id] gives the targets stored under id."""
  data, reference = teacher
  _precompute(data, reference, tmp_path / 'targets')
  pool_ids = input_pipeline.create(_config(data)).unlabeled_ids()
  targets = teacher_targets.load(tmp_path / 'targets', pool_ids=pool_ids, num_classes=NUM_CLASSES, top_k=2)
  network = trained_models.load(reference)
  with np.load(data) as npz:
    logits = network.module().apply(network.variables, npz['x_train'][pool_ids], train=False)
  expected = jax.device_get(reduced_teacher.top_k_targets(logits, 2))
  np.testing.assert_array_equal(targets.arrays['top_classes'], expected['top_classes'])
  np.testing.assert_allclose(targets.arrays['top_log_probs'].astype(np.float32),
                             expected['top_log_probs'].astype(np.float32), atol=2e-3)


@pytest.mark.parametrize('in_memory', [True, False])
def test_unlabeled_ids_in_memory_and_streaming_with_an_extra_pool(in_memory):
  """The pool's ids (the extra TFDS pool numbered after train) are what the precompute's pass and the MPL batches
  carry, on one host and split over two."""
  config = common.get_base_config()
  config.batch_size, config.uda_ratio, config.eval_batch_size = 4, 2, 8
  config.dataset.update(dict(num_labeled=20, num_validation=10, cutout_size=8, in_memory=in_memory,
                             shuffle_buffer=16, unlabeled_source='svhn_cropped:extra'))
  with tfds.testing.mock_data(num_examples=60):
    pipeline = input_pipeline.create(config)
    ids = pipeline.unlabeled_ids()
    assert len(ids) == 30 + 60 and np.all(np.diff(ids) > 0) and ids[-1] == 60 + 59
    passed = [batch['index'][batch['mask'] > 0] for batch in pipeline.unlabeled_eval_batches(16)]
    np.testing.assert_array_equal(np.concatenate(passed), ids)
    hosts = [input_pipeline.create(config, process_index=i, process_count=2) for i in range(2)]
    first = next(hosts[0].unlabeled_eval_batches(16))
    assert first['index'].tolist() == ids[:8].tolist()   # host 0: rows 0..7 of the first batch of 16
    batch = next(pipeline.mpl_batches(3, with_unlabeled_index=True))
    assert batch['unlabeled_index'].dtype == np.int32 and np.isin(batch['unlabeled_index'], ids).all()
    halves = [next(host.mpl_batches(3, with_unlabeled_index=True))['unlabeled_index'] for host in hosts]
    np.testing.assert_array_equal(np.concatenate(halves), batch['unlabeled_index'])


@pytest.mark.parametrize('flags, message', [
    (('--config.experiment=precompute_targets',), 'error: reduced.teacher: empty'),
    (('--config.experiment=train', '--config.mpl.teacher=reduced', '--config.uda.weight=0'),
     'error: reduced.targets_dir: empty'),
    (('--config.experiment=train', '--config.mpl.teacher=reduced', '--config.uda.weight=1'),
     'error: uda.weight: the reduced teacher'),
])
def test_the_two_commands_refuse_missing_inputs_in_one_line(tmp_path, flags, message):
  completed = subprocess.run(
      [sys.executable, '-m', 'meta_pseudo_labels.main', '--config=configs/two_moons.py', f'--workdir={tmp_path}',
       *flags], cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), check=False)
  assert completed.returncode == errors.USER_ERROR_EXIT_CODE, completed.stderr[-2000:]
  assert completed.stderr.strip().splitlines()[-1].startswith(message), completed.stderr[-2000:]
