"""The Fashion-MNIST sweep (experiments/fashion_mnist.py): resume run by run, tuning protocol, `:quick` through main."""

import json
import os
import subprocess
import sys

import pytest

from configs import fashion_mnist as fashion_mnist_config
from meta_pseudo_labels import errors
from meta_pseudo_labels.experiments import fashion_mnist
from meta_pseudo_labels.rundir import sweeps
from test_data_sources import write_idx_directory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class FakeTrain:
  """A train program that writes a results.json whose top-1 is a function of the run's config; counts its calls."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir):
    self.calls.append(workdir)
    top1 = (0.70 + 0.01 * config.seed + 0.05 * (config.method == 'mpl') - 0.02 * (config.mpl.feedback == 'none')
            + 0.001 * config.uda.weight + 0.0001 * config.dataset.cutout_size)
    models = ('teacher', 'student', 'student_ema', 'student_finetuned') if config.method == 'mpl' else (
        'model', 'model_ema')
    results = {'final': {split: {model: {'top1': top1} for model in models} for split in ('validation', 'test')},
               'wall_time_s': 10.0, 'config': config.to_dict()}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, sweeps.RUN_RESULTS_FILE), 'w') as f:
      json.dump(results, f)
    return results


def _config(**sweep):
  config = fashion_mnist_config.get_config()
  config.sweep.methods = fashion_mnist.CLAIM_ROWS
  config.sweep.num_seeds = 2
  config.sweep.update(sweep)
  return config


def test_a_finished_run_is_read_back_not_rerun(tmp_path):
  train = FakeTrain()
  first = fashion_mnist.run(_config(), str(tmp_path), train_fn=train)
  assert len(train.calls) == 8 and len(set(train.calls)) == 8
  assert train.calls[:4] == [str(tmp_path / name / 'seed_0') for name in fashion_mnist.CLAIM_ROWS]  # seed by seed
  pair = first['paired_differences']['uda_mpl - uda_mpl_control']
  assert pair['seeds'] == [0, 1] and pair['mean'] == pytest.approx(0.02)
  assert pair['interval'] == pytest.approx([0.02, 0.02])   # the same difference on both seeds
  base_gain = first['paired_differences']['uda - supervised']   # the bases against labels alone, paired too
  assert base_gain['seeds'] == [0, 1] and base_gain['mean'] == pytest.approx(0.001 * _config().uda.weight)

  def must_not_train(config, workdir):
    raise AssertionError(f'{workdir} finished already, yet was trained again')
  again = fashion_mnist.run(_config(), str(tmp_path), train_fn=must_not_train)
  assert again['rows']['uda']['test_top1'] == first['rows']['uda']['test_top1']
  assert all(run['reused'] for row in again['rows'].values() for run in row['runs'])

  # Stopped midway: 'report' tables what finished, trains nothing; 'run' then trains only what is missing.
  os.remove(tmp_path / 'uda_mpl' / 'seed_1' / sweeps.RUN_RESULTS_FILE)
  report = fashion_mnist.run(_config(mode='report'), str(tmp_path), train_fn=must_not_train)
  assert [run['seed'] for run in report['rows']['uda_mpl']['runs']] == [0]
  assert report['paired_differences']['uda_mpl - uda']['seeds'] == [0]
  table = open(tmp_path / fashion_mnist.TABLE_FILE).read()
  assert '| uda_mpl | 1/2 |' in table and '| uda_mpl - uda | 0 | +5.0 | - (one seed) |' in table   # no spread shown
  train.calls.clear()
  fashion_mnist.run(_config(), str(tmp_path), train_fn=train)
  assert train.calls == [str(tmp_path / 'uda_mpl' / 'seed_1')]
  # A run of another config in the same directory is not "finished": it goes to the train program (which resumes).
  train.calls.clear()
  fashion_mnist.run(_config(num_seeds=1), str(tmp_path), train_fn=train)
  assert not train.calls
  changed = _config(num_seeds=1)
  changed.uda.threshold = 0.5
  fashion_mnist.run(changed, str(tmp_path), train_fn=train)
  assert len(train.calls) == 4


def test_tune_bases_picks_on_validation_and_the_sweep_reuses_the_picks(tmp_path):
  train = FakeTrain()
  bases = fashion_mnist.run(_config(mode='tune_bases'), str(tmp_path), train_fn=train)
  views, uda = (dict(fashion_mnist.TUNING_STAGES[i][2]) for i in range(2))
  assert len(train.calls) == 4 + 8 + 1   # 2 x 2 views, 2 x 2 x 2 UDA settings, the supervised budget run
  # FakeTrain's validation top-1 grows with the Cutout size and the UDA weight: the largest of each is picked.
  assert bases['picked']['views']['dataset.cutout_size'] == max(views['dataset.cutout_size'])
  assert bases['picked']['uda']['uda.weight'] == max(uda['uda.weight'])
  assert set(bases['budget']) == {'supervised', 'randaugment', 'uda'}
  path = tmp_path / fashion_mnist.BASES_FILE
  assert json.loads(path.read_text())['num_train_steps'] == 3000
  config = _config(bases=str(path), num_seeds=1)
  train.calls.clear()
  result = fashion_mnist.run(config, str(tmp_path / 'sweep'), train_fn=train)
  assert result['tuned_fields']['uda.weight'] == max(uda['uda.weight'])
  # FakeTrain's curves are empty: no gain can be measured, so no base counts as converged, and the table says so.
  assert result['budget_enough'] is False
  assert 'Budget: NOT enough by the stated criterion' in open(tmp_path / 'sweep' / fashion_mnist.TABLE_FILE).read()
  # Seed 0 of the bases at the picked settings finished during tuning: read back from there, not trained again.
  assert train.calls == [str(tmp_path / 'sweep' / name / 'seed_0') for name in ('uda_mpl', 'uda_mpl_control')]
  assert result['rows']['supervised']['runs'][0]['workdir'] == str(tmp_path / 'tune' / 'budget' / 'supervised' /
                                                                   'seed_0')
  with open(tmp_path / 'sweep' / 'uda_mpl' / 'seed_0' / sweeps.RUN_RESULTS_FILE) as f:
    mpl_config = json.load(f)['config']
  assert mpl_config['uda']['weight'] == max(uda['uda.weight']) and mpl_config['dataset']['cutout_size'] == 12
  with open(tmp_path / 'tune' / 'budget' / 'supervised' / 'seed_0' / sweeps.RUN_RESULTS_FILE) as f:
    assert json.load(f)['config']['uda']['weight'] == 0   # the row's own fields win over the picks
  config.num_train_steps = 100
  with pytest.raises(errors.ConfigError, match='tuned at 3000 steps, this sweep runs 100') as error:
    fashion_mnist.run(config, str(tmp_path / 'sweep'), train_fn=train)
  assert '\n' not in str(error.value)


class FakePrecompute:
  """A precompute program that records each call's teacher, pool seed and directory."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir):
    assert config.experiment == 'precompute_targets'
    self.calls.append((config.reduced.teacher, config.dataset.split_seed, workdir))


def test_reduced_mode_uses_the_best_base_as_teacher_and_pairs_reduced_mpl_with_its_controls(tmp_path):
  train, precompute = FakeTrain(), FakePrecompute()
  fashion_mnist.run(_config(mode='tune_bases'), str(tmp_path), train_fn=train)
  bases = str(tmp_path / fashion_mnist.BASES_FILE)
  config = _config(mode='reduced', bases=bases, methods=())
  with pytest.raises(errors.ConfigError, match="sweep.bases: empty; Reduced MPL's teacher"):
    fashion_mnist.run(_config(mode='reduced', methods=()), str(tmp_path / 'sweep'), train_fn=train,
                      precompute_fn=precompute)
  train.calls.clear()
  result = fashion_mnist.run(config, str(tmp_path / 'sweep'), train_fn=train, precompute_fn=precompute)
  # FakeTrain's validation top-1 grows with the UDA weight: the uda base (the tuning's run) is T, read back.
  picked = json.loads((tmp_path / fashion_mnist.BASES_FILE).read_text())['picked']['uda']
  teacher_dir = tmp_path / 'tune' / 'uda' / ','.join(f'{k.split(".")[-1]}={v}' for k, v in picked.items()) / 'seed_0'
  assert result['teacher'] == f'{teacher_dir}:model_ema' and result['teacher_row'] == 'uda'
  assert precompute.calls == [(result['teacher'], seed, str(tmp_path / 'sweep' / 'targets' / f'seed_{seed}'))
                              for seed in (0, 1)]
  # The candidates for T are the bases' seed-0 runs at the sweep's exact configs: supervised and uda finished during
  # tuning; the views stage's randaugment run predates the UDA picks (unused by it, but another config): trained.
  expected = [('randaugment', 0)] + [(name, seed) for seed in (0, 1) for name in fashion_mnist.REDUCED_ROWS]
  assert train.calls == [str(tmp_path / 'sweep' / name / f'seed_{seed}') for name, seed in expected]
  with open(tmp_path / 'sweep' / 'reduced_mpl' / 'seed_1' / sweeps.RUN_RESULTS_FILE) as f:
    run = json.load(f)['config']
  assert (run['mpl']['teacher'], run['mpl']['feedback'], run['uda']['weight']) == ('reduced', 'hard_taylor', 0.0)
  assert run['reduced']['targets_dir'] == str(tmp_path / 'sweep' / 'targets' / 'seed_1')
  pair = result['paired_differences']['reduced_mpl - distill_sampled']
  assert pair['seeds'] == [0, 1] and pair['mean'] == pytest.approx(0.02)   # FakeTrain: feedback off costs 0.02
  table = open(tmp_path / 'sweep' / fashion_mnist.REDUCED_TABLE_FILE).read()
  assert '| reduced_mpl - distill_soft | 0, 1 |' in table and f'T: {result["teacher"]} (the uda row' in table
  # Rerun: nothing trained again; 'report' writes the Reduced table of what finished, precomputing nothing.
  os.remove(tmp_path / 'sweep' / 'distill_soft' / 'seed_1' / sweeps.RUN_RESULTS_FILE)
  train.calls.clear()
  precompute.calls.clear()
  fashion_mnist.run(_config(mode='report', bases=bases), str(tmp_path / 'sweep'), train_fn=FakeTrain(),
                    precompute_fn=precompute)
  assert not precompute.calls
  assert '| distill_soft | 1/2 |' in open(tmp_path / 'sweep' / fashion_mnist.REDUCED_TABLE_FILE).read()
  fashion_mnist.run(config, str(tmp_path / 'sweep'), train_fn=train, precompute_fn=precompute)
  assert train.calls == [str(tmp_path / 'sweep' / 'distill_soft' / 'seed_1')]


def test_rows_and_config():
  config = fashion_mnist_config.get_config()
  assert config.dataset.num_labeled == 400 and config.dataset.source == 'idx'
  control = sweeps.run_config(config, fashion_mnist.ROWS['uda_mpl_control'], 2)
  assert (control.method, control.mpl.feedback, control.seed, control.dataset.split_seed) == ('mpl', 'none', 2, 2)
  assert control.uda.weight == config.uda.weight > 0
  randaugment = sweeps.run_config(config, fashion_mnist.ROWS['randaugment_mpl'], 0)
  assert randaugment.dataset.labeled_view == 'strong' and randaugment.uda.weight == 0
  config.sweep.methods = ('uda', 'typo')
  with pytest.raises(errors.ConfigError, match='sweep.methods'):
    fashion_mnist.row_names(config)


def test_quick_runs_the_claim_rows_in_the_table_and_every_row_in_reduced_mode():
  """`:quick` names rows of both modes' tables; each mode runs its own (the README's commands with `:quick`)."""
  quick = fashion_mnist_config.get_config('quick')
  assert fashion_mnist.row_names(quick) == fashion_mnist.CLAIM_ROWS
  quick.sweep.mode = 'reduced'
  assert fashion_mnist.row_names(quick) == tuple(fashion_mnist.REDUCED_ROWS)


@pytest.mark.slow
def test_quick_through_main(tmp_path):
  """`:quick` through main on small idx files, 4 steps: RandAugment (a claim-less row: 1 seed; labeled strong views)
  and UDA + MPL (2 seeds, its diagnosis)."""
  data = tmp_path / 'data'
  write_idx_directory(str(data), num_train=200, num_test=60)
  workdir = tmp_path / 'sweep'
  command = [sys.executable, '-m', 'meta_pseudo_labels.main', '--config=configs/fashion_mnist.py:quick',
             f'--workdir={workdir}', f'--config.dataset.data_dir={data}', '--config.num_train_steps=4',
             "--config.sweep.methods=('randaugment', 'uda_mpl')", '--config.dataset.num_labeled=20',
             '--config.dataset.num_validation=20', '--config.batch_size=4', '--config.uda_ratio=2',
             '--config.finetune.batch_size=4', '--config.eval_every_steps=2', '--config.eval_batch_size=20']
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_backend_optimization_level=0')
  completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert '| randaugment | 1/1 (other) |' in completed.stdout and '| uda_mpl | 2/2 |' in completed.stdout
  assert '| uda_mpl - uda_mpl_control |' not in completed.stdout   # the control did not run
  with open(workdir / fashion_mnist.RESULTS_FILE) as f:
    results = json.load(f)
  mpl_run = results['rows']['uda_mpl']['runs'][1]
  assert mpl_run['seed'] == 1 and [step for step, _ in mpl_run['validation_curve']] == [2, 4]
  assert [step for step, _ in mpl_run['curves']['mpl/feedback_logits_grad_norm']]
  assert set(mpl_run['diagnosis']['teacher_on_validation']) == {'eval', 'weak', 'strong'}
  assert results['cpu_hours'] > 0
  with open(os.path.join(results['rows']['randaugment']['runs'][0]['workdir'], sweeps.RUN_RESULTS_FILE)) as f:
    assert json.load(f)['config']['dataset']['labeled_view'] == 'strong'
  with open(workdir / fashion_mnist.FIGURE_FILE, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE


@pytest.mark.slow
def test_reduced_mode_through_main(tmp_path):
  """'reduced' through main on small idx files, 4 steps: T's candidates trained (no tuning ran: a bases file with no
  picks), T's targets precomputed by the real program, one Reduced MPL run with its feedback logged."""
  data = tmp_path / 'data'
  write_idx_directory(str(data), num_train=200, num_test=60)
  bases = tmp_path / 'bases.json'
  bases.write_text(json.dumps({'picked': {}, 'num_train_steps': 4, 'workdirs': []}))
  workdir = tmp_path / 'sweep'
  command = [sys.executable, '-m', 'meta_pseudo_labels.main', '--config=configs/fashion_mnist.py:quick',
             f'--workdir={workdir}', f'--config.dataset.data_dir={data}', '--config.num_train_steps=4',
             '--config.sweep.mode=reduced', f'--config.sweep.bases={bases}', "--config.sweep.methods=('reduced_mpl',)",
             '--config.sweep.num_seeds=1', '--config.dataset.num_labeled=20', '--config.dataset.num_validation=20',
             '--config.batch_size=4', '--config.uda_ratio=2', '--config.finetune.batch_size=4',
             '--config.eval_every_steps=2', '--config.eval_batch_size=20', '--config.reduced.chunk_size=64',
             '--config.reduced.hidden_sizes=(16,)']
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_backend_optimization_level=0')
  completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert '| reduced_mpl | 1/1 |' in completed.stdout
  with open(workdir / fashion_mnist.REDUCED_RESULTS_FILE) as f:
    results = json.load(f)
  assert results['teacher_row'] in fashion_mnist.TEACHER_CANDIDATES
  run = results['rows']['reduced_mpl']['runs'][0]
  assert [step for step, _ in run['curves']['mpl/h']] and results['steps_per_second']['reduced_mpl'][0] > 0
  assert sorted(os.listdir(workdir / 'targets' / 'seed_0'))   # the precompute's files
