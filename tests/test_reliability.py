"""Reliability end to end, through `python -m meta_pseudo_labels.main` as a user runs it (issue 7).

- SIGKILL at three different points and a SIGTERM, each followed by the same command: the final checkpoints are
  bitwise equal to an uninterrupted run's (data order, augmentations, dropout rngs, BatchNorm statistics, EMA, MPL
  baseline, optimizer and schedule state).
- A SIGTERM from outside saves the step after it and exits 143.
- A damaged newest checkpoint is found on restore, set aside, and the previous one is used, with a warning naming
  both; a save cut short never costs the previous checkpoint.
- The divergence guard: 'stop' names the step and the term and keeps the last good checkpoint; 'skip' counts, and
  the step after a skipped one uses the learning rate of its own step (in-process, on mpl_test_models' MLP).

Resume and damage use a tiny MPL + finetune image run (WRN-10-1 with dropout and BatchNorm on 8x8 images from an
.npz, RandAugment + Cutout, UDA, weight decay, Nesterov momentum, warmup + cosine schedules, EMA, MPL baseline; one
CPU device), its programs compiled once into a persistent compilation cache shared by the module's processes. The
guard and the outside SIGTERM use TwoMoon's MLP. Faults are injected with `train.FAULT_ENV` (SIGKILL / SIGTERM once
a given step is done), which never touches the computation.
"""
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from meta_pseudo_labels.execution import step_builder
from meta_pseudo_labels.method import mpl
from meta_pseudo_labels.method import train_state
from meta_pseudo_labels.run import train
import mpl_test_models as tm

REPO = pathlib.Path(__file__).resolve().parents[1]
MPL_STEPS, FINETUNE_STEPS, EVERY = 8, 4, 2


def _image_run(npz):
  return (
      '--config=configs/cifar10_4k.py:cpu', '--config.dataset.source=npz', f'--config.dataset.data_dir={npz}',
      '--config.dataset.num_classes=2', '--config.dataset.image_size=8', '--config.dataset.num_labeled=8',
      '--config.dataset.num_validation=0', '--config.dataset.cutout_size=4', '--config.dataset.pad_crop=1',
      '--config.batch_size=4', '--config.uda_ratio=2', '--config.eval_batch_size=8',
      '--config.finetune.batch_size=4', f'--config.num_train_steps={MPL_STEPS}',
      f'--config.finetune.num_steps={FINETUNE_STEPS}', '--config.finetune.optimizer.learning_rate=0.01',
      f'--config.checkpoint_every_steps={EVERY}', f'--config.log_every_steps={EVERY}',
      f'--config.eval_every_steps={MPL_STEPS}', '--config.teacher_optimizer.warmup_steps=2',
      '--config.student_optimizer.warmup_steps=2', '--config.student_optimizer.wait_steps=1',
      '--config.uda.ramp_steps=4', '--config.mpl.baseline_rate=0.1', '--config.ema_decay=0.9')


MOONS = ('--config=configs/two_moons.py', '--config.experiment=train', '--config.num_train_steps=12',
         '--config.checkpoint_every_steps=3', '--config.log_every_steps=3', '--config.eval_every_steps=12',
         '--config.finetune.num_steps=0')


def _env(fault=None, cache=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_backend_optimization_level=0')   # one device; compiles the tiny programs faster
  env.pop(train.FAULT_ENV, None)
  if fault:
    env[train.FAULT_ENV] = fault
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def _main(workdir, *flags, fault=None, cache=None):
  command = [sys.executable, '-m', 'meta_pseudo_labels.main', *flags, f'--workdir={workdir}']
  return subprocess.run(command, cwd=REPO, env=_env(fault, cache), capture_output=True, text=True, timeout=300,
                        check=False)


def _ok(completed):
  assert completed.returncode == 0, completed.stderr[-3000:]
  return completed


def _finalized(directory):
  """Finalised steps: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` once complete."""
  return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())


def _state(step_dir):
  """The saved state as numpy arrays, read back without a target (what a user inspecting the workdir gets)."""
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(pathlib.Path(step_dir) / 'state'))


def _assert_bitwise_equal(step_dir_a, step_dir_b):
  a, b = _state(step_dir_a), _state(step_dir_b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(a)]
  differ = [p for p, x, y in zip(paths, jax.tree.leaves(a), jax.tree.leaves(b))
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes()]
  assert not differ, f'not bitwise equal: {differ}'
  return paths


def _final(workdir):
  return json.loads((pathlib.Path(workdir) / 'results.json').read_text())['final']


@pytest.fixture(scope='module')
def image(tmp_path_factory):
  """(command-line flags, compilation cache, the uninterrupted run's workdir keeping 2 checkpoints per phase)."""
  root = tmp_path_factory.mktemp('image')
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
  labels = np.arange(40) % 2
  np.savez(root / 'data.npz', x_train=images, y_train=labels, x_test=images[:8], y_test=labels[:8])
  flags, cache, workdir = _image_run(root / 'data.npz'), root / 'jax_cache', root / 'reference'
  _ok(_main(workdir, *flags, '--config.keep_checkpoints=2', cache=cache))
  assert _finalized(workdir / 'checkpoints' / 'mpl') == [6, 8]
  assert _finalized(workdir / 'checkpoints' / 'finetune') == [2, 4]
  return flags, cache, workdir


def test_sigkill_three_times_and_sigterm_then_same_command_is_bitwise_identical(image, tmp_path):
  flags, cache, reference = image
  workdir = tmp_path / 'run'
  run = lambda fault=None: _main(workdir, *flags, '--config.keep_checkpoints=1', fault=fault, cache=cache)
  mpl_dir, finetune_dir = workdir / 'checkpoints' / 'mpl', workdir / 'checkpoints' / 'finetune'

  # 1. SIGKILL at MPL step 3, after the save of step 2 completed.
  killed = run('kill_saved@mpl:3')
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert _finalized(mpl_dir) == [2]

  # 2. Resumes from 2; SIGKILL right after the (asynchronous) save of step 4 began, possibly mid-write. With
  # keep_checkpoints=1 the previous checkpoint must survive until the new one is complete.
  killed = run('kill@mpl:4')
  assert killed.returncode == -9 and f'resumed from {mpl_dir}/2' in killed.stderr, killed.stderr[-2000:]
  assert _finalized(mpl_dir) in ([2], [4], [2, 4])

  # 3. SIGTERM (a preemption notice) after step 5: saved at the next step boundary, exit 143, one line naming it.
  preempted = run('term@mpl:5')
  assert preempted.returncode == 143, preempted.stderr[-2000:]
  assert 'preempted: mpl step 6: preemption notice received; checkpoint saved' in preempted.stderr
  assert _finalized(mpl_dir) == [6]

  # 4. Resumes from 6, finishes MPL, SIGKILL in finetuning step 3 after its step-2 save completed.
  killed = run('kill_saved@finetune:3')
  assert killed.returncode == -9 and f'resumed from {mpl_dir}/6' in killed.stderr, killed.stderr[-2000:]
  assert _finalized(mpl_dir) == [8] and _finalized(finetune_dir) == [2]
  assert not (workdir / 'results.json').exists()

  # 5. The same command once more finishes the run.
  finished = _ok(run())
  assert f'resumed from {finetune_dir}/2' in finished.stderr
  leaves = _assert_bitwise_equal(mpl_dir / str(MPL_STEPS), reference / 'checkpoints' / 'mpl' / str(MPL_STEPS))
  for restored in ('student_ema', 'mpl_baseline', 'batch_stats', "['trace']"):   # the schedule follows 'step'
    assert any(restored in leaf for leaf in leaves), (restored, leaves)
  _assert_bitwise_equal(finetune_dir / str(FINETUNE_STEPS),
                        reference / 'checkpoints' / 'finetune' / str(FINETUNE_STEPS))
  assert _final(workdir) == _final(reference)


def test_sigterm_from_outside_during_training_saves_that_step_and_exits_143(tmp_path):
  """A scheduler's SIGTERM at an arbitrary moment of a long run: the step boundary after it is saved, then exit."""
  long_run = (*MOONS, '--config.num_train_steps=1000000', '--config.log_every_steps=1000000',
              '--config.eval_every_steps=1000000', '--config.checkpoint_every_steps=1000000')
  log = tmp_path / 'stderr.txt'
  with open(log, 'w') as stderr:
    process = subprocess.Popen([sys.executable, '-m', 'meta_pseudo_labels.main', *long_run,
                                f'--workdir={tmp_path / "run"}'], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=stderr, text=True)
    try:
      deadline = time.monotonic() + 240
      while 'mpl: training steps 1..' not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
      time.sleep(1.0)   # into the loop (the first step compiles, then steps are ~ms each)
      process.send_signal(signal.SIGTERM)
      returncode = process.wait(timeout=120)
    finally:
      if process.poll() is None:
        process.kill()
  text = log.read_text()
  assert returncode == 143, text[-3000:]
  match = re.search(r'^preempted: mpl step (\d+): preemption notice received; checkpoint saved in (\S+); rerun the '
                    r'same command to resume$', text, re.MULTILINE)
  assert match, text[-3000:]
  step = int(match.group(1))
  assert pathlib.Path(match.group(2)) == tmp_path / 'run' / 'checkpoints' / 'mpl'
  assert _finalized(tmp_path / 'run' / 'checkpoints' / 'mpl') == [step]
  state = _state(tmp_path / 'run' / 'checkpoints' / 'mpl' / str(step))
  assert int(state['step']) == step and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def _truncate_files(step_dir):
  """What a full disk or a partial copy leaves: every data file of a finalised step emptied."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      if name != '_CHECKPOINT_METADATA':
        open(os.path.join(root, name), 'wb').close()


def _flip_a_byte(step_dir):
  """Silent corruption: one byte of the array data file that restore reads (`state/d/*`, the OCDBT data the
  manifest points to) inverted, the file size unchanged."""
  files = list((pathlib.Path(step_dir) / 'state' / 'd').iterdir())
  assert files
  target = max(files, key=os.path.getsize)
  data = bytearray(pathlib.Path(target).read_bytes())
  data[len(data) // 2] ^= 0xFF
  pathlib.Path(target).write_bytes(bytes(data))


def test_damaged_newest_checkpoints_fall_back_with_a_warning_and_finish_identically(image, tmp_path):
  flags, cache, reference = image
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  mpl_dir, finetune_dir = workdir / 'checkpoints' / 'mpl', workdir / 'checkpoints' / 'finetune'
  _truncate_files(mpl_dir / str(MPL_STEPS))
  _flip_a_byte(finetune_dir / str(FINETUNE_STEPS))
  (mpl_dir / f'{MPL_STEPS}.orbax-checkpoint-tmp-1700000000').mkdir()   # a half-written save of a killed process
  os.remove(workdir / 'results.json')
  kept = hashlib.sha256((finetune_dir / str(FINETUNE_STEPS) / 'state' / 'manifest.ocdbt').read_bytes()).hexdigest()

  finished = _ok(_main(workdir, *flags, '--config.keep_checkpoints=2', cache=cache))
  for phase_dir, good, bad in ((mpl_dir, MPL_STEPS - EVERY, MPL_STEPS),
                               (finetune_dir, FINETUNE_STEPS - EVERY, FINETUNE_STEPS)):
    assert f'Restored {phase_dir}/{good} instead of the unreadable newer checkpoint(s) [{bad}]' in finished.stderr
    assert (phase_dir / f'{bad}.corrupt').is_dir()   # kept for inspection, never deleted
  corrupt = finetune_dir / f'{FINETUNE_STEPS}.corrupt' / 'state' / 'manifest.ocdbt'
  assert hashlib.sha256(corrupt.read_bytes()).hexdigest() == kept
  assert not list(mpl_dir.glob('*.orbax-checkpoint-tmp-*'))
  _assert_bitwise_equal(mpl_dir / str(MPL_STEPS), reference / 'checkpoints' / 'mpl' / str(MPL_STEPS))
  _assert_bitwise_equal(finetune_dir / str(FINETUNE_STEPS),
                        reference / 'checkpoints' / 'finetune' / str(FINETUNE_STEPS))
  assert _final(workdir) == _final(reference)


# The student's learning rate is 0 for its first 5 steps (wait_steps), then 1e30: the 6th MPL step diverges.
DIVERGING = (*MOONS, '--config.student_optimizer.learning_rate=1e30', '--config.student_optimizer.schedule=constant',
             '--config.student_optimizer.wait_steps=5', '--config.keep_checkpoints=2')


def test_divergence_stop_names_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path):
  stopped = _main(tmp_path, *DIVERGING)
  assert stopped.returncode == 2, stopped.stderr[-2000:]
  last = stopped.stderr.strip().splitlines()[-1]
  assert re.fullmatch(r'error: mpl step 6: non-finite mpl/feedback_logits_grad_norm, teacher/grad_norm[^;]*; '
                      r'stopped, checkpoint 3 in '
                      rf'{re.escape(str(tmp_path))}/checkpoints/mpl is the last good one and is kept; lower the '
                      r'learning rate, or set --config.on_nonfinite=skip to skip such steps', last), last
  assert 'Traceback' not in stopped.stderr
  mpl_dir = tmp_path / 'checkpoints' / 'mpl'
  assert _finalized(mpl_dir) == [3] and not list(mpl_dir.glob('*tmp*'))
  state = _state(mpl_dir / '3')
  assert int(state['step']) == 3 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  assert not (tmp_path / 'results.json').exists()


def test_divergence_skip_counts_the_skipped_steps_and_keeps_the_state_finite(tmp_path):
  finished = _ok(_main(tmp_path, *DIVERGING, '--config.on_nonfinite=skip'))
  assert 'skipped 1 non-finite step(s), first at step 6' in finished.stderr
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['nonfinite_skipped'] == 12 - 5   # steps 6..12: the lr stays 1e30
  state = _state(tmp_path / 'checkpoints' / 'mpl' / '12')
  assert int(state['step']) == 12 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))



@pytest.mark.parametrize('feedback', ['hard_taylor', 'exact'])
def test_a_skipped_step_leaves_the_schedule_on_the_state_step(feedback):
  """'skip' keeps the old optimizer state; the step after it still uses, reports and (in 'exact') looks ahead with
  the learning rate of its own step: the student, waiting one step (lr 0, then 0.3), moves by exactly 0.3 * grad."""
  model = tm.TinyMLP(dropout_rate=0.0)   # no dropout: the student's gradient below needs no rng
  optimizers = tm.mpl_optimizers(student_optimizer=tm.optimizer_config(learning_rate=0.3, wait_steps=1))
  state = train_state.create_mpl_state(jax.random.key(0), model, model, (6,), **optimizers)
  hparams = mpl.MplHparams(feedback=feedback, pseudo_labels='soft' if feedback == 'exact' else 'argmax')
  step_fn = functools.partial(mpl.mpl_step, hparams=hparams)
  batch = tm.make_batch(jax.random.key(1), (6,))
  nan_batch = dict(batch, labeled_image=batch['labeled_image'].at[0, 0].set(np.nan))
  metric_names = sorted(jax.eval_shape(step_fn, state, batch, jax.random.key(2))[1])
  guarded = jax.jit(functools.partial(step_builder.guarded_step, step_fn, True))
  skipped, accumulator = guarded(state, step_builder.empty_accumulator(metric_names), nan_batch, jax.random.key(2))
  assert int(accumulator['nonfinite_steps']) == 1 and int(skipped.step) == 1
  after, accumulator = guarded(skipped, accumulator, batch, jax.random.key(2))
  assert int(accumulator['finite_steps']) == 1 and int(after.step) == 2
  np.testing.assert_allclose(accumulator['sums']['student/learning_rate'], 0.3, rtol=1e-6)   # the reported lr

  # The applied lr: plain SGD on CE(pseudo targets of the unchanged teacher, S(x_s)) at 0.3.
  logits_strong = model.apply(state.teacher.variables, batch['unlabeled_strong'], train=True)
  targets = jax.nn.softmax(logits_strong) if hparams.soft_pseudo_labels else jax.nn.one_hot(
      jnp.argmax(logits_strong, -1), tm.NUM_CLASSES)
  def student_loss(params):
    logits = model.apply({'params': params}, batch['unlabeled_strong'], train=True)
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1))
  grads = jax.grad(student_loss)(state.student.params)
  expected = jax.tree.map(lambda p, g: p - 0.3 * g, state.student.params, grads)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), after.student.params, expected)
