"""The program runs where JAX runs: training (with its evaluation and run report), predict and export, in processes
where importing TensorFlow, TFDS and clu fails (an accelerator machine without them, issue 24).

The blocker is a `sitecustomize` module first on PYTHONPATH that wraps every meta-path finder so that it does not
see those packages or their submodules: they are not installed, as far as the program can tell. The data is an
image folder (PIL) with the CIFAR views (RandAugment, Cutout) made on the device; metrics go through the
tensorboard package's own event writer.
"""

import csv
import json
import os
import subprocess
import sys

from test_data_sources import write_image_folder  # pylint: disable=g-bad-import-order
from test_main_e2e import _env, REPO  # pylint: disable=g-bad-import-order

BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu')
BLOCKER = f'''import sys


class _WithoutBlocked:
  """A meta-path finder that does not see {BLOCKED} or their submodules: they import as if not installed
  (ModuleNotFoundError) and importlib.util.find_spec returns None for them."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {BLOCKED!r}:
      return None
    return self._finder.find_spec(name, path, target)

  def __getattr__(self, name):
    return getattr(self._finder, name)


sys.meta_path[:] = [_WithoutBlocked(f) if hasattr(f, 'find_spec') else f for f in sys.meta_path]
'''
CLASSES = ('ant', 'bee', 'cat')
RUN = (
    '--config=configs/cifar10_4k.py:cpu',
    '--config.dataset.source=folder',
    f'--config.dataset.num_classes={len(CLASSES)}',
    '--config.dataset.num_labeled=6',
    '--config.dataset.num_validation=3',
    '--config.dataset.image_size=16',
    '--config.model.name=wrn10_1',
    '--config.num_train_steps=4',
    '--config.finetune.num_steps=2',
    '--config.batch_size=3',
    '--config.uda_ratio=2',
    '--config.eval_batch_size=6',
    '--config.finetune.batch_size=3',
    '--config.student_optimizer.wait_steps=0',
    '--config.teacher_optimizer.warmup_steps=1',
    '--config.student_optimizer.warmup_steps=1',
    '--config.log_every_steps=1',
    '--config.eval_every_steps=2',
    '--config.checkpoint_every_steps=2',
)


def _run(env, *command):
  process = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=900, check=False)
  assert process.returncode == 0, f'exit {process.returncode}\n{process.stderr[-5000:]}'
  return process


def test_train_evaluate_report_predict_and_export_without_tensorflow_tfds_and_clu(tmp_path):
  blocker = tmp_path / 'blocker'
  blocker.mkdir()
  (blocker / 'sitecustomize.py').write_text(BLOCKER)
  env = _env(str(tmp_path / 'xla_cache'), PYTHONPATH=os.pathsep.join([str(blocker), REPO]))
  for name in BLOCKED:   # the blocker works
    process = subprocess.run([sys.executable, '-c', f'import {name}'], env=env, capture_output=True, text=True,
                             check=False)
    assert process.returncode != 0 and f"No module named '{name}'" in process.stderr, name

  root, workdir = str(tmp_path / 'images'), str(tmp_path / 'run')
  write_image_folder(root, classes=CLASSES, per_class=6, size=20)
  _run(env, '-m', 'meta_pseudo_labels.main', *RUN, f'--config.dataset.data_dir={root}', f'--workdir={workdir}')
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert 0.0 <= results['final']['test']['student_finetuned']['top1'] <= 1.0
  assert os.path.getsize(os.path.join(workdir, 'report.png')) > 0
  events = [name for name in os.listdir(os.path.join(workdir, 'tensorboard')) if name.startswith('events.')]
  assert events   # the tensorboard package's event writer stood in for clu's

  output = str(tmp_path / 'preds.csv')
  _run(env, '-m', 'meta_pseudo_labels.predict', f'--workdir={workdir}', f'--images={root}/test',
       f'--output={output}')
  with open(output) as f:
    rows = list(csv.reader(f))
  assert len(rows) == 1 + 6 * len(CLASSES) and {row[1] for row in rows[1:]} <= set(CLASSES)

  _run(env, '-m', 'meta_pseudo_labels.export', f'--workdir={workdir}', f'--output={tmp_path}/exported')
  assert os.listdir(tmp_path / 'exported')
