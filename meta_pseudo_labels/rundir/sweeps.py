"""What the sweeps of whole training runs share (experiments/digits.py, experiments/fashion_mnist.py).

A sweep is rows (a method and the config fields it sets) times seeds; each (row, seed) is one complete
`train.train_and_evaluate` run, the program a user runs, in its own directory. Main hands the sweep that program as
`train_fn` (program modules never import one another).

Resume, run by run: a directory whose `results.json` holds exactly the run's config is a finished run and is read
back, never rerun; an unfinished one of the same config is handed to `train_fn`, which resumes it from its
checkpoints (one of another config is refused). A sweep can so be stopped at any point and continued by rerunning the
same command.
"""

import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np
from scipy import stats

from meta_pseudo_labels import errors
from meta_pseudo_labels.rundir import run_directory

RUN_RESULTS_FILE = run_directory.RESULTS
CPU_TIME_FILE = 'sweep_cpu_time.json'   # CPU seconds of the sweep processes that trained the run


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a sweep's table: `config.method`, the dotted config fields it sets, and the networks it reads.

  The networks are names of trained/networks.py's table, which the experiment hands in
  (`networks.sweep_row`): this folder sits below that one.
  """
  description: str
  method: str                                  # config.method: 'supervised' | 'uda' | 'mpl'
  fields: tuple[tuple[str, Any], ...] = ()     # (('mpl.feedback', 'none'), ('uda.weight', 0.0), ...)
  reported_model: str = dataclasses.field(kw_only=True)   # the network the table reports, fixed before any result
  curve_model: str = dataclasses.field(kw_only=True)      # the network whose validation curve the figure draws


def set_fields(config, fields):
  """Sets dotted fields ('uda.weight') of an ml_collections config in place."""
  for path, value in fields:
    *parents, name = path.split('.')
    node = config
    for parent in parents:
      node = getattr(node, parent)
    setattr(node, name, value)
  return config


def run_config(config, row, seed, extra_fields=()):
  """The one-run config of `row` and `seed` (its initialisation and its labeled split): a resolved copy."""
  run = config.copy_and_resolve_references()
  run.experiment = 'train'
  run.method = row.method
  run.seed = seed
  run.dataset.split_seed = seed
  return set_fields(set_fields(run, extra_fields), row.fields)


def finished_results(run_dir, config):
  """The results.json of a run of `config` finished in `run_dir`, else None.

  Every field counts but `sweep` (which rows and seeds, the mode: nothing a single run reads), so the table of a
  sweep stopped and continued with other seeds or rows, or in 'report' mode, still finds its finished runs.
  """
  rundir = run_directory.RunDirectory(run_dir)
  if not rundir.exists(run_directory.RESULTS):
    return None
  results = rundir.read_json(run_directory.RESULTS)
  stored, wanted = dict(results.get('config', {})), json.loads(json.dumps(config.to_dict()))
  stored.pop('sweep', None)
  wanted.pop('sweep', None)
  return results if stored == wanted else None


def one_run(run, row, run_dir, train_fn, *, curve_tags=()):
  """Trains, resumes or reads back one run (`run`: its config); its top-1 per split and model, and its curves.

  `curve_tags`: further TensorBoard scalars to record beside the validation curve of `row.curve_model`.
  """
  start = time.time()
  results = finished_results(run_dir, run)
  reused = results is not None
  if not reused:
    _check_unfinished(run_dir, run)
    cpu_start = time.process_time()
    try:
      results = train_fn(run, run_dir)
    finally:   # a stretch stopped by SIGTERM (saved, resumed later) counts too; only a SIGKILL loses its CPU time
      _add_cpu_time(run_dir, time.process_time() - cpu_start)
  curve_tag = f'validation/{row.curve_model}/top1'
  recorded = run_directory.read_scalars(run_directory.RunDirectory(run_dir).tensorboard)
  scalars = {tag: sorted(recorded.get(tag, {}).items()) for tag in (curve_tag, *curve_tags)}
  top1 = {split: {model: values['top1'] for model, values in per_model.items()}
          for split, per_model in results['final'].items()}
  logging.info('%s: test top-1 %.2f %% (%s), %s in %.0f s', run_dir, 100 * top1['test'][row.reported_model],
               row.reported_model, 'read back' if reused else 'trained', time.time() - start)
  return {'top1': top1, 'validation_curve': scalars.pop(curve_tag), 'curves': scalars, 'workdir': run_dir,
          'wall_time_s': results['wall_time_s'], 'cpu_time_s': _cpu_time(run_dir), 'reused': reused}


def _check_unfinished(run_dir, config):
  """A row's figure comes from its config alone: an unfinished run of another config in its directory (which a lone
  `train` run would resume with a warning, changed schedule and all) is refused, never continued into the table."""
  changed = [name for name in run_directory.RunDirectory(run_dir).check_compatible(config.to_dict())
             if not name.startswith('sweep.')]
  if changed:
    raise errors.CheckpointError(
        f'{run_dir} holds an unfinished run of another config ({", ".join(changed)} differ): a sweep continues only '
        'runs of its own rows; move that directory away, or use a new --workdir')


def _cpu_time(run_dir):
  path = os.path.join(run_dir, CPU_TIME_FILE)
  if not os.path.isfile(path):
    return 0.0
  with open(path) as f:
    return json.load(f)['cpu_time_s']


def _add_cpu_time(run_dir, seconds):
  """Adds the CPU time (user + system, every thread) of one `train_fn` call to the run's total: a call that returned
  or was stopped by SIGTERM or Ctrl-C (saved, resumed later); a SIGKILLed stretch is lost, so a total is a lower
  bound."""
  total = _cpu_time(run_dir) + seconds
  with open(os.path.join(run_dir, CPU_TIME_FILE), 'w') as f:
    json.dump({'cpu_time_s': total}, f)


def summary(values):
  """Mean and sample standard deviation (0 for one value)."""
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()), 'std': float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def paired_difference(a, b, confidence=0.95):
  """a - b paired over seeds: mean, std and the two-sided Student-t interval of the mean (None below 2 pairs)."""
  differences = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  result = {'per_seed': differences.tolist(), **summary(differences), 'interval': None, 'confidence': confidence}
  if len(differences) > 1:
    half = stats.t.ppf(0.5 + confidence / 2, len(differences) - 1) * result['std'] / np.sqrt(len(differences))
    result['interval'] = [result['mean'] - half, result['mean'] + half]
  return result


def row_result(row, runs):
  """A row's JSON: what it is, its reported model, test top-1 of every model (per seed, mean, std), its runs."""
  test = {model: [run['top1']['test'][model] for run in runs] for model in runs[0]['top1']['test']} if runs else {}
  return {
      'description': row.description,
      'config_method': row.method,
      'config_fields': dict(row.fields),
      'reported_model': row.reported_model,
      'test_top1': {model: {'per_seed': values, **summary(values)} for model, values in test.items()},
      'runs': runs,
  }


def cell(result, model):
  """'mean ± std' (%) of `model`'s test top-1 in a row's JSON (the mean alone for one seed), '-' without the model."""
  values = result['test_top1'].get(model)
  if not values:
    return '-'
  return f"{100 * values['mean']:.1f}" + (f" ± {100 * values['std']:.1f}" if len(values['per_seed']) > 1 else '')


def plot_validation(path, curves, num_steps, title):
  """Validation top-1 against steps, `curves`: {label: [per-seed [(step, value)]]}; mean over seeds, min-max band."""
  import matplotlib   # pylint: disable=g-import-not-at-top  # only the figure needs matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt   # pylint: disable=g-import-not-at-top

  figure, axis = plt.subplots(figsize=(7, 4.5))
  for label, per_seed in curves.items():
    steps = sorted(set.intersection(*[{step for step, _ in curve} for curve in per_seed])) if per_seed else []
    if not steps:
      continue
    values = np.array([[dict(curve)[step] for step in steps] for curve in per_seed]) * 100
    line, = axis.plot(steps, values.mean(axis=0), marker='.', label=label)
    axis.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
  axis.set_xlim(0, num_steps)
  axis.set_xlabel('training step')
  axis.set_ylabel('validation top-1 (%)')
  axis.set_title(title, fontsize=9)
  axis.grid(alpha=0.3)
  if axis.get_lines():   # a sweep with no curve yet (no run finished) gets an empty figure
    axis.legend(fontsize=8)
  figure.tight_layout()
  run_directory.save_figure(figure, path, dpi=90)
  plt.close(figure)


def share_compilations(workdir):
  """Runs of one sweep compile the same programs: a persistent XLA cache (unless one is set) compiles them once."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'xla_cache'))
