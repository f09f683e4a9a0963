"""A run whose workdir is a `gs://` URL, on a bucket with no network (tests/fake_gcs.py: what it stands for, what it
cannot prove): train, SIGKILL and resume, predict, export and a warm start, each a program a user runs.

The programs get only URLs; the bucket's files live in a folder they are never told about, and they run in a working
directory of their own, which must stay empty: a URL turned into a local path (`os.path.abspath('gs://b/r')` is
'<cwd>/gs:/b/r') would leave its files there, or fail to find them.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_main_e2e import _env, REPO  # pylint: disable=g-bad-import-order

import fake_gcs  # pylint: disable=g-bad-import-order

LAUNCHER = os.path.join(REPO, 'tests', 'fake_gcs.py')
RUN = (
    f'--config={os.path.join(REPO, "configs", "digits.py")}',
    '--config.experiment=train',
    '--config.num_train_steps=4',
    '--config.finetune.num_steps=2',
    '--config.checkpoint_every_steps=2',
    '--config.eval_every_steps=2',
    '--config.log_every_steps=1',
    '--config.keep_checkpoints=2',
)


def _run(tmp_path, module, *flags, fault=None, expect=0):
  cwd = tmp_path / 'cwd'
  cwd.mkdir(exist_ok=True)
  env = _env(str(tmp_path / 'xla_cache'), **{fake_gcs.ROOT_ENV: str(tmp_path / 'bucket_folder')})
  env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')])
  if fault:
    env['MPL_INJECT_FAULT'] = fault
  process = subprocess.run([sys.executable, LAUNCHER, f'meta_pseudo_labels.{module}', *flags], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=600, check=False)
  assert process.returncode == expect, f'exit {process.returncode}\n{process.stderr[-5000:]}'
  return process


def _in_bucket(tmp_path, url):
  os.environ[fake_gcs.ROOT_ENV] = str(tmp_path / 'bucket_folder')
  return fake_gcs.local_path(url)


@pytest.mark.slow
def test_train_kill_resume_predict_export_and_warm_start_on_a_gs_workdir(tmp_path):
  # The reference: the same run, uninterrupted, in a local folder.
  _run(tmp_path, 'main', *RUN, f'--workdir={tmp_path / "local_run"}')
  reference = json.loads((tmp_path / 'local_run' / 'results.json').read_text())

  workdir = 'gs://bucket/mpl/run'
  killed = _run(tmp_path, 'main', *RUN, f'--workdir={workdir}', fault='kill_saved@mpl:3', expect=-9)
  assert 'results.json' not in os.listdir(_in_bucket(tmp_path, workdir)), killed.stderr[-2000:]
  resumed = _run(tmp_path, 'main', *RUN, f'--workdir={workdir}')
  assert f'resumed from {workdir}/checkpoints/mpl/2' in resumed.stderr, resumed.stderr[-3000:]
  with open(_in_bucket(tmp_path, f'{workdir}/results.json')) as f:
    results = json.load(f)
  assert results['final'] == reference['final']   # bitwise: the floats as JSON writes them
  for name in ('config.json', 'inputs.json', 'report.png', 'checkpoints/mpl/4/commit_success.txt',
               'checkpoints/finetune/2/commit_success.txt'):
    assert os.path.exists(_in_bucket(tmp_path, f'{workdir}/{name}')), name
  assert any(name.startswith('events.out.tfevents') for name in
             os.listdir(_in_bucket(tmp_path, f'{workdir}/tensorboard')))

  images = tmp_path / 'images.npz'
  np.savez(images, x=np.random.default_rng(0).integers(0, 17, (5, 8, 8, 1), dtype=np.uint8))
  _run(tmp_path, 'predict', f'--workdir={workdir}', f'--npz={images}', '--output=gs://bucket/predictions.csv')
  with open(_in_bucket(tmp_path, 'gs://bucket/predictions.csv')) as f:
    assert len(f.read().strip().splitlines()) == 1 + 5

  _run(tmp_path, 'export', f'--workdir={workdir}', '--output=gs://bucket/exported', '--platforms=cpu')
  with open(_in_bucket(tmp_path, 'gs://bucket/exported/metadata.json')) as f:
    assert json.load(f)['network'] == 'student_finetuned'
  assert os.path.exists(_in_bucket(tmp_path, 'gs://bucket/exported/model.jax_exported'))

  warm = 'gs://bucket/mpl/warm'
  started = _run(tmp_path, 'main', *RUN, f'--workdir={warm}', f'--config.teacher_init={workdir}:teacher',
                 '--config.finetune.num_steps=0')
  assert f'teacher_init: the teacher starts from {workdir}/checkpoints/mpl/4' in started.stderr, started.stderr[-3000:]
  assert os.path.exists(_in_bucket(tmp_path, f'{warm}/results.json'))

  assert not os.listdir(tmp_path / 'cwd')   # no URL became a local path
