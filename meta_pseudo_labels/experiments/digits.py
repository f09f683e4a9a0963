"""The digits benchmark: every method on real 8x8 handwritten digits (scikit-learn's), through the real train loop.

Each (method, seed) is one complete `train.train_and_evaluate` run (the program a user runs: input pipeline with
the digits augmentations, jitted steps, EMA, finetuning, validation and test evaluation) in its own directory
WORKDIR/<method>/seed_<i>; rerunning the command resumes or reuses the finished runs. Seed i sets both
`config.seed` (initialisation, batch order, augmentations) and `dataset.split_seed` (which 10 images per class are
labeled, which 200 validate); the test split is fixed (data_sources.py).

Main (`config.experiment='digits'`) hands this module the one-run program as `train_fn`: program modules never
import one another.

Reported model per method (fixed before any result): the EMA network for supervised and UDA, and for MPL the
finetuned student (finetuning starts from the EMA student, Sec. 3.2), the network the paper reports; the table also
shows MPL's teacher and its raw and EMA students.

Writes to the workdir: `digits_results.json` (per method and seed: every model's validation and test top-1, the
validation curve), `digits_table.md` and `digits_validation.png` (validation top-1 against steps, mean over seeds).
"""

import dataclasses
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from meta_pseudo_labels import errors
from meta_pseudo_labels.rundir import reporting
from meta_pseudo_labels.rundir import run_directory
from meta_pseudo_labels.trained import networks

RESULTS_FILE = 'digits_results.json'
TABLE_FILE = 'digits_table.md'
FIGURE_FILE = 'digits_validation.png'


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the table: `config.method`, the `config.mpl` fields it sets, UDA in the teacher or not."""
  description: str
  method: str                                  # config.method: 'supervised' | 'uda' | 'mpl'
  mpl_fields: tuple[tuple[str, Any], ...] = ()
  uda: bool = True                             # False: uda.weight = 0

  @property
  def reported_model(self):
    """The run's last evaluated network: the finetuned student (MPL), the EMA network otherwise."""
    return networks.of_run(self.method, finetune_steps=1)[-1].name

  @property
  def curve_model(self):
    """The network whose validation accuracy the figure draws (the main phase's last, evaluated during it)."""
    return networks.of_run(self.method, finetune_steps=0)[-1].name


METHODS = {
    'supervised': Method('labeled images only', 'supervised', uda=False),
    'uda': Method('the MPL teacher alone: labeled loss + UDA', 'uda'),
    'mpl': Method('MPL (paper): sampled hard labels, hard_taylor, UDA teacher', 'mpl',
                  (('feedback', 'hard_taylor'), ('pseudo_labels', 'sampled'))),
    'mpl_exact': Method('MPL, soft labels, meta-gradient through the student step', 'mpl',
                        (('feedback', 'exact'), ('pseudo_labels', 'soft'))),
    'mpl_argmax': Method('ablation: argmax hard labels (released code)', 'mpl',
                         (('feedback', 'hard_taylor'), ('pseudo_labels', 'argmax'))),
    'mpl_no_uda': Method('ablation: MPL without UDA in the teacher', 'mpl',
                         (('feedback', 'hard_taylor'), ('pseudo_labels', 'sampled')), uda=False),
}


def method_names(config):
  """The methods the sweep runs, in table order; a one-line ConfigError for an unknown name."""
  names = tuple(config.sweep.methods) or tuple(METHODS)
  unknown = [name for name in names if name not in METHODS]
  if unknown:
    raise errors.ConfigError(f'sweep.methods: unknown method(s) {unknown}; choose from {list(METHODS)}')
  if config.sweep.num_seeds < 1:
    raise errors.ConfigError(f'sweep.num_seeds: must be >= 1, got {config.sweep.num_seeds}')
  return names


def run_config(config, method, seed):
  """The one-run config of `method` and `seed`: a resolved copy of `config`, run by the train program."""
  run = config.copy_and_resolve_references()
  run.experiment = 'train'
  run.method = method.method
  run.seed = seed
  run.dataset.split_seed = seed
  for field, value in method.mpl_fields:
    setattr(run.mpl, field, value)
  if not method.uda:
    run.uda.weight = 0.0
  return run


def _summary(values):
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()), 'std': float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def _one_run(config, name, seed, workdir, train_fn):
  """Trains (or resumes) one run; returns its final top-1 per split and model, and its validation curve."""
  method = METHODS[name]
  run_dir = os.path.join(workdir, name, f'seed_{seed}')
  start = time.time()
  results = train_fn(run_config(config, method, seed), run_dir)
  tag = f'validation/{method.curve_model}/top1'
  curve = sorted(run_directory.read_scalars(run_directory.RunDirectory(run_dir).tensorboard).get(tag, {}).items())
  top1 = {split: {model: values['top1'] for model, values in per_model.items()}
          for split, per_model in results['final'].items()}
  logging.info('digits: %s seed %d: test top-1 %.2f %% (%s), %.0f s', name, seed,
               100 * top1['test'][method.reported_model], method.reported_model, time.time() - start)
  return {'top1': top1, 'validation_curve': curve, 'workdir': run_dir, 'wall_time_s': time.time() - start}


def _method_result(config, name, seeds, workdir, train_fn):
  method = METHODS[name]
  runs = [_one_run(config, name, seed, workdir, train_fn) for seed in seeds]
  test = {model: [run['top1']['test'][model] for run in runs] for model in runs[0]['top1']['test']}
  return {
      'description': method.description,
      'config_method': method.method,
      'config_mpl': dict(method.mpl_fields),
      'uda_in_teacher': method.uda,
      'reported_model': method.reported_model,
      'test_top1': {model: {'per_seed': values, **_summary(values)} for model, values in test.items()},
      'runs': runs,
  }


def _cell(result, model):
  values = result['test_top1'].get(model)
  return f"{100 * values['mean']:.1f} ± {100 * values['std']:.1f}" if values else '-'


def format_table(results, names):
  """Markdown: test top-1 (%) mean ± std over seeds of the reported model; MPL's other networks beside it."""
  lines = ['| method | test top-1 (%) | per seed | reported model | MPL teacher | MPL student | MPL EMA student | '
           'what it is |', '|---|---:|---|---|---:|---:|---:|---|']
  for name in names:
    result = results[name]
    reported = result['reported_model']
    per_seed = ', '.join(f'{100 * v:.1f}' for v in result['test_top1'][reported]['per_seed'])
    lines.append(f"| {name} | {_cell(result, reported)} | {per_seed} | {reported} | "
                 f"{_cell(result, networks.TEACHER.name)} | {_cell(result, networks.STUDENT.name)} | "
                 f"{_cell(result, networks.STUDENT_EMA.name)} | {result['description']} |")
  return '\n'.join(lines) + '\n'


def plot_validation(path, results, names, num_steps):
  """Validation top-1 against steps per method: the mean over seeds, the band from the lowest to the highest."""
  import matplotlib   # pylint: disable=g-import-not-at-top  # only the figure needs matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt   # pylint: disable=g-import-not-at-top

  figure, axis = plt.subplots(figsize=(7, 4.5))
  for name in names:
    curves = [run['validation_curve'] for run in results[name]['runs']]
    steps = sorted(set.intersection(*[{step for step, _ in curve} for curve in curves]))
    if not steps:
      continue
    values = np.array([[dict(curve)[step] for step in steps] for curve in curves]) * 100
    line, = axis.plot(steps, values.mean(axis=0), marker='.', label=f'{name} ({METHODS[name].curve_model})')
    axis.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
  axis.set_xlim(0, num_steps)
  axis.set_xlabel('training step')
  axis.set_ylabel('validation top-1 (%)')
  axis.set_title(f'digits (8x8, 10 labels per class): mean over {len(results[names[0]]["runs"])} seeds, min-max band',
                 fontsize=9)
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  figure.tight_layout()
  run_directory.save_figure(figure, path, dpi=90)
  plt.close(figure)


def _share_compilations(workdir):
  """Seeds of one method compile the same programs: a persistent XLA cache (unless one is set) compiles them once."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'xla_cache'))


def run(config, workdir, *, train_fn):
  """Runs every method of the sweep for every seed with `train_fn(config, workdir)`; writes and prints the table."""
  start = time.time()
  names = method_names(config)
  _share_compilations(workdir)
  seeds = list(range(config.sweep.num_seeds))
  results = {name: _method_result(config, name, seeds, workdir, train_fn) for name in names}
  run_directory.as_path(workdir).mkdir(parents=True, exist_ok=True)
  paths = {key: os.path.join(workdir, file) for key, file in
           (('results', RESULTS_FILE), ('table', TABLE_FILE), ('figure', FIGURE_FILE))}
  table = format_table(results, names)
  plot_validation(paths['figure'], results, names, config.num_train_steps)
  wall_time = time.time() - start
  return reporting.write_sweep_results(
      config, paths, table, {'experiment': 'digits', 'seeds': seeds, 'methods': results, 'wall_time_s': wall_time},
      f'Digits: test top-1 over the {len(seeds)} seeds, {config.num_train_steps} steps per run ({wall_time:.0f} s)')
