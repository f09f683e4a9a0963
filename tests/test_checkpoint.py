"""checkpoint.py: round trip, fallback past a damaged newest checkpoint, incompatible workdirs, SIGTERM flag."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_pseudo_labels import errors
from meta_pseudo_labels.rundir import checkpoint
from meta_pseudo_labels.rundir import run_directory


def _state(value):
  return {'params': {'w': jnp.full((3, 4), value, jnp.float32)}, 'step': jnp.asarray(int(value), jnp.int32)}


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _save_steps(directory, steps, keep=5):
  ckpt = checkpoint.Checkpointer(directory, keep=keep)
  for s in steps:
    ckpt.save(s, _state(s), {'phase': 'mpl', 'step': s})
  ckpt.close()


def test_round_trip_restores_newest_with_extra(tmp_path):
  _save_steps(tmp_path / 'ckpt', [1, 2, 3])
  ckpt = checkpoint.Checkpointer(tmp_path / 'ckpt', keep=5)
  assert ckpt.latest_step() == 3
  state, extra, step = ckpt.restore(None, _abstract(_state(0)))
  ckpt.close()
  assert step == 3 and extra == {'phase': 'mpl', 'step': 3}
  np.testing.assert_array_equal(state['params']['w'], np.full((3, 4), 3.0))
  assert int(state['step']) == 3


def test_keep_limits_the_number_of_checkpoints(tmp_path):
  _save_steps(tmp_path / 'ckpt', [1, 2, 3, 4], keep=2)
  assert checkpoint.Checkpointer(tmp_path / 'ckpt', keep=2).all_steps() == [3, 4]


def test_empty_directory_restores_nothing(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / 'ckpt', keep=2)
  assert ckpt.latest_step() is None and ckpt.restore(None, _abstract(_state(0))) is None
  ckpt.close()


def _damage(step_dir):
  """Truncates every data file of a finalised checkpoint (what a full disk or a partial copy leaves)."""
  damaged = 0
  for root, _, files in os.walk(step_dir):
    for name in files:
      if name not in ('_CHECKPOINT_METADATA',):
        with open(os.path.join(root, name), 'wb'):
          damaged += 1
  assert damaged


def test_damaged_newest_falls_back_to_previous_with_warning(tmp_path, caplog):
  directory = tmp_path / 'ckpt'
  _save_steps(directory, [1, 2])
  _damage(directory / '2')
  ckpt = checkpoint.Checkpointer(directory, keep=5)
  with caplog.at_level('WARNING'):
    state, extra, step = ckpt.restore(None, _abstract(_state(0)))
  assert step == 1 and extra['step'] == 1
  np.testing.assert_array_equal(state['params']['w'], np.full((3, 4), 1.0))
  assert any('instead of the unreadable newer checkpoint(s) [2]' in r.getMessage() for r in caplog.records)
  # The damaged step is kept aside for inspection, and the run can save step 2 again.
  assert (directory / '2.corrupt').is_dir() and ckpt.all_steps() == [1]
  ckpt.save(2, _state(2), {'step': 2})
  ckpt.wait()
  assert ckpt.restore(None, _abstract(_state(0)))[2] == 2
  ckpt.close()


def test_all_checkpoints_unreadable_is_a_one_line_error(tmp_path):
  directory = tmp_path / 'ckpt'
  _save_steps(directory, [1])
  _damage(directory / '1')
  ckpt = checkpoint.Checkpointer(directory, keep=5)
  with pytest.raises(errors.CheckpointError) as e:
    ckpt.restore(None, _abstract(_state(0)))
  ckpt.close()
  assert '\n' not in str(e.value) and 'no readable checkpoint' in str(e.value)
  assert (directory / '1').is_dir()   # nothing deleted


def test_half_written_save_is_ignored(tmp_path):
  directory = tmp_path / 'ckpt'
  _save_steps(directory, [1])
  (directory / '2.orbax-checkpoint-tmp-123').mkdir()   # what a kill during a save leaves behind
  ckpt = checkpoint.Checkpointer(directory, keep=5)
  assert ckpt.restore(None, _abstract(_state(0)))[2] == 1
  ckpt.close()


def test_incompatible_config_is_refused_and_compatible_differences_listed(tmp_path):
  config = {'method': 'mpl', 'model': {'name': 'wrn28_2'}, 'num_train_steps': 10}
  rundir = run_directory.RunDirectory(tmp_path)
  assert rundir.check_compatible(config) == []
  rundir.write_config(config)
  longer = dict(config, num_train_steps=20)
  assert rundir.check_compatible(longer) == ['num_train_steps']
  rematerialised = dict(config, model={'name': 'wrn28_2', 'remat': 'block'})   # memory, not state: resumes
  assert rundir.check_compatible(rematerialised) == []
  other_model = dict(config, model={'name': 'resnet18'})
  with pytest.raises(errors.CheckpointError, match=r"model=\{'name': 'wrn28_2'\}.*use a new --workdir"):
    rundir.check_compatible(other_model)
  assert (tmp_path / 'config.json').read_text().count('wrn28_2') == 1


def test_sigterm_sets_the_preemption_flag_without_exiting(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / 'ckpt', keep=1)
  assert not ckpt.reached_preemption(0)
  os.kill(os.getpid(), signal.SIGTERM)
  assert ckpt.reached_preemption(1)
  ckpt.close()
  assert signal.getsignal(signal.SIGTERM) is not ckpt._on_sigterm  # pylint: disable=protected-access


def test_a_url_reaches_orbax_unchanged():
  """`os.path.abspath('gs://b/r')` is '<cwd>/gs:/b/r': the checkpointer must keep the URL (tests/test_remote_workdir.py
  runs a whole training on one)."""
  assert str(run_directory.RunDirectory('gs://bucket/run').checkpoints('mpl')) == 'gs://bucket/run/checkpoints/mpl'
  assert str(run_directory.as_path('relative/run')) == os.path.abspath('relative/run')


def test_event_files_damaged_at_the_tail_keep_what_was_read(tmp_path):
  """One reader of event files (run_report, the sweeps): a killed process's truncated tail costs only that tail."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  writer = tf.summary.create_file_writer(str(tmp_path))
  with writer.as_default():
    for step in range(3):
      tf.summary.scalar('loss', float(step), step=step)
  writer.close()
  path, = tmp_path.glob('events.out.tfevents.*')
  assert run_directory.read_scalars(tmp_path) == {'loss': {0: 0.0, 1: 1.0, 2: 2.0}}
  intact = path.read_bytes()
  path.write_bytes(intact[:-7])   # the last record cut short
  assert run_directory.read_scalars(tmp_path) == {'loss': {0: 0.0, 1: 1.0}}
  flipped = bytearray(intact)
  flipped[-10] ^= 0xFF   # a byte of the last record's data: its checksum fails
  path.write_bytes(bytes(flipped))
  assert run_directory.read_scalars(tmp_path) == {'loss': {0: 0.0, 1: 1.0}}
