"""The digits benchmark: every method on real 8x8 handwritten digits (scikit-learn's), through the real train loop.

Each (method, seed) is one complete `train.train_and_evaluate` run (the program a user runs: input pipeline with
the digits augmentations, jitted steps, EMA, finetuning, validation and test evaluation) in its own directory
WORKDIR/<method>/seed_<i>; rerunning the command resumes the unfinished runs and reads the finished ones back
(rundir/sweeps.py). Seed i sets both `config.seed` (initialisation, batch order, augmentations) and
`dataset.split_seed` (which 10 images per class are labeled, which 200 validate); the test split is fixed
(data_sources.py).

Main (`config.experiment='digits'`) hands this module the one-run program as `train_fn`: program modules never
import one another.

Reported model per method (fixed before any result): the EMA network for supervised and UDA, and for MPL the
finetuned student (finetuning starts from the EMA student, Sec. 3.2), the network the paper reports; the table also
shows MPL's teacher and its raw and EMA students.

Writes to the workdir: `digits_results.json` (per method and seed: every model's validation and test top-1, the
validation curve), `digits_table.md` and `digits_validation.png` (validation top-1 against steps, mean over seeds).
"""

import os
import time

from meta_pseudo_labels import errors
from meta_pseudo_labels.rundir import sweeps
from meta_pseudo_labels.rundir import reporting
from meta_pseudo_labels.rundir import run_directory
from meta_pseudo_labels.trained import networks

RESULTS_FILE = 'digits_results.json'
TABLE_FILE = 'digits_table.md'
FIGURE_FILE = 'digits_validation.png'


_row = networks.sweep_row   # (description, method, fields) -> the sweep's Row
_HARD_SAMPLED = (('mpl.feedback', 'hard_taylor'), ('mpl.pseudo_labels', 'sampled'))
_NO_UDA = (('uda.weight', 0.0),)
METHODS = {
    'supervised': _row('labeled images only', 'supervised', _NO_UDA),
    'uda': _row('the MPL teacher alone: labeled loss + UDA', 'uda'),
    'mpl': _row('MPL (paper): sampled hard labels, hard_taylor, UDA teacher', 'mpl', _HARD_SAMPLED),
    'mpl_exact': _row('MPL, soft labels, meta-gradient through the student step', 'mpl',
                      (('mpl.feedback', 'exact'), ('mpl.pseudo_labels', 'soft'))),
    'mpl_argmax': _row('ablation: argmax hard labels (released code)', 'mpl',
                        (('mpl.feedback', 'hard_taylor'), ('mpl.pseudo_labels', 'argmax'))),
    'mpl_no_uda': _row('ablation: MPL without UDA in the teacher', 'mpl', _HARD_SAMPLED + _NO_UDA),
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


def format_table(results, names):
  """Markdown: test top-1 (%) mean ± std over seeds of the reported model; MPL's other networks beside it."""
  lines = ['| method | test top-1 (%) | per seed | reported model | MPL teacher | MPL student | MPL EMA student | '
           'what it is |', '|---|---:|---|---|---:|---:|---:|---|']
  for name in names:
    result = results[name]
    reported = result['reported_model']
    per_seed = ', '.join(f'{100 * v:.1f}' for v in result['test_top1'][reported]['per_seed'])
    lines.append(f"| {name} | {sweeps.cell(result, reported)} | {per_seed} | {reported} | "
                 f"{sweeps.cell(result, networks.TEACHER.name)} | {sweeps.cell(result, networks.STUDENT.name)} | "
                 f"{sweeps.cell(result, networks.STUDENT_EMA.name)} | {result['description']} |")
  return '\n'.join(lines) + '\n'


def run(config, workdir, *, train_fn):
  """Runs every method of the sweep for every seed with `train_fn(config, workdir)`; writes and prints the table."""
  start = time.time()
  names = method_names(config)
  sweeps.share_compilations(workdir)
  seeds = list(range(config.sweep.num_seeds))
  results = {}
  for name in names:
    runs = [sweeps.one_run(sweeps.run_config(config, METHODS[name], seed), METHODS[name],
                               os.path.join(workdir, name, f'seed_{seed}'), train_fn) for seed in seeds]
    results[name] = sweeps.row_result(METHODS[name], runs)
  run_directory.as_path(workdir).mkdir(parents=True, exist_ok=True)
  paths = {key: os.path.join(workdir, file) for key, file in
           (('results', RESULTS_FILE), ('table', TABLE_FILE), ('figure', FIGURE_FILE))}
  table = format_table(results, names)
  curves = {f'{name} ({METHODS[name].curve_model})': [r['validation_curve'] for r in results[name]['runs']]
            for name in names}
  sweeps.plot_validation(paths['figure'], curves, config.num_train_steps,
                             f'digits (8x8, 10 labels per class): mean over {len(seeds)} seeds, min-max band')
  wall_time = time.time() - start
  return reporting.write_sweep_results(
      config, paths, table, {'experiment': 'digits', 'seeds': seeds, 'methods': results, 'wall_time_s': wall_time},
      f'Digits: test top-1 over the {len(seeds)} seeds, {config.num_train_steps} steps per run ({wall_time:.0f} s)')
