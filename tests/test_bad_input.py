"""Bad input (issue 3): each mistake ends the program with one line naming the field or path and the fix, exit code
2, before any expensive work, and nothing in the workdir changed.

A few mistakes go through the real command line (`python -m meta_pseudo_labels.main`), with a workdir that already
holds a run's files which must stay byte-identical; the rest call the same checks in-process (`main` reaches them
through the same functions: config_validation.validate, input_pipeline.create, RunDirectory.prepare,
RunDirectory.check_compatible).
"""
import gc
import hashlib
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import cifar10_4k
from configs import two_moons
from meta_pseudo_labels import errors
from meta_pseudo_labels.run import config_validation
from meta_pseudo_labels.rundir import checkpoint
from meta_pseudo_labels.rundir import run_directory

REPO = pathlib.Path(__file__).resolve().parents[1]
TWO_MOONS = ('--config=configs/two_moons.py', '--config.experiment=train', '--config.num_train_steps=4')


@pytest.fixture(autouse=True)
def _finalize_abandoned_restores():
  """A refused checkpoint leaves orbax's restore coroutines unfinished. Garbage-collected later, in the middle of an
  import in another test of this worker, they made Python 3.11's import lock raise KeyError (fresh-clone CI,
  2026-12-06, in test_checkpoints_that_do_not_continue_this_run_are_refused_before_training): collect them here."""
  yield
  gc.collect()


# ---- helpers --------------------------------------------------------------------------------------------------

def _snapshot(directory):
  """Every file under `directory` with its sha256 (what 'nothing in the workdir destroyed' compares)."""
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(directory).rglob('*')) if p.is_file()}


def _populated_workdir(path, config_dict=None):
  """A workdir as an earlier run leaves it: checkpoint files, results, events, the user's notes."""
  for name, content in {'checkpoints/mpl/3/state/manifest.ocdbt': b'\x00ckpt', 'results.json': b'{"final": {}}',
                        'tensorboard/events.out.tfevents.1': b'\x01events', 'notes.txt': b'mine'}.items():
    (path / name).parent.mkdir(parents=True, exist_ok=True)
    (path / name).write_bytes(content)
  if config_dict is not None:
    run_directory.RunDirectory(path).write_config(config_dict)
  return path


def _main(workdir, *flags, env=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', **(env or {}))
  env.pop('MPL_INJECT_FAULT', None)
  command = [sys.executable, '-m', 'meta_pseudo_labels.main', *flags, f'--workdir={workdir}']
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def _assert_one_line_error(completed, *fragments):
  assert completed.returncode == 2, completed.stderr[-3000:]
  assert 'Traceback' not in completed.stderr, completed.stderr[-3000:]
  assert 'training steps' not in completed.stderr   # stopped before compiling or training anything
  line = completed.stderr.strip().splitlines()[-1]
  assert line.startswith('error: '), completed.stderr[-3000:]
  for fragment in fragments:
    assert fragment in line, line
  return line


def _readonly_dir(tmp_path):
  """An existing directory this process cannot write to (root ignores permission bits: use a read-only mount)."""
  if os.geteuid() != 0:
    path = tmp_path / 'readonly'
    path.mkdir()
    path.chmod(0o555)
    return path
  for path in (pathlib.Path('/sys/kernel'), pathlib.Path('/proc/sys')):
    try:
      (path / '.mpl_write_test').write_text('')
    except OSError:
      return path
    os.remove(path / '.mpl_write_test')
  pytest.skip('no read-only directory to test with (running as root, no read-only mount)')


def _npz_file(path, x, labels, x_test=None, y_test=None):
  """An .npz source; the test split is the first 4 training examples unless given."""
  labels = np.asarray(labels, np.int64)
  np.savez(path, x_train=x, y_train=labels, x_test=x[:4] if x_test is None else x_test,
           y_test=labels[:4] if y_test is None else np.asarray(y_test, np.int64))
  return str(path)


def _images(n, size=32):
  return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _vectors_with(value):
  """20 float vectors [20, 2], `value` at row 7."""
  x = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)
  x[7, 1] = value
  return x


# ---- through the command line ---------------------------------------------------------------------------------

def test_cli_unknown_config_field(tmp_path):
  workdir = _populated_workdir(tmp_path / 'w')
  before = _snapshot(workdir)
  line = _assert_one_line_error(_main(workdir, *TWO_MOONS, '--config.modle.name=wrn28_2'), "'modle'",
                                '--config.modle.name', "did you mean 'model'?", '--helpfull')
  assert _snapshot(workdir) == before, line


def test_cli_negative_seed(tmp_path):
  workdir = _populated_workdir(tmp_path / 'w')
  before = _snapshot(workdir)
  _assert_one_line_error(_main(workdir, *TWO_MOONS, '--config.seed=-1'), 'seed: must be an integer >= 0, got -1')
  assert _snapshot(workdir) == before


@pytest.mark.parametrize('program, flags, fragment', [
    ('predict', ('--workdir={tmp}/w', '--output={tmp}/p.csv', 'extra'), "unexpected arguments ['extra']"),
    ('experiments.student_diagnosis', ('--workdir={tmp}/no_such_run',), 'no_such_run/config.json: missing'),
    ('benchmark', ('--config=configs/two_moons.py', '--repeats=0'), '--repeats: must be >= 1, got 0'),
    ('compile_check', ('--config=configs/cifar10_4k.py', '--topology=v9-8'), '--topology:'),
], ids=['predict', 'student_diagnosis', 'benchmark', 'compile_check'])
def test_every_program_ends_a_mistake_with_one_line_and_exit_2(tmp_path, program, flags, fragment):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  flags = [flag.format(tmp=tmp_path) for flag in flags]
  completed = subprocess.run([sys.executable, '-m', f'meta_pseudo_labels.{program}', *flags], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 2, completed.stderr[-3000:]
  assert 'Traceback' not in completed.stderr, completed.stderr[-3000:]
  line = completed.stderr.strip().splitlines()[-1]
  assert line.startswith('error: ') and fragment in line, completed.stderr[-3000:]


def test_cli_wrong_type(tmp_path):
  workdir = _populated_workdir(tmp_path / 'w')
  before = _snapshot(workdir)
  _assert_one_line_error(_main(workdir, *TWO_MOONS, '--config.num_train_steps=ten'), '--config.num_train_steps=ten',
                         'int()')
  assert _snapshot(workdir) == before


def test_cli_batch_not_divisible_by_the_devices(tmp_path):
  workdir = _populated_workdir(tmp_path / 'w')
  before = _snapshot(workdir)
  completed = _main(workdir, *TWO_MOONS, env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  _assert_one_line_error(completed, 'batch_size: 6 is not divisible by the 4 devices', 'use a multiple of 4')
  assert _snapshot(workdir) == before


def test_cli_corrupt_image_in_a_custom_folder(tmp_path):
  root = tmp_path / 'images'
  for split, classes in (('train', 'ab'), ('test', 'ab')):
    for name in classes:
      (root / split / name).mkdir(parents=True)
      for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / name / f'{i}.png')
  bad = root / 'train' / 'b' / '1.png'
  bad.write_bytes(bad.read_bytes()[:20])   # a truncated PNG: right name and signature, no image
  workdir = _populated_workdir(tmp_path / 'w')
  before = _snapshot(workdir)
  completed = _main(workdir, '--config=configs/cifar10_4k.py:cpu', '--config.dataset.source=folder',
                    f'--config.dataset.data_dir={root}', '--config.dataset.num_classes=2',
                    '--config.dataset.num_labeled=2', '--config.dataset.num_validation=0')
  _assert_one_line_error(completed, str(bad), 'remove or replace it')
  assert _snapshot(workdir) == before


def test_cli_workdir_of_an_incompatible_config(tmp_path):
  saved = two_moons.get_config()
  saved.experiment, saved.method = 'train', 'supervised'
  workdir = _populated_workdir(tmp_path / 'w', saved.to_dict())
  before = _snapshot(workdir)
  _assert_one_line_error(_main(workdir, *TWO_MOONS), f'{workdir} holds a run with method=\'supervised\'',
                         "this config has 'mpl'", 'use a new --workdir', 'config.json')
  assert _snapshot(workdir) == before


def test_cli_read_only_workdir(tmp_path):
  readonly = _readonly_dir(tmp_path)
  before = _snapshot(readonly) if readonly.is_relative_to(tmp_path) else None
  _assert_one_line_error(_main(readonly, *TWO_MOONS), f'--workdir {readonly}: cannot write there',
                         'choose a writable directory')
  if before is not None:
    assert _snapshot(readonly) == before


@pytest.mark.parametrize('make_data, flags, fragments', [
    (lambda p: _npz_file(p, _vectors_with(np.nan), np.arange(20) % 2), ('--config.model.name=mlp',),
     ('x_train has 1 non-finite value (NaN or inf), the first in row 7', 'remove or replace')),
    (lambda p: _npz_file(p, _images(20), np.where(np.arange(20) == 5, -3, np.arange(20) % 2)), (),
     ('train labels include -3, which is not a class index', 'class indices 0..1 (dataset.num_classes=2)',
      'fix the labels')),
    (lambda p: _npz_file(p, _images(20), np.arange(20) % 2), ('--config.dataset.randaugment_magnitude=-5',),
     ('dataset.randaugment_magnitude: must be a number >= 0, got -5',)),
    (lambda p: _npz_file(p, _images(20), np.arange(20) % 2), ('--config.dataset.cutout_size=100',),
     ('dataset.cutout_size: must be an integer in [0, 32] (dataset.image_size), got 100',)),
], ids=['nan_in_x_train', 'negative_label', 'negative_magnitude', 'cutout_larger_than_the_image'])
def test_cli_bad_npz_data_and_augmentation_ranges(tmp_path, make_data, flags, fragments):
  data = make_data(tmp_path / 'data.npz')
  workdir = _populated_workdir(tmp_path / 'w')
  before = _snapshot(workdir)
  completed = _main(workdir, '--config=configs/cifar10_4k.py:cpu', '--config.dataset.source=npz',
                    f'--config.dataset.data_dir={data}', '--config.dataset.num_classes=2',
                    '--config.dataset.num_labeled=4', '--config.dataset.num_validation=0',
                    '--config.num_train_steps=2', '--config.student_optimizer.wait_steps=0',
                    '--config.finetune.num_steps=0', *flags)
  line = _assert_one_line_error(completed, *fragments)
  if 'dataset.' not in fragments[0]:
    assert data in line   # a data error names the file
  assert _snapshot(workdir) == before   # no new file, none changed


# ---- the same checks, in-process ------------------------------------------------------------------------------

def _override(config, overrides):
  for field, value in overrides.items():
    *parents, leaf = field.split('.')
    node = config
    for parent in parents:
      node = getattr(node, parent)
    setattr(node, leaf, value)
  return config


def _image_config(**overrides):
  return _override(cifar10_4k.get_config('cpu'), overrides)


def _vector_config(**overrides):
  config = two_moons.get_config()
  config.experiment = 'train'
  return _override(config, overrides)


@pytest.mark.parametrize('make, overrides, num_devices, message', [
    (_vector_config, {'model.name': 'wrn99'}, 1, "model.name: unknown model 'wrn99'; choose one of"),
    (_image_config, {'model.name': 'mlp'}, 1, "model.name: 'mlp' takes vectors"),
    (_image_config, {'dataset.source': 'ftp'}, 1, "dataset.source: unknown value 'ftp'; choose one of"),
    (_vector_config, {'mpl.pseudo_labels': 'hard'}, 1, "mpl.pseudo_labels: 'hard' was renamed 'argmax'"),
    (_vector_config, {'num_train_steps': -3}, 1, 'num_train_steps: must be an integer >= 1, got -3'),
    (_vector_config, {'seed': -1}, 1, 'seed: must be an integer >= 0, got -1'),
    (_vector_config, {'dataset.split_seed': -2}, 1, 'dataset.split_seed: must be an integer >= 0, got -2'),
    (_vector_config, {'finetune.num_steps': -1}, 1, 'finetune.num_steps: must be an integer >= 0, got -1'),
    (_vector_config, {}, 4, 'batch_size: 6 is not divisible by the 4 devices'),
    (_image_config, {'eval_batch_size': 12}, 8, 'eval_batch_size: 12 is not divisible by the 8 devices'),
    (_vector_config, {'dataset.num_labeled': 1}, 1, 'dataset.num_labeled: 1 labeled examples leave some of the 2 '
     'classes without one; use at least 2'),
    (_image_config, {'dataset.image_size': 4}, 1, 'dataset.image_size: must be an integer >= 8, got 4'),
    (_image_config, {'dataset.image_size': 30, 'mesh.spatial': 4, 'mesh.data': 1}, 4,
     'dataset.image_size: 30 is not divisible by mesh.spatial=4'),
    (_vector_config, {'teacher_optimizer.learning_rate': float('inf')}, 1,
     'teacher_optimizer.learning_rate: must be a finite number, got inf'),
    (_vector_config, {'ema_decay': float('nan')}, 1, 'ema_decay: must be a finite number, got nan'),
    (_vector_config, {'on_nonfinite': 'ignore'}, 1, "on_nonfinite: unknown value 'ignore'"),
    (_image_config, {'dataset.source': 'folder'}, 1, 'dataset.data_dir: source \'folder\' needs a path'),
    (_image_config, {'num_train_steps': 12, 'student_optimizer.wait_steps': 20}, 1,
     'student_optimizer.wait_steps: the student waits 20 steps at lr 0 but the run has num_train_steps=12'),
    (_image_config, {'dataset.randaugment_magnitude': -5}, 1,
     'dataset.randaugment_magnitude: must be a number >= 0, got -5'),
    (_image_config, {'dataset.randaugment_num_ops': -1}, 1,
     'dataset.randaugment_num_ops: must be an integer >= 0, got -1'),
    (_image_config, {'dataset.cutout_size': 33}, 1,
     'dataset.cutout_size: must be an integer in [0, 32] (dataset.image_size), got 33'),
    (_image_config, {'dataset.cutout_size': -1}, 1,
     'dataset.cutout_size: must be an integer in [0, 32] (dataset.image_size), got -1'),
    (_image_config, {'dataset.pad_crop': 32}, 1,
     'dataset.pad_crop: must be an integer in [0, 31] (below dataset.image_size), got 32'),
])
def test_config_mistakes_are_one_line_config_errors(make, overrides, num_devices, message):
  with pytest.raises(errors.ConfigError) as e:
    config_validation.validate(make(**overrides), num_devices)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_paper_and_cpu_configs_validate():
  config_validation.validate(_image_config(), 1)
  config_validation.validate(_image_config(), 8)
  config_validation.validate(_vector_config(), 1)


@pytest.mark.parametrize('field, value', [('mpl.feedback', 'taylor'), ('mpl.pseudo_labels', 'harder'),
                                          ('mpl.h_sign', 0.5), ('mpl.baseline_rate', 2.0), ('label_smoothing', 1.0),
                                          ('ema_decay', -0.1)])
def test_mpl_fields_are_checked_before_any_work_by_the_hparams_that_use_them(field, value):
  with pytest.raises(errors.ConfigError) as e:
    config_validation.validate(_vector_config(**{field: value}), 1)
  assert str(e.value).startswith(f'{field}: ') and repr(value) in str(e.value) and '\n' not in str(e.value)


def _create_pipeline(config):
  from meta_pseudo_labels.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.create(config.dataset, input_pipeline.BatchSpec.from_config(config), seed=config.seed)


@pytest.mark.parametrize('name, hint', [('cifar10', 'run `tfds build cifar10 --data_dir='),
                                        ('imagenet2012', 'in its manual_dir (--manual_dir=DIR')])
def test_missing_tfds_data_says_how_to_prepare_it(tmp_path, name, hint):
  with pytest.raises(errors.DataError) as e:
    _create_pipeline(_image_config(**{'dataset.name': name, 'dataset.data_dir': str(tmp_path)}))
  assert f"TFDS dataset '{name}' is not prepared in {tmp_path}" in str(e.value) and hint in str(e.value)
  assert '\n' not in str(e.value)


def test_unknown_tfds_name(tmp_path):
  with pytest.raises(errors.ConfigError, match=r"dataset.name: TFDS has no dataset 'cifar11'"):
    _create_pipeline(_image_config(**{'dataset.name': 'cifar11', 'dataset.data_dir': str(tmp_path)}))


def test_empty_image_folder(tmp_path):
  for split in ('train', 'test'):
    (tmp_path / split / 'cat').mkdir(parents=True)
  with pytest.raises(errors.DataError) as e:
    _create_pipeline(_image_config(**{'dataset.source': 'folder', 'dataset.data_dir': str(tmp_path)}))
  assert f'{tmp_path}/train: no images' in str(e.value) and 'add images as' in str(e.value)


@pytest.mark.parametrize('num_classes, num_labeled, error, message', [
    # more labeled examples than the 20 the dataset has
    (2, 30, errors.ConfigError, r'dataset.num_labeled=30 \+ dataset.num_validation=0 exceeds the 20 training '
     r'examples; lower them'),
    # a class (2) without examples: the labels are only 0 and 1
    (3, 6, errors.DataError, r'class 2 has 0 training examples.*add examples of class 2 or lower dataset.num_labeled'),
])
def test_impossible_labeled_split(tmp_path, num_classes, num_labeled, error, message):
  data = _npz_file(tmp_path / 'd.npz', _images(20, size=8), np.arange(20) % 2)
  config = _image_config(**{'dataset.source': 'npz', 'dataset.data_dir': data, 'dataset.num_classes': num_classes,
                            'dataset.num_labeled': num_labeled, 'dataset.num_validation': 0})
  with pytest.raises(error, match=message):
    _create_pipeline(config)


@pytest.mark.parametrize('test_split, message', [
    ({}, r'd.npz: x_train has 1 non-finite value \(NaN or inf\), the first in row 7; remove or replace'),
    ({'x_test': _vectors_with(np.nan)[4:8]}, r'd.npz: x_test has 1 non-finite value .*the first in row 3'),
    ({'y_test': [0, 1, -1, 1]}, r"npz '.*d.npz': the test labels include -1, which is not a class index"),
    ({'y_test': [0, 1, 2**32 + 1, 1]}, r'd.npz: y_test\[2\] = 4294967297 does not fit int32; labels must be class'),
], ids=['inf_in_x_train', 'nan_in_x_test', 'negative_test_label', 'label_wrapping_in_int32'])
def test_npz_contents_that_would_train_wrong(tmp_path, test_split, message):
  x = _vectors_with(np.inf if not test_split else 0.0)[:8]
  data = _npz_file(tmp_path / 'd.npz', x, np.arange(8) % 2, test_split.get('x_test', x[:4]),
                   test_split.get('y_test', [0, 1, 0, 1]))
  config = _image_config(**{'dataset.source': 'npz', 'dataset.data_dir': data, 'dataset.num_classes': 2,
                            'dataset.num_labeled': 2, 'dataset.num_validation': 0, 'model.name': 'mlp'})
  with pytest.raises(errors.DataError, match=message) as e:
    _create_pipeline(config)
  assert '\n' not in str(e.value)


def test_read_only_workdir_in_process(tmp_path):
  readonly = _readonly_dir(tmp_path)
  for workdir in (readonly, readonly / 'run'):
    with pytest.raises(errors.ConfigError, match='cannot write there'):
      run_directory.RunDirectory(str(workdir)).prepare()
  assert not list(readonly.glob('.write_probe*'))
  assert run_directory.RunDirectory(str(tmp_path / 'new' / 'run')).prepare().path.is_dir()
  assert not list((tmp_path / 'new' / 'run').iterdir())   # the probe file is gone


@pytest.mark.parametrize('field, value', [('model', {'name': 'wrn10_1'}), ('seed', 1), ('dataset.split_seed', 3),
                                          ('dataset.num_labeled', 8), ('teacher_optimizer.weight_decay', 1e-4)])
def test_resuming_with_a_run_defining_field_changed_is_refused(tmp_path, field, value):
  saved = _vector_config().to_dict()
  rundir = run_directory.RunDirectory(tmp_path)
  rundir.write_config(saved)
  before = _snapshot(tmp_path)
  changed = _vector_config().to_dict()
  *parents, leaf = field.split('.')
  node = changed
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(errors.CheckpointError, match=rf'holds a run with {field}=.*use a new --workdir'):
    rundir.check_compatible(changed)
  assert _snapshot(tmp_path) == before
  assert rundir.check_compatible(dict(saved, num_train_steps=99)) == ['num_train_steps']


def test_checkpoint_of_another_config_without_config_json_is_refused_and_left_alone(tmp_path):
  """A workdir whose config.json is gone: the saved state's metadata still tells a foreign checkpoint (refused,
  untouched) from a damaged one (set aside, older one used)."""
  directory = tmp_path / 'checkpoints' / 'mpl'
  ckpt = checkpoint.Checkpointer(directory, keep=2)
  ckpt.save(1, {'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4)}, {'step': 1})
  ckpt.close()
  before = _snapshot(tmp_path)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=device)
  for target, difference in (({'w': spec(3, 5), 'b': spec(4)}, 'w has shape (3, 4) there, (3, 5) here'),
                             ({'w': spec(3, 4), 'b': spec(4), 'v': spec(2)}, 'it has no v'),
                             ({'w': spec(3, 4)}, 'it has b, which this config does not')):
    ckpt = checkpoint.Checkpointer(directory, keep=2)
    with pytest.raises(errors.CheckpointError) as e:
      ckpt.restore(None, target)
    ckpt.close()
    assert f'{directory}/1 holds a state this config does not build ({difference}); resume with' in str(e.value)
    assert _snapshot(tmp_path) == before
  ckpt = checkpoint.Checkpointer(directory, keep=2)
  assert ckpt.restore(None, {'w': spec(3, 4), 'b': spec(4)})[2] == 1
  ckpt.close()


def test_checkpoints_that_do_not_continue_this_run_are_refused_before_training(tmp_path):
  """A rerun over a workdir of a run with another step budget (b9755db's digits table): the old finetuning
  checkpoints, which finetune the old run's student, and a main phase saved past this config's end are refused with
  one line before any step, and nothing in the workdir changes."""
  from meta_pseudo_labels.run import train   # pylint: disable=g-import-not-at-top  # TensorFlow-free, but slow
  def config(steps):
    return _vector_config(**{'num_train_steps': steps, 'finetune.num_steps': 2, 'log_every_steps': 2,
                             'eval_every_steps': 2, 'checkpoint_every_steps': 2, 'batch_size': 8,
                             'dataset.num_labeled': 8})
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config(4), str(workdir))
  before = _snapshot(workdir)
  for steps, message in ((6, f"{workdir}/checkpoints/finetune continues a mpl phase that ended at step 4, but this "
                              "config's mpl phase has 6 steps: use a new --workdir, or move"),
                         (2, f"{workdir}/checkpoints/mpl/4 is past the end of this config's mpl phase (2 steps)")):
    with pytest.raises(errors.CheckpointError) as e:
      train.train_and_evaluate(config(steps), str(workdir))
    assert message in str(e.value) and '\n' not in str(e.value)
    assert _snapshot(workdir) == before
