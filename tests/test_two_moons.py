"""The TwoMoon sweep (experiments/two_moons.py): shortened runs, asserting on the outputs' structure only."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import two_moons as two_moons_config
from meta_pseudo_labels import errors
from meta_pseudo_labels.data import data_sources
from meta_pseudo_labels.experiments import two_moons

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
SHORT = dict(num_train_steps=3, num_seeds=2)


def short_config(**sweep):
  config = two_moons_config.get_config()
  config.num_train_steps = SHORT['num_train_steps']
  config.sweep.num_seeds = SHORT['num_seeds']
  for field, value in sweep.items():
    setattr(config.sweep, field, value)
  return config


def table_rows(table):
  """method name -> the cells of its row in the markdown table."""
  rows = [line.strip('|').split('|') for line in table.splitlines()[2:] if line.startswith('|')]
  return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def assert_outputs(workdir, names):
  with open(os.path.join(workdir, two_moons.RESULTS_FILE)) as f:
    results = json.load(f)
  assert results['experiment'] == 'two_moons'
  assert results['seeds'] == list(range(SHORT['num_seeds']))
  assert results['num_points'] == 2000
  assert set(results['config']) >= {'sweep', 'mpl', 'num_train_steps'}
  assert list(results['methods']) == list(names)
  for labeled in results['labeled_indices']:   # 3 labeled points per moon, all distinct
    _, moons = data_sources.make_two_moons(seed=0)
    assert len(set(labeled)) == 6 and np.bincount(moons[labeled], minlength=2).tolist() == [3, 3]
  for name in names:
    row = results['methods'][name]
    accuracy = row['student_accuracy']
    assert len(accuracy['per_seed']) == SHORT['num_seeds']
    assert all(0.0 <= a <= 1.0 for a in accuracy['per_seed'])
    assert accuracy['min'] <= accuracy['mean'] <= accuracy['max']
    assert accuracy['std'] >= 0.0
    assert (row['teacher_accuracy'] is None) == (two_moons.METHODS[name].trainer == 'supervised')
    for summary in row['train_metrics'].values():
      assert len(summary['mean_over_run']) == SHORT['num_seeds']
  with open(os.path.join(workdir, two_moons.TABLE_FILE)) as f:
    rows = table_rows(f.read())
  assert list(rows) == list(names)
  for name in names:
    assert float(rows[name][0]) == pytest.approx(100 * results['methods'][name]['student_accuracy']['mean'],
                                                 abs=0.051)
  with open(os.path.join(workdir, two_moons.FIGURE_FILE), 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  return results


def test_main_runs_every_method_of_the_sweep_from_the_command_line(tmp_path):
  names = tuple(two_moons.METHODS)
  command = [sys.executable, '-m', 'meta_pseudo_labels.main', '--config=configs/two_moons.py',
             f'--workdir={tmp_path}', f'--config.num_train_steps={SHORT["num_train_steps"]}',
             f'--config.sweep.num_seeds={SHORT["num_seeds"]}']
  # XLA's fastest-compiling CPU level: these runs are compile-bound (the sweep itself runs at the default level).
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_backend_optimization_level=0')
  completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  results = assert_outputs(str(tmp_path), names)
  assert all(f'| {name} |' in completed.stdout for name in names)
  assert str(tmp_path / two_moons.FIGURE_FILE) in completed.stdout
  # MPL's feedback h is recorded where there is one, and is absent with feedback off.
  assert 'mpl/h' in results['methods']['mpl_hard_taylor']['train_metrics']
  for control in ('mpl_feedback_off', 'soft_no_feedback'):
    assert 'mpl/h' not in results['methods'][control]['train_metrics']
  supervised_loss = results['methods']['supervised']['train_metrics']['train/loss']
  assert len(supervised_loss['last_step']) == SHORT['num_seeds']   # what the budget's criterion reads


def test_the_papers_row_samples_its_labels_and_the_ablations_differ_from_it_in_one_field():
  paper = dict(two_moons.METHODS['mpl_hard_taylor'].mpl_fields)
  assert paper == {'feedback': 'hard_taylor', 'pseudo_labels': 'sampled', 'h_sign': 1.0}
  assert dict(two_moons.METHODS['mpl_argmax'].mpl_fields) == dict(paper, pseudo_labels='argmax')
  assert dict(two_moons.METHODS['mpl_flipped_sign'].mpl_fields) == dict(paper, h_sign=-1.0)
  assert dict(two_moons.METHODS['soft_no_feedback'].mpl_fields) == {'feedback': 'none', 'pseudo_labels': 'soft'}
  assert dict(two_moons.METHODS['mpl_exact'].mpl_fields) == {'feedback': 'exact', 'pseudo_labels': 'soft'}
  assert two_moons_config.get_config().num_train_steps == 50_000


def test_methods_share_labeled_points_and_initialisation():
  """Seed i draws the same labeled points and initial networks for every method; different seeds differ."""
  config = short_config()
  _, labels = data_sources.make_two_moons(seed=config.dataset.split_seed)
  splits = [two_moons._choose_split(two_moons._seed_keys(config, seed).split, labels, 6) for seed in (0, 0, 1)]
  np.testing.assert_array_equal(splits[0].labeled, splits[1].labeled)
  assert set(np.asarray(splits[0].labeled)) != set(np.asarray(splits[2].labeled))
  for split in splits:
    assert np.intersect1d(split.labeled, split.unlabeled).size == 0
    assert len(split.labeled) + len(split.unlabeled) == len(labels)


@pytest.mark.parametrize('field, value, message', [
    ('methods', ('supervised', 'mpl_typo'), 'sweep.methods'),
    ('num_seeds', 0, 'sweep.num_seeds'),
    ('plot_seed', 2, 'sweep.plot_seed'),
])
def test_bad_sweep_settings_are_one_line_config_errors(tmp_path, field, value, message):
  with pytest.raises(errors.ConfigError, match=message) as error:
    two_moons.run(short_config(**{field: value}), str(tmp_path))
  assert '\n' not in str(error.value)
  assert not os.listdir(tmp_path)
