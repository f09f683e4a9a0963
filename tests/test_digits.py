"""The digits sweep (experiments/digits.py) end to end through main, a few steps per run: outputs' structure."""

import json
import os
import subprocess
import sys
import time

import pytest

from configs import digits as digits_config
from meta_pseudo_labels import errors
from meta_pseudo_labels.experiments import digits
from meta_pseudo_labels.rundir import run_directory
from meta_pseudo_labels.rundir import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
NAMES = ('supervised', 'mpl')
SEEDS = 2
STEPS = 4


def test_main_runs_every_method_and_seed_through_the_train_program(tmp_path):
  command = [sys.executable, '-m', 'meta_pseudo_labels.main', '--config=configs/digits.py:quick',
             f'--workdir={tmp_path}', f'--config.num_train_steps={STEPS}', f'--config.sweep.num_seeds={SEEDS}',
             f'--config.sweep.methods={NAMES!r}', '--config.batch_size=4', '--config.uda_ratio=2',
             '--config.finetune.batch_size=4', '--config.eval_every_steps=2']
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_backend_optimization_level=0')
  completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  for name in NAMES:
    assert f'| {name} |' in completed.stdout
  with open(tmp_path / digits.RESULTS_FILE) as f:
    results = json.load(f)
  assert results['seeds'] == [0, 1] and list(results['methods']) == list(NAMES)
  for name in NAMES:
    row = results['methods'][name]
    reported = row['test_top1'][digits.METHODS[name].reported_model]
    assert len(reported['per_seed']) == SEEDS and all(0 <= a <= 1 for a in reported['per_seed'])
    for seed, run in enumerate(row['runs']):
      with open(os.path.join(run['workdir'], 'results.json')) as f:
        one_run = json.load(f)
      # Each seed is its own run of the train program: its seed, its labeled draw, the method's fields.
      assert one_run['config']['seed'] == seed and one_run['config']['dataset']['split_seed'] == seed
      assert one_run['config']['method'] == digits.METHODS[name].method
      assert one_run['final']['test'][row['reported_model']]['count'] == 500
      assert [step for step, _ in run['validation_curve']] == [2, 4]
  assert results['methods']['mpl']['runs'][0]['workdir'].endswith(os.path.join('mpl', 'seed_0'))
  assert set(results['methods']['mpl']['test_top1']) == {'teacher', 'student', 'student_ema', 'student_finetuned'}
  with open(tmp_path / digits.FIGURE_FILE, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  # The student diagnosis reads a finished MPL run of the sweep.
  mpl_run = results['methods']['mpl']['runs'][0]['workdir']
  diagnosis = subprocess.run([sys.executable, '-m', 'meta_pseudo_labels.experiments.student_diagnosis',
                              f'--workdir={mpl_run}'], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300, check=False)
  assert diagnosis.returncode == 0, diagnosis.stderr[-3000:]
  assert f'{mpl_run}: MPL step {STEPS}' in diagnosis.stdout
  for line in ('teacher ', 'student ', 'student_ema ', 'teacher on the strong views'):
    assert line in diagnosis.stdout


def test_run_configs_set_the_method_seed_and_split():
  config = digits_config.get_config()
  no_uda = sweeps.run_config(config, digits.METHODS['mpl_no_uda'], 2)
  assert (no_uda.experiment, no_uda.method, no_uda.seed, no_uda.dataset.split_seed) == ('train', 'mpl', 2, 2)
  assert no_uda.uda.weight == 0 and no_uda.mpl.pseudo_labels == 'sampled'
  assert sweeps.run_config(config, digits.METHODS['mpl'], 0).uda.weight == config.uda.weight > 0
  assert sweeps.run_config(config, digits.METHODS['mpl_argmax'], 0).mpl.pseudo_labels == 'argmax'
  assert config.dataset.augment == 'digits' and config.dataset.num_labeled == 10 * config.dataset.num_classes


def test_unknown_method_is_a_one_line_config_error(tmp_path):
  config = digits_config.get_config()
  config.sweep.methods = ('supervised', 'mpl_typo')
  with pytest.raises(errors.ConfigError, match='sweep.methods') as error:
    digits.run(config, str(tmp_path), train_fn=None)
  assert '\n' not in str(error.value) and not os.listdir(tmp_path)


def test_an_unfinished_run_of_another_config_is_refused_not_continued(tmp_path):
  """b9755db's digits table: a sweep over a workdir holding shorter runs resumed them under the new schedule; now a
  run directory of another config stops the sweep with one line, and only runs of the row's own config resume."""
  config = digits_config.get_config()
  row = digits.METHODS['mpl']
  run = sweeps.run_config(config, row, 0)
  old = run.copy_and_resolve_references()
  old.num_train_steps = 100
  run_dir = tmp_path / 'mpl' / 'seed_0'
  run_dir.mkdir(parents=True)
  run_directory.RunDirectory(run_dir).write_config(old.to_dict())
  def train_fn(config, workdir):
    raise AssertionError('trained')
  with pytest.raises(errors.CheckpointError) as error:
    sweeps.one_run(run, row, str(run_dir), train_fn)
  assert str(error.value) == (f'{run_dir} holds an unfinished run of another config (num_train_steps differ): a sweep '
                              'continues only runs of its own rows; move that directory away, or use a new --workdir')
  other_sweep = run.copy_and_resolve_references()
  other_sweep.sweep.num_seeds = 7   # what a sweep chooses (rows, seeds, mode) is no part of a run's config
  run_directory.RunDirectory(run_dir).write_config(other_sweep.to_dict())
  with pytest.raises(AssertionError, match='trained'):
    sweeps.one_run(run, row, str(run_dir), train_fn)


def test_the_cpu_time_of_a_preempted_stretch_counts_toward_its_run(tmp_path):
  """The sweep's CPU hours: a run stopped by SIGTERM (the train program saves and raises `Preempted`) and resumed
  later is charged for both stretches, not only the one that finished it."""
  row = digits.METHODS['supervised']
  run = sweeps.run_config(digits_config.get_config(), row, 0)
  run_dir = tmp_path / 'supervised' / 'seed_0'
  def preempted_after_some_work(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    start = time.process_time()
    while time.process_time() - start < 0.05:
      pass
    raise errors.Preempted('SIGTERM: saved at step 3')
  charged = []
  for _ in range(2):
    with pytest.raises(errors.Preempted):
      sweeps.one_run(run, row, str(run_dir), preempted_after_some_work)
    with open(run_dir / sweeps.CPU_TIME_FILE) as f:
      charged.append(json.load(f)['cpu_time_s'])
  assert 0.05 <= charged[0] and charged[0] + 0.05 <= charged[1]
