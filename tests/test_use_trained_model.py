"""Using what a run trained, through the programs a user runs: predict, export, the run report, warm starts.

One tiny MPL run on a generated image folder (module fixture: WRN-10-1, 16x16 images, a few steps) is shared by
every test; the commands are the README's "Use the trained model" section with temporary paths. Each program runs
in a subprocess with the XLA cache and flags of test_main_e2e, so the second training run (the warm start, same
shapes and hyper-parameters) compiles nothing new.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from test_data_sources import write_image_folder  # pylint: disable=g-bad-import-order
from test_main_e2e import _env, _read_scalars, REPO  # pylint: disable=g-bad-import-order

from meta_pseudo_labels import errors
from meta_pseudo_labels.trained import trained_models

CLASSES = ('ant', 'bee', 'cat', 'dog')
PER_CLASS = 6
RUN = (
    '--config=configs/cifar10_4k.py:cpu',
    '--config.dataset.source=folder',
    f'--config.dataset.num_classes={len(CLASSES)}',
    '--config.dataset.num_labeled=8',
    '--config.dataset.num_validation=4',
    '--config.dataset.image_size=16',
    '--config.model.name=wrn10_1',
    '--config.num_train_steps=4',
    '--config.finetune.num_steps=2',
    '--config.batch_size=4',
    '--config.uda_ratio=2',
    '--config.eval_batch_size=8',
    '--config.finetune.batch_size=4',
    '--config.student_optimizer.wait_steps=0',
    '--config.teacher_optimizer.warmup_steps=1',
    '--config.student_optimizer.warmup_steps=1',
    '--config.log_every_steps=1',
    '--config.eval_every_steps=2',
    '--config.checkpoint_every_steps=4',
)


def _run(compilation_cache, module, *flags, expect=0, cwd=REPO):
  process = subprocess.run([sys.executable, '-m', f'meta_pseudo_labels.{module}', *flags], cwd=cwd,
                           env=_env(compilation_cache), capture_output=True, text=True, timeout=900, check=False)
  assert process.returncode == expect, f'exit {process.returncode}\n{process.stderr[-5000:]}'
  return process


def _train(compilation_cache, root, workdir, *overrides, expect=0):
  return _run(compilation_cache, 'main', *RUN, f'--config.dataset.data_dir={root}', f'--workdir={workdir}',
              *overrides, expect=expect)


def _one_line_error(process):
  lines = process.stderr.strip().splitlines()
  assert lines[-1].startswith('error: '), process.stderr[-3000:]
  return lines[-1]


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


@pytest.fixture(scope='module')
def trained(tmp_path_factory, compilation_cache):
  """(image-folder root, workdir) of one finished MPL run with finetuning."""
  base = tmp_path_factory.mktemp('trained')
  root, workdir = str(base / 'images'), str(base / 'run')
  write_image_folder(root, classes=CLASSES, per_class=PER_CLASS, size=20)
  _train(compilation_cache, root, workdir)
  return root, workdir


def test_run_report_and_per_class_metrics(trained):
  _, workdir = trained
  with Image.open(os.path.join(workdir, 'report.png')) as image:
    width, height = image.size
    pixels = np.asarray(image.convert('L'))
  assert width > 1000 and height > 500
  assert pixels.std() > 10, 'the report is blank'
  with open(os.path.join(workdir, 'results.json')) as f:
    final = json.load(f)['final']
  for split, per_model in final.items():
    for model, metrics in per_model.items():
      per_class = metrics['per_class_top1']
      assert len(per_class) == len(CLASSES) and 'confusion' not in metrics, (split, model)
      assert 0.0 <= metrics['ece'] <= 1.0, (split, model, metrics['ece'])
      if split == 'test':   # PER_CLASS examples of every class: top-1 is the mean of the per-class accuracies
        assert np.mean(per_class) == pytest.approx(metrics['top1'], abs=1e-6), (model, metrics)


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_predict_on_an_image_folder(trained, compilation_cache, tmp_path):
  root, workdir = trained
  output = str(tmp_path / 'preds.csv')
  _run(compilation_cache, 'predict', f'--workdir={workdir}', f'--images={root}/test', f'--output={output}')
  rows = _read_csv(output)
  images = sorted(os.path.join(root, 'test', name, file) for name in CLASSES
                  for file in os.listdir(os.path.join(root, 'test', name)))
  assert [row['path'] for row in rows] == images
  for row in rows:
    top5, probabilities = row['top5_classes'].split(';'), [float(p) for p in row['top5_probabilities'].split(';')]
    assert sorted(top5) == sorted(CLASSES) and top5[0] == row['class']   # 4 classes: top-5 lists them all
    assert probabilities == sorted(probabilities, reverse=True) and float(row['probability']) == probabilities[0]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
  # The same images, the same network, the same preprocessing as the run's own test evaluation.
  accuracy = np.mean([row['class'] == os.path.basename(os.path.dirname(row['path'])) for row in rows])
  with open(os.path.join(workdir, 'results.json')) as f:
    assert accuracy == pytest.approx(json.load(f)['final']['test']['student_finetuned']['top1'], abs=1e-9)


def test_predict_refuses_an_unreadable_image(trained, compilation_cache, tmp_path):
  _, workdir = trained
  (tmp_path / 'broken.png').write_bytes(b'not a png')
  process = _run(compilation_cache, 'predict', f'--workdir={workdir}', f'--images={tmp_path}',
                 f'--output={tmp_path}/preds.csv', expect=errors.USER_ERROR_EXIT_CODE)
  assert re.fullmatch(r'error: .*broken\.png: unreadable image.*', _one_line_error(process))
  assert not os.path.exists(tmp_path / 'preds.csv')


def test_predict_on_an_npz_file(trained, compilation_cache, tmp_path):
  """Grayscale uint8 images of another size are fitted as in training; vectors are refused in one line."""
  _, workdir = trained
  path = str(tmp_path / 'inputs.npz')
  np.savez(path, x=np.random.default_rng(0).integers(0, 256, (3, 24, 20, 1), dtype=np.uint8))
  _run(compilation_cache, 'predict', f'--workdir={workdir}', f'--npz={path}', f'--output={tmp_path}/preds.csv',
       '--model=teacher')
  assert [row['path'] for row in _read_csv(tmp_path / 'preds.csv')] == [f'{path}[{i}]' for i in range(3)]
  np.savez(path, x=np.zeros((3, 5), np.float32))
  process = _run(compilation_cache, 'predict', f'--workdir={workdir}', f'--npz={path}',
                 f'--output={tmp_path}/vectors.csv', expect=errors.USER_ERROR_EXIT_CODE)
  assert 'float32 (3, 5) is not an input this network takes' in _one_line_error(process)


def test_missing_and_damaged_checkpoints_are_one_line_errors(trained, tmp_path):
  _, workdir = trained
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  with pytest.raises(errors.CheckpointError, match='config.json: missing'):
    trained_models.restore(str(tmp_path / 'nowhere'))
  for array_file in _files_under(os.path.join(copy, 'checkpoints', 'mpl'), 'ocdbt.process_0'):
    with open(array_file, 'r+b') as f:
      f.truncate(8)
  with pytest.raises(errors.CheckpointError, match='damaged checkpoint'):
    trained_models.restore(copy, 'teacher')
  shutil.rmtree(os.path.join(copy, 'checkpoints', 'finetune'))
  with pytest.raises(errors.CheckpointError, match='no such checkpoint directory'):
    trained_models.restore(copy, 'student_finetuned')


def _files_under(directory, part):
  return [os.path.join(path, name) for path, _, names in os.walk(directory) if part in path for name in names]


def _readme_block(heading):
  """The first ```python block after `heading` in README.md: the test runs what users read."""
  with open(os.path.join(REPO, 'README.md')) as f:
    text = f.read()
  return re.search(r'```python\n(.*?)```', text[text.index(heading):], re.S).group(1)


def test_export_reloads_without_this_package_with_equal_logits(trained, compilation_cache, tmp_path):
  root, workdir = trained
  _run(compilation_cache, 'export', f'--workdir={workdir}', f'--output={tmp_path}/exported')
  network = trained_models.load(str(tmp_path / 'exported'))
  assert network.name == 'student_finetuned'
  # A batch of test images as the exported program takes them: 0..255 pixels at the input size.
  pixels = np.stack([np.asarray(Image.open(os.path.join(root, 'test', name, '1.png')).convert('RGB').resize(
      (16, 16), Image.BICUBIC), np.float32) for name in CLASSES] * 2)
  np.save(tmp_path / 'pixels.npy', pixels)
  spec = network.inputs
  expected = np.asarray(network.module().apply(network.variables, (pixels - np.float32(spec.mean)) /
                                               np.float32(spec.std), train=False))
  loader = _readme_block('### Load an exported model') + (
      "np.save('logits.npy', np.asarray(logits))\n"
      "assert not [m for m in sys.modules if m.split('.')[0] in ('meta_pseudo_labels', 'tensorflow', 'flax')]\n")
  subprocess.run([sys.executable, '-c', 'import sys\n' + loader], cwd=tmp_path, check=True, timeout=300,
                 env={k: v for k, v in _env('').items() if not k.startswith(('JAX_COMPILATION', 'PYTHONPATH'))})
  np.testing.assert_allclose(np.load(tmp_path / 'logits.npy'), expected, rtol=1e-5, atol=1e-5)


def test_teacher_init_starts_the_teacher_from_a_previous_run(trained, compilation_cache, tmp_path):
  root, workdir = trained
  warm = str(tmp_path / 'warm')
  log = _train(compilation_cache, root, warm, f'--config.teacher_init={workdir}:teacher').stderr
  assert f'teacher_init: the teacher starts from {workdir}/checkpoints/mpl/4' in log
  fresh_loss, warm_loss = (_read_scalars(w)['teacher/loss'][1] for w in (workdir, warm))
  # Same seed, data and step: only the teacher's starting point differs.
  assert abs(fresh_loss - warm_loss) > 1e-4, (fresh_loss, warm_loss)
  student_loss = 'student/labeled_loss_before'   # the student's own loss before its first update: as fresh
  assert _read_scalars(warm)[student_loss][1] == pytest.approx(_read_scalars(workdir)[student_loss][1], rel=1e-6)


@pytest.mark.parametrize('override, refusal', [
    ('--config.model.name=wrn16_2', r"is a 'wrn10_1' with 4 classes, the teacher here a 'wrn16_2' with 4 classes"),
    (f'--config.dataset.num_classes={len(CLASSES) - 1}', 'it has 4 classes, the teacher here 3'),
])
def test_teacher_init_of_another_architecture_is_refused(trained, compilation_cache, tmp_path, override, refusal):
  root, workdir = trained
  data = root
  if 'num_classes' in override:
    data = str(tmp_path / 'three_classes')
    write_image_folder(data, classes=CLASSES[:-1], per_class=PER_CLASS, size=20)
  target = str(tmp_path / 'refused')
  process = _train(compilation_cache, data, target, f'--config.teacher_init={workdir}:teacher', override,
                   expect=errors.USER_ERROR_EXIT_CODE)
  line = _one_line_error(process)
  assert line.startswith('error: teacher_init: ') and re.search(refusal, line), line
  assert not os.path.exists(os.path.join(target, 'config.json'))
