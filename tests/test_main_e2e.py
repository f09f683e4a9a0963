"""The training program end to end: `python -m meta_pseudo_labels.main --config=configs/X.py:cpu --workdir=DIR ...`.

Each test starts main as a user would (a subprocess, real flags, `--config.field=value` overrides) on every paper
config and on custom data, and checks what a user gets: exit 0, checkpoints per phase, TensorBoard event files and
WORKDIR/results.json with the final metrics of every model on validation and test plus the config. A killed run,
started again with the same command, resumes from its newest checkpoint.

TFDS data sets are mocked (tests/mock_tfds_main.py: the same main, inside `tfds.testing.mock_data`); the image folder
and the .npz file are real files run through plain `python -m meta_pseudo_labels.main`.

Speed (2 CPU cores): every run is a few steps of a tiny net on 16x16 images. The runs share one persistent XLA
compilation cache and XLA's cheapest CPU backend optimisation level, so a step function is compiled once per
distinct hyper-parameter set (the CIFAR-10, SVHN, folder and .npz runs compile the same programs). EfficientNet's
MPL step alone takes minutes to compile on such a machine, so the ImageNet configs run with a small WRN here; the
EfficientNet-B0 run of `configs/imagenet.py:cpu` is opt-in (MPL_TEST_FULL_REGISTRY=1).
"""

import ast
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from test_data_sources import write_image_folder  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_LAUNCHER = os.path.join(REPO, 'tests', 'mock_tfds_main.py')
NUM_CLASSES = 10
NUM_LABELED = 20
NUM_VALIDATION = 10
MOCK_EXAMPLES = 60      # per split of every mocked TFDS data set
STEPS = 12              # MPL steps
FINETUNE_STEPS = 2
CHECKPOINT_EVERY = 4
MPL_MODELS = ('teacher', 'student', 'student_ema', 'student_finetuned')

# One tiny setup for every run: a few steps of WRN-10-1 on 16x16 images, 4 labeled + 8 unlabeled per step.
TINY = (
    f'--config.num_train_steps={STEPS}',
    f'--config.finetune.num_steps={FINETUNE_STEPS}',
    '--config.batch_size=4',
    '--config.uda_ratio=2',
    '--config.eval_batch_size=16',
    '--config.finetune.batch_size=4',
    f'--config.dataset.num_classes={NUM_CLASSES}',
    f'--config.dataset.num_labeled={NUM_LABELED}',
    f'--config.dataset.num_validation={NUM_VALIDATION}',
    '--config.dataset.image_size=16',
    '--config.model.name=wrn10_1',
    '--config.student_optimizer.wait_steps=0',   # `:cpu` waits 10 % of the steps; let the student learn here
    '--config.student_optimizer.warmup_steps=2',
    '--config.teacher_optimizer.warmup_steps=2',
    f'--config.checkpoint_every_steps={CHECKPOINT_EVERY}',
    '--config.eval_every_steps=6',
    '--config.log_every_steps=1',
)


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


def _env(compilation_cache, **extra):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  env.update(
      JAX_PLATFORMS='cpu',
      TF_CPP_MIN_LOG_LEVEL='2',
      XLA_FLAGS='--xla_backend_optimization_level=0',   # compiles the step functions much faster on CPU
      JAX_COMPILATION_CACHE_DIR=compilation_cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
      MOCK_TFDS_EXAMPLES=str(MOCK_EXAMPLES),
      MOCK_TFDS_NUM_CLASSES=str(NUM_CLASSES),
  )
  env.update(extra)
  return env


def _command(config, workdir, overrides, mock_tfds):
  """main's command line: the config, TINY, then `overrides` (which replace TINY's value of the same field)."""
  program = [MOCK_LAUNCHER] if mock_tfds else ['-m', 'meta_pseudo_labels.main']
  overridden = {flag.split('=')[0] for flag in overrides}
  tiny = [flag for flag in TINY if flag.split('=')[0] not in overridden]
  return [sys.executable, *program, f'--config={config}', f'--workdir={workdir}', *tiny, *overrides]


def _run_main(config, workdir, compilation_cache, *overrides, mock_tfds=True, cwd=REPO):
  """Runs main to the end; returns its log (stderr) and printed summary (stdout)."""
  process = subprocess.run(_command(config, workdir, overrides, mock_tfds), cwd=cwd, env=_env(compilation_cache),
                           capture_output=True, text=True, timeout=900, check=False)
  assert process.returncode == 0, f'exit {process.returncode}\n{process.stderr[-5000:]}'
  return process.stderr, process.stdout


# ---- what a finished run leaves in its workdir --------------------------------------------------------------


def _read_scalars(workdir):
  """{tag: {step: value}} over all TensorBoard event files of the run (one per process that ran)."""
  files = sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')))
  assert files, f'no TensorBoard event file in {workdir}/tensorboard'
  scalars = {}
  for path in files:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == 'scalars' or value.HasField('simple_value'):
          number = value.simple_value if value.HasField('simple_value') else float(tf.make_ndarray(value.tensor))
          scalars.setdefault(value.tag, {})[event.step] = number
  return scalars


def _checkpoint_steps(workdir, phase):
  directory = os.path.join(workdir, 'checkpoints', phase)
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


def _split_sizes(log):
  match = re.search(r'Split sizes: (\{[^}]*\})', log)
  assert match, 'main logs no split sizes'
  return ast.literal_eval(match.group(1))


def _check_workdir(workdir, *, dataset, test_size, models=MPL_MODELS, steps=STEPS, finetune_steps=FINETUNE_STEPS,
                   resumed_from=0):
  """Asserts on results.json, checkpoints, config.json and TensorBoard scalars of a finished MPL run.

  `resumed_from`: the MPL step the last process restored; the scalars of earlier steps were written by a killed
  process and may be lost (event files are flushed asynchronously), so only the later ones are required.
  """
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert results['steps'] == {'mpl': steps, **({'finetune': finetune_steps} if finetune_steps else {})}
  assert results['nonfinite_skipped'] == 0 and results['wall_time_s'] > 0
  # The config of the run, with the command line's overrides applied.
  config = results['config']
  for field, value in dataset.items():
    assert config['dataset'][field] == value, (field, config['dataset'][field])
  assert config['num_train_steps'] == steps and config['batch_size'] == 4
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == config
  # Final metrics of every model on the validation split (held out of train) and the test split.
  final = results['final']
  assert set(final) == {'validation', 'test'}
  sizes = {'validation': NUM_VALIDATION, 'test': test_size}
  for split, per_model in final.items():
    assert set(per_model) == set(models), (split, sorted(per_model))
    for model, metrics in per_model.items():
      assert metrics['count'] == sizes[split], (split, model, metrics)
      assert 0 <= metrics['top1'] <= metrics['top5'] <= 1, (split, model, metrics)
      assert math.isfinite(metrics['loss']) and metrics['loss'] > 0, (split, model, metrics)
  # One checkpoint directory per phase; the MPL phase keeps its last `keep_checkpoints` saves.
  assert _checkpoint_steps(workdir, 'mpl') == list(range(CHECKPOINT_EVERY, steps + 1, CHECKPOINT_EVERY))[-3:]
  if finetune_steps:
    assert _checkpoint_steps(workdir, 'finetune') == [finetune_steps]
  # TensorBoard: training scalars at every step, validation during training, the final metrics at the last step.
  scalars = _read_scalars(workdir)
  for tag in ('teacher/loss', 'student/loss', 'mpl/h', 'teacher/uda_mask_rate'):
    assert set(range(resumed_from + 1, steps + 1)) <= set(scalars[tag]) <= set(range(1, steps + 1)), tag
    assert all(math.isfinite(v) for v in scalars[tag].values()), tag
  assert scalars['student/learning_rate'][steps] > 0 and scalars['teacher/learning_rate'][steps] > 0
  for model in models[:3]:
    assert {s for s in (6, 12) if s > resumed_from} <= set(scalars[f'validation/{model}/top1']) <= {6, 12}
  if finetune_steps:
    assert sorted(scalars['finetune/loss']) == list(range(steps + 1, steps + finetune_steps + 1))
  last = steps + finetune_steps
  for split, per_model in final.items():
    for model, metrics in per_model.items():
      assert scalars[f'final/{split}/{model}/top1'][last] == pytest.approx(metrics['top1'], abs=1e-6)
  return results


# ---- the paper configs on mocked TFDS data ----------------------------------------------------------------------


def test_cifar10_4k(tmp_path, compilation_cache):
  workdir = str(tmp_path / 'cifar10')
  log, summary = _run_main('configs/cifar10_4k.py:cpu', workdir, compilation_cache)
  _check_workdir(workdir, dataset=dict(source='tfds', name='cifar10', augment='cifar'), test_size=MOCK_EXAMPLES)
  assert _split_sizes(log) == {'train_labeled': NUM_LABELED, 'validation': NUM_VALIDATION,
                               'unlabeled': MOCK_EXAMPLES - NUM_LABELED - NUM_VALIDATION, 'test': MOCK_EXAMPLES}
  assert 'student_finetuned' in summary and f'Results: {workdir}/results.json' in summary


def _wait_for_checkpoint(process, workdir, phase, timeout=600):
  """Polls until a finalised checkpoint of `phase` exists; returns its step (None if the process ended first)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = _checkpoint_steps(workdir, phase)
    if steps:
      return steps[0]
    if process.poll() is not None:
      return None
    time.sleep(0.02)
  return None


def test_svhn_1k_killed_run_resumes_with_the_same_command(tmp_path, compilation_cache):
  """SIGKILL right after the first checkpoint appears; the same command then resumes from the newest one."""
  workdir = str(tmp_path / 'svhn')
  command = _command('configs/svhn_1k.py:cpu', workdir, (), mock_tfds=True)
  with open(tmp_path / 'first.log', 'w') as first_log:
    first = subprocess.Popen(command, cwd=REPO, env=_env(compilation_cache), stdout=first_log, stderr=first_log)
    try:
      killed_after = _wait_for_checkpoint(first, workdir, 'mpl')
      first.send_signal(signal.SIGKILL)
    finally:
      first.wait(timeout=60)
  assert killed_after == CHECKPOINT_EVERY, (tmp_path / 'first.log').read_text()[-5000:]
  assert first.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  saved = _checkpoint_steps(workdir, 'mpl')   # the kill may land after a later save
  assert saved and saved[-1] < STEPS, f'the run was killed too late to test resuming (saved: {saved})'

  log, _ = _run_main('configs/svhn_1k.py:cpu', workdir, compilation_cache)
  resumed = saved[-1]
  assert f'mpl: resumed from {workdir}/checkpoints/mpl/{resumed}' in log
  assert f'mpl: training steps {resumed + 1}..{STEPS}' in log
  assert 'mpl: training steps 1..' not in log
  assert 'finetune: training steps 1..' in log   # the finetuning phase had not started
  _check_workdir(workdir, dataset=dict(source='tfds', name='svhn_cropped'), test_size=MOCK_EXAMPLES,
                 resumed_from=resumed)
  # The second process wrote metrics only for the steps after the checkpoint it restored.
  event_files = sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')),
                       key=os.path.getmtime)
  assert len(event_files) == 2
  steps_written = {event.step for event in tf.compat.v1.train.summary_iterator(event_files[-1])
                   for value in event.summary.value if value.tag == 'teacher/loss'}
  assert min(steps_written) == resumed + 1 and max(steps_written) == STEPS


IMAGENET_OVERRIDES = (
    '--config.dataset.shuffle_buffer=64',   # streaming pipeline (dataset.in_memory=False) as configured
    '--config.dataset.unlabeled_source=imagenet2012:train',
)


def test_imagenet_10pct_streaming(tmp_path, compilation_cache):
  workdir = str(tmp_path / 'imagenet_10pct')
  log, _ = _run_main('configs/imagenet_10pct.py:cpu', workdir, compilation_cache, '--config.dataset.shuffle_buffer=64')
  results = _check_workdir(workdir, dataset=dict(source='tfds', name='imagenet2012', augment='imagenet',
                                                 in_memory=False, test_split='validation'),
                           test_size=MOCK_EXAMPLES)
  assert results['config']['model']['name'] == 'wrn10_1'
  assert _split_sizes(log)['unlabeled'] == MOCK_EXAMPLES - NUM_LABELED - NUM_VALIDATION


def test_imagenet_with_extra_unlabeled_source(tmp_path, compilation_cache):
  """configs/imagenet.py: labeled ImageNet plus a separate TFDS pool of unlabeled images (JFT's role)."""
  workdir = str(tmp_path / 'imagenet')
  log, _ = _run_main('configs/imagenet.py:cpu', workdir, compilation_cache, *IMAGENET_OVERRIDES)
  _check_workdir(workdir, dataset=dict(name='imagenet2012', in_memory=False, unlabeled_source='imagenet2012:train'),
                 test_size=MOCK_EXAMPLES)
  # The unlabeled pool is the rest of train plus every image of the extra source.
  assert _split_sizes(log)['unlabeled'] == MOCK_EXAMPLES - NUM_LABELED - NUM_VALIDATION + MOCK_EXAMPLES


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('MPL_TEST_FULL_REGISTRY') != '1',
                    reason='EfficientNet-B0 through main runs with MPL_TEST_FULL_REGISTRY=1 (its MPL step runs jitted '
                           'in test_mpl_steps.py, configs/imagenet.py:cpu with a WRN in the default suite)')
def test_imagenet_efficientnet_b0(tmp_path, compilation_cache):
  """`configs/imagenet.py:cpu` with its own model, EfficientNet-B0 (5-6 minutes of XLA compilation on 2 cores)."""
  workdir = str(tmp_path / 'imagenet_b0')
  _run_main('configs/imagenet.py:cpu', workdir, compilation_cache, *IMAGENET_OVERRIDES,
            '--config.model.name=efficientnet-b0', '--config.finetune.num_steps=0')
  results = _check_workdir(workdir, dataset=dict(name='imagenet2012', unlabeled_source='imagenet2012:train'),
                           test_size=MOCK_EXAMPLES, models=MPL_MODELS[:3], finetune_steps=0)
  assert results['config']['model']['name'] == 'efficientnet-b0'


# ---- custom data through plain `python -m meta_pseudo_labels.main` ----------------------------------------------


def test_image_folder(tmp_path, compilation_cache):
  root = str(tmp_path / 'images')
  classes = [f'class_{i}' for i in range(NUM_CLASSES)]
  write_image_folder(root, classes=classes, per_class=5, size=20)   # <root>/{train,test}/<class>/<i>.png|JPG
  workdir = str(tmp_path / 'run')
  log, _ = _run_main('configs/cifar10_4k.py:cpu', workdir, compilation_cache, '--config.dataset.source=folder',
                     f'--config.dataset.data_dir={root}', mock_tfds=False)
  _check_workdir(workdir, dataset=dict(source='folder', data_dir=root), test_size=5 * NUM_CLASSES)
  assert _split_sizes(log)['unlabeled'] == 5 * NUM_CLASSES - NUM_LABELED - NUM_VALIDATION


def test_npz_file(tmp_path, compilation_cache):
  path = str(tmp_path / 'data.npz')
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (50, 24, 24, 3), dtype=np.uint8), y_train=np.arange(50) % NUM_CLASSES,
           x_test=rng.integers(0, 256, (30, 24, 24, 3), dtype=np.uint8), y_test=np.arange(30) % NUM_CLASSES)
  workdir = str(tmp_path / 'run')
  # From another working directory, with the config given by its absolute path.
  log, _ = _run_main(os.path.join(REPO, 'configs', 'cifar10_4k.py:cpu'), workdir, compilation_cache,
                     '--config.dataset.source=npz', f'--config.dataset.data_dir={path}', mock_tfds=False,
                     cwd=str(tmp_path))
  _check_workdir(workdir, dataset=dict(source='npz', data_dir=path), test_size=30)
  assert _split_sizes(log)['unlabeled'] == 50 - NUM_LABELED - NUM_VALIDATION
