"""Fashion-MNIST: the paper's ablation (Table 3: Supervised, RandAugment, UDA, each + MPL) and MPL's own control.

Rows (`ROWS`), every one the same WRN student, views and step budget, each (row, seed) one `train` run in
WORKDIR/<row>/seed_<i> (rundir/sweeps.py: finished runs are read back, unfinished ones resume):
- supervised: labeled images (weak views) alone; randaugment: the same on strong views (RandAugment + Cutout);
  uda: the labeled loss + UDA on the unlabeled images. The three bases.
- <base>_mpl: MPL whose teacher trains on that base's loss + the student's feedback (the paper adds MPL to a base);
  in randaugment_mpl the labeled batch is in strong views, for the teacher's loss and the feedback's h alike.
- uda_mpl_control: uda_mpl with the feedback off (`mpl.feedback='none'`): the UDA teacher's sampled labels
  distilled into the student, then the same finetuning. uda_mpl minus this row is what the MPL term adds.
Seed i is one labeled split (`dataset.split_seed = i`) and initialisation shared by all rows, so rows pair by seed.
The claim's rows (`CLAIM_ROWS`) run `sweep.num_seeds` seeds, the others `sweep.num_seeds_other` (marked).

Reported model per row (fixed before any run): the EMA network of a base, MPL's finetuned student (the paper's).

`sweep.mode`:
- 'run' (default): every row and seed, the claim's rows first and seed by seed (a sweep stopped early has the
  claim's rows on the same seeds), then the table of mean +- std test top-1, the paired per-seed differences (each
  MPL row minus its base, uda_mpl minus the control, UDA and RandAugment minus supervised: mean, std, 95 % Student-t
  interval), the figure of validation top-1 against steps, and the JSON with every run. MPL runs also get a
  diagnosis, for when MPL does not beat its base: the curves of `DIAGNOSIS_CURVES` (the feedback's size against the
  teacher's own gradient, h, the student's curve) and experiments/student_diagnosis.py's measurements (BatchNorm
  statistics, the teacher's labels on strong views).
- 'report': the same outputs from the runs that have finished, training nothing (and Reduced MPL's, below).
- 'reduced' (after 'tune_bases'): Reduced MPL (App. E) against distillation from the same fixed teacher
  (`REDUCED_ROWS`, `sweep.num_seeds` seeds each). T is the EMA network of the best base at the tuned settings (by
  validation top-1, seed 0: the tuning's own run), trained once and reused by every row and seed; its targets on
  seed i's unlabeled split are precomputed once into WORKDIR/targets/seed_<i> (the precompute program, resumable).
  (T learned seed 0's labels; on another seed some of those images are in the unlabeled split, for every row alike.)
  Rows: the student distils T's stored distributions (soft) or labels sampled from them (both with T_R left at its
  identity initialisation: the feedback off), or T_R is trained by the feedback (Reduced MPL); all finetuned. The
  table pairs Reduced MPL with each control by seed and gives every row's training steps/s beside full MPL's
  (uda_mpl, from its finished runs).
- 'tune_bases': the bases' settings on the validation split, base rows alone, seed 0 (`TUNING_STAGES`, in order,
  each stage keeping the previous stages' picks): the views (RandAugment magnitude, Cutout) on the randaugment row,
  then UDA's weight, threshold and temperature on the uda row; each setting's final validation top-1 of the EMA
  network, the highest picked (the first in grid order on a tie). Then the step budget on the three bases' curves at
  the picked settings: enough when the EMA network gains < `BUDGET_GAIN` of validation top-1 over the last fifth.
  Writes WORKDIR/fashion_mnist_bases.json, which `--config.sweep.bases=` hands to 'run': MPL rows reuse the picks
  unchanged, and a base run the tuning finished at exactly a sweep run's config (seed 0) is read back, not rerun.
  The test split is not read for any choice (its numbers are in the runs' results.json, unused here).

CPU hours: each run's CPU time (this process's user + system seconds spent training it, `rundir/sweeps.py`) and wall
time, summed in the table's heading and the JSON.
"""

import itertools
import json
import os
import subprocess
import sys
import time

from absl import logging
import numpy as np

from meta_pseudo_labels import errors
from meta_pseudo_labels.rundir import sweeps
from meta_pseudo_labels.rundir import reporting
from meta_pseudo_labels.rundir import run_directory
from meta_pseudo_labels.trained import networks

RESULTS_FILE = 'fashion_mnist_results.json'
TABLE_FILE = 'fashion_mnist_table.md'
FIGURE_FILE = 'fashion_mnist_validation.png'
BASES_FILE = 'fashion_mnist_bases.json'
TUNING_TABLE_FILE = 'fashion_mnist_tuning.md'
TUNING_FIGURE_FILE = 'fashion_mnist_tuning.png'
DIAGNOSIS_FILE = 'diagnosis.json'   # in an MPL run's directory: student_diagnosis's measurements, computed once
REDUCED_RESULTS_FILE = 'fashion_mnist_reduced_results.json'
REDUCED_TABLE_FILE = 'fashion_mnist_reduced_table.md'
REDUCED_FIGURE_FILE = 'fashion_mnist_reduced_validation.png'


_row = networks.sweep_row   # (description, method, fields) -> the sweep's Row
_NO_UDA = (('uda.weight', 0.0),)
_STRONG_LABELED = (('dataset.labeled_view', 'strong'),)
_MPL = (('mpl.feedback', 'hard_taylor'), ('mpl.pseudo_labels', 'sampled'))
ROWS = {
    'supervised': _row('labeled images, weak views', 'supervised', _NO_UDA),
    'randaugment': _row('labeled images, strong views (RandAugment + Cutout)', 'supervised', _NO_UDA + _STRONG_LABELED),
    'uda': _row('labeled loss + UDA (the MPL teacher alone)', 'uda'),
    'supervised_mpl': _row('MPL, teacher: supervised loss + feedback', 'mpl', _MPL + _NO_UDA),
    'randaugment_mpl': _row('MPL, teacher: RandAugment loss + feedback', 'mpl', _MPL + _NO_UDA + _STRONG_LABELED),
    'uda_mpl': _row('MPL (paper), teacher: UDA loss + feedback', 'mpl', _MPL),
    'uda_mpl_control': _row('control: UDA teacher, feedback off (distil sampled labels, finetune)', 'mpl',
                            (('mpl.feedback', 'none'), ('mpl.pseudo_labels', 'sampled'))),
}
CLAIM_ROWS = ('supervised', 'uda', 'uda_mpl', 'uda_mpl_control')
# Each MPL row against its base and UDA + MPL against the control; then what the bases themselves gain over labels
# alone (the unlabeled images through UDA, the strong views), the comparison the UDA target is about.
PAIRS = (('supervised_mpl', 'supervised'), ('randaugment_mpl', 'randaugment'), ('uda_mpl', 'uda'),
         ('uda_mpl', 'uda_mpl_control'), ('uda', 'supervised'), ('randaugment', 'supervised'))

# Reduced MPL (App. E), 'reduced' mode: T is the best base of the table (seed 0, validation top-1 of its EMA
# network), trained once; its distributions on each seed's unlabeled split are precomputed once per seed
# (WORKDIR/targets/seed_<i>). Every row trains the same student on them, T_R reads no image (no UDA term).
_REDUCED = (('mpl.teacher', 'reduced'), ('uda.weight', 0.0))
REDUCED_ROWS = {
    'distill_soft': _row("control: the student distils T's stored distributions (T_R stays the identity)", 'mpl',
                         _REDUCED + (('mpl.feedback', 'none'), ('mpl.pseudo_labels', 'soft'))),
    'distill_sampled': _row("control: the student learns labels sampled from T's stored distributions", 'mpl',
                            _REDUCED + (('mpl.feedback', 'none'), ('mpl.pseudo_labels', 'sampled'))),
    'reduced_mpl': _row("Reduced MPL: T_R on T's stored distributions, trained by the student's feedback", 'mpl',
                        _REDUCED + _MPL),
}
REDUCED_PAIRS = (('reduced_mpl', 'distill_sampled'), ('reduced_mpl', 'distill_soft'))
TEACHER_CANDIDATES = ('supervised', 'randaugment', 'uda')   # T: the base with the best validation top-1, seed 0
TARGETS_DIR = 'targets'
STEPS_PER_SECOND = 'steps_per_sec'   # the training loop's logged rate
# Per MPL run, the logged curves the diagnosis records beside the student's validation curve.
DIAGNOSIS_CURVES = ('mpl/feedback_logits_grad_norm', 'teacher/own_logits_grad_norm', 'mpl/h',
                    'teacher/uda_mask_rate', 'validation/teacher/top1', 'validation/student/top1')

# The stated grid (ours, fixed before any run), stage by stage: (name, row it is picked on, {field: values}). The
# first stage's values include the config's defaults; the second's the measured weight 1 / threshold 0.95 and a
# sharper temperature. UDA's ramp is not tuned: 1/10 of the run (the config), short, as the measurements asked.
TUNING_STAGES = (
    ('views', 'randaugment', {'dataset.randaugment_magnitude': (5, 10), 'dataset.cutout_size': (8, 12)}),
    ('uda', 'uda', {'uda.weight': (1.0, 3.0), 'uda.threshold': (0.8, 0.95), 'uda.temperature': (0.4, 0.7)}),
)
BUDGET_GAIN = 0.005   # validation top-1 the EMA network may still gain over the last fifth of a run that is enough
TUNING_SEED = 0


MODES = ('run', 'report', 'tune_bases', 'reduced')


def row_names(config):
  """The rows of the mode's table ('reduced': `REDUCED_ROWS`, else `ROWS`), in table order; a one-line
  ConfigError for an unknown mode or row name, or a bad seed count."""
  if config.sweep.mode not in MODES:
    raise errors.ConfigError(f'sweep.mode: unknown mode {config.sweep.mode!r}; choose one of {list(MODES)}')
  unknown = [name for name in config.sweep.methods if name not in ROWS and name not in REDUCED_ROWS]
  if unknown:
    raise errors.ConfigError(f'sweep.methods: unknown row(s) {unknown}; choose from {list(ROWS) + list(REDUCED_ROWS)}')
  for field in ('num_seeds', 'num_seeds_other'):
    if config.sweep[field] < 1:
      raise errors.ConfigError(f'sweep.{field}: must be >= 1, got {config.sweep[field]}')
  rows = REDUCED_ROWS if config.sweep.mode == 'reduced' else ROWS
  if not config.sweep.methods:
    return tuple(rows)
  names = tuple(name for name in config.sweep.methods if name in rows)
  if not names:
    raise errors.ConfigError(f"sweep.methods: {tuple(config.sweep.methods)} names no row of mode "
                             f"{config.sweep.mode!r}; choose from {list(rows)}")
  return names


def _is_claim(name):
  return name in CLAIM_ROWS or name in REDUCED_ROWS


def num_seeds(config, name):
  return config.sweep.num_seeds if _is_claim(name) else config.sweep.num_seeds_other


def tuned_fields(config):
  """The (field, value) pairs of `sweep.bases` (every row applies them, under its own fields), () without one."""
  return tuple((field, value) for stage in _bases(config).get('picked', {}).values() for field, value in stage.items())


def _bases(config):
  """The JSON `sweep.bases` names ({} without one), checked to be tuned at this sweep's budget."""
  if not config.sweep.bases:
    return {}
  try:
    bases = json.loads(run_directory.as_path(config.sweep.bases).read_text())
  except (OSError, ValueError) as e:
    raise errors.ConfigError(f'sweep.bases: cannot read {config.sweep.bases} ({e}); run --config.sweep.mode='
                             'tune_bases first, it writes WORKDIR/fashion_mnist_bases.json') from None
  if bases['num_train_steps'] != config.num_train_steps:
    raise errors.ConfigError(f"sweep.bases: {config.sweep.bases} was tuned at {bases['num_train_steps']} steps, this "
                             f'sweep runs {config.num_train_steps}; tune at the budget the sweep runs')
  return bases


# ---- the sweep --------------------------------------------------------------------------------------------------


def _run_dir(workdir, name, seed):
  return os.path.join(workdir, name, f'seed_{seed}')


def _diagnosis(run_dir):
  """The student_diagnosis program's measurements of a finished MPL run (run as a program: programs do not import
  one another), computed once and kept in the run's directory; None without the run's MPL checkpoint."""
  rundir = run_directory.RunDirectory(run_dir)
  path = rundir / DIAGNOSIS_FILE
  if not path.exists():
    if not rundir.has_checkpoints(networks.MPL):
      return None
    subprocess.run([sys.executable, '-m', 'meta_pseudo_labels.experiments.student_diagnosis', f'--workdir={run_dir}',
                    f'--output_json={path}'], check=True, stdout=subprocess.DEVNULL)
  return rundir.read_json(DIAGNOSIS_FILE, "student_diagnosis's output")


def _sweep_runs(config, workdir, rows, names, train_fn, *, extra_fields, report, reuse_dirs=(), seeds=None):
  """{row: [run]}: trains what is missing (`report`: reads what finished), the claim's rows first, seed by seed.

  `extra_fields(seed)`: the fields every row's run of that seed sets; `reuse_dirs`: other directories where a run
  of exactly that config may have finished (the tuning's); `seeds`: these seeds for every row, else `num_seeds`.
  """
  order = sorted(((not _is_claim(name), seed, names.index(name), name) for name in names
                  for seed in (seeds if seeds is not None else range(num_seeds(config, name)))))
  runs = {name: [] for name in names}
  for _, seed, _, name in order:
    row, run_dir = rows[name], _run_dir(workdir, name, seed)
    run = sweeps.run_config(config, row, seed, extra_fields(seed))
    finished = [d for d in (run_dir, *reuse_dirs) if sweeps.finished_results(d, run) is not None]
    if report and not finished:
      continue
    mpl = row.method == 'mpl'
    one = sweeps.one_run(run, row, (finished or [run_dir])[0], train_fn,
                         curve_tags=(STEPS_PER_SECOND,) + (DIAGNOSIS_CURVES if mpl else ()))
    if mpl and run.mpl.teacher == 'network':   # student_diagnosis measures an image teacher's labels
      one['diagnosis'] = _diagnosis(run_dir)
    runs[name].append({'seed': seed, **one})
  return runs


def paired_differences(results, rows=ROWS, pairs=PAIRS):
  """Each pair of `pairs` whose two rows share finished seeds: the reported models' test top-1, a - b per seed."""
  differences = {}
  for a, b in pairs:
    if a not in results or b not in results:
      continue
    top1 = [{run['seed']: run['top1']['test'][rows[name].reported_model] for run in results[name]['runs']}
            for name in (a, b)]
    seeds = sorted(set(top1[0]) & set(top1[1]))
    if seeds:
      differences[f'{a} - {b}'] = {'seeds': seeds, **sweeps.paired_difference([top1[0][s] for s in seeds],
                                                                                [top1[1][s] for s in seeds])}
  return differences


def format_table(config, results, pairs):
  """Markdown: mean ± std test top-1 per row (rows outside the claim marked), then the paired differences."""
  lines = ['| row | seeds | test top-1 (%) | per seed | reported model | MPL teacher | MPL EMA student | what it is |',
           '|---|---:|---:|---|---|---:|---:|---|']
  for name, result in results.items():
    reported = result['reported_model']
    per_seed = ', '.join(f'{100 * v:.1f}' for v in result['test_top1'].get(reported, {}).get('per_seed', []))
    seeds = f"{len(result['runs'])}/{num_seeds(config, name)}" + ('' if _is_claim(name) else ' (other)')
    lines.append(f"| {name} | {seeds} | {sweeps.cell(result, reported)} | {per_seed} | {reported} | "
                 f"{sweeps.cell(result, 'teacher')} | {sweeps.cell(result, 'student_ema')} | "
                 f"{result['description']} |")
  lines += ['', '| paired difference (test top-1, points) | seeds | mean ± std | 95 % t-interval |',
            '|---|---|---:|---|']
  for pair, difference in pairs.items():
    one_seed = not difference['interval']
    interval = '- (one seed)' if one_seed else '[{:+.1f}, {:+.1f}]'.format(*(100 * v for v in difference['interval']))
    spread = '' if one_seed else f" ± {100 * difference['std']:.1f}"   # one seed has no spread to show
    lines.append(f"| {pair} | {', '.join(map(str, difference['seeds']))} | {100 * difference['mean']:+.1f}{spread} | "
                 f"{interval} |")
  return '\n'.join(lines) + '\n'


def _hours(runs, key):
  return sum(run[key] for run in runs) / 3600


def _main_phase_steps_per_second(one, num_steps):
  """The median of a run's logged training steps/s over its main phase (finetuning excluded), None if unlogged."""
  values = [value for step, value in one['curves'].get(STEPS_PER_SECOND, []) if step <= num_steps]
  return float(np.median(values)) if values else None


def _write(config, workdir, rows, names, runs, pairs, files, title, summary_json, start):
  """The table, the figure of validation top-1 and the JSON of a finished (or reported) sweep; printed, returned."""
  results = {name: sweeps.row_result(rows[name], runs[name]) for name in names}
  differences = paired_differences(results, rows, pairs)
  run_directory.as_path(workdir).mkdir(parents=True, exist_ok=True)
  paths = {key: os.path.join(workdir, file) for key, file in zip(('results', 'table', 'figure'), files)}
  every_run = [one for name in names for one in runs[name]]
  cpu_hours, wall_hours = _hours(every_run, 'cpu_time_s'), _hours(every_run, 'wall_time_s')
  curves = {f'{name} ({rows[name].curve_model})': [one['validation_curve'] for one in runs[name]] for name in names}
  sweeps.plot_validation(paths['figure'], curves, config.num_train_steps,
                         f'{title}, {config.dataset.num_labeled} labels: validation top-1, mean over seeds, '
                         'min-max band')
  table = format_table(config, results, differences) + summary_json.pop('table_suffix', '')
  return reporting.write_sweep_results(
      config, paths, table,
      {'experiment': 'fashion_mnist', 'rows': results, 'paired_differences': differences,
       'tuned_fields': dict(tuned_fields(config)), 'cpu_hours': cpu_hours, 'wall_hours': wall_hours,
       'cpu_count': os.cpu_count(), 'wall_time_s': time.time() - start, **summary_json},
      f'{title} ({config.dataset.num_labeled} labels, {config.num_train_steps} steps per run): '
      f'{len(every_run)} finished runs, {cpu_hours:.2f} CPU hours ({wall_hours:.2f} wall hours on '
      f'{os.cpu_count()} cores)')


def _budget_verdict(bases):
  """The tuning's budget check, for the table to state ({} without a tuning): which bases were still learning."""
  if not bases:
    return {}
  gain = lambda b: 'too few evaluations' if b['gain_last_fifth'] is None else f"{100 * b['gain_last_fifth']:+.2f}"
  short = [f'{name} ({gain(b)})' for name, b in bases['budget'].items() if not b['enough']]
  line = (f"Budget: enough for every base by the stated criterion (< {100 * BUDGET_GAIN:.1f} points of validation "
          'top-1 gained over the last fifth of the tuning run).' if not short else
          f'Budget: NOT enough by the stated criterion (< {100 * BUDGET_GAIN:.1f} points of validation top-1 gained '
          f"over the last fifth of the tuning run) for {', '.join(short)}: the table is at a budget those bases "
          'were not shown to have converged at.')
  return {'budget': bases['budget'], 'budget_enough': bases['budget_enough'], 'table_suffix': f'\n{line}\n'}


def run(config, workdir, *, train_fn, precompute_fn=None):
  """Runs (or, `sweep.mode`, reports, tunes or runs Reduced MPL's rows of) the sweep with `train_fn(config,
  workdir)`, the one-run program, and `precompute_fn(config, workdir)`, the targets program ('reduced' mode)."""
  start = time.time()
  names = row_names(config)
  if config.sweep.mode == 'tune_bases':
    return tune_bases(config, workdir, train_fn=train_fn)
  sweeps.share_compilations(workdir)
  if config.sweep.mode == 'reduced':
    return run_reduced(config, workdir, names, train_fn=train_fn, precompute_fn=precompute_fn, start=start)
  report = config.sweep.mode == 'report'
  runs = _sweep_runs(config, workdir, ROWS, names, train_fn, extra_fields=lambda seed: tuned_fields(config),
                     report=report, reuse_dirs=_bases(config).get('workdirs', []))
  results = _write(config, workdir, ROWS, names, runs, PAIRS, (RESULTS_FILE, TABLE_FILE, FIGURE_FILE),
                   'Fashion-MNIST', _budget_verdict(_bases(config)), start)
  if report and config.sweep.bases:   # and Reduced MPL's table, of what has finished
    run_reduced(config, workdir, tuple(REDUCED_ROWS), train_fn=train_fn, precompute_fn=precompute_fn, start=start)
  return results


# ---- Reduced MPL (App. E) ---------------------------------------------------------------------------------------


def _reduced_teacher(config, workdir, train_fn):
  """T (App. E, step 1): the EMA network of the base row with the best validation top-1 at seed 0, at the tuned
  settings (the tuning's runs, read back). -> ('DIR:model_ema', the row)."""
  if not config.sweep.bases:
    raise errors.ConfigError("sweep.bases: empty; Reduced MPL's teacher is the best tuned base: run "
                             '--config.sweep.mode=tune_bases first and pass its fashion_mnist_bases.json')
  runs = _sweep_runs(config, workdir, ROWS, TEACHER_CANDIDATES, train_fn,
                     extra_fields=lambda seed: tuned_fields(config), report=config.sweep.mode == 'report',
                     reuse_dirs=_bases(config)['workdirs'], seeds=(TUNING_SEED,))
  finished = [name for name in TEACHER_CANDIDATES if runs[name]]
  if len(finished) < len(TEACHER_CANDIDATES):
    return None, None
  best = max(finished, key=lambda name: _final_validation(runs[name][0]))
  return f"{runs[best][0]['workdir']}:{networks.MODEL_EMA.name}", best


def run_reduced(config, workdir, names, *, train_fn, precompute_fn, start):
  """The 'reduced' mode: T, its targets on each seed's unlabeled split, then `REDUCED_ROWS` seed by seed; the table
  of Reduced MPL against its distillation controls, and its time per step against full MPL's (uda_mpl). In
  'report' mode: the table of what has finished (None before T's candidates have)."""
  report = config.sweep.mode == 'report'
  teacher, teacher_row = _reduced_teacher(config, workdir, train_fn)
  if teacher is None:
    return None
  targets_dir = lambda seed: os.path.join(workdir, TARGETS_DIR, f'seed_{seed}')
  extra_fields = lambda seed: tuned_fields(config) + (('reduced.teacher', teacher),
                                                      ('reduced.targets_dir', targets_dir(seed)))
  for seed in range(0 if report else config.sweep.num_seeds):   # resumable: finished chunks are kept
    targets = sweeps.run_config(config, REDUCED_ROWS[names[0]], seed, extra_fields(seed))
    targets.experiment = 'precompute_targets'
    precompute_fn(targets, targets_dir(seed))
  runs = _sweep_runs(config, workdir, REDUCED_ROWS, names, train_fn, extra_fields=extra_fields, report=report)
  full = _sweep_runs(config, workdir, ROWS, ('uda_mpl',), train_fn, extra_fields=lambda seed: tuned_fields(config),
                     report=True)['uda_mpl']
  speed = {name: [_main_phase_steps_per_second(one, config.num_train_steps) for one in one_runs]
           for name, one_runs in (*runs.items(), ('uda_mpl (full MPL)', full))}
  lines = ['', f'T: {teacher} (the {teacher_row} row, seed {TUNING_SEED}: the best validation top-1 of the bases)',
           '', '| row | main-phase steps/s (median of the logged rate, per seed) |', '|---|---|']
  lines += [f"| {name} | {', '.join('-' if v is None else f'{v:.2f}' for v in values) or '-'} |"
            for name, values in speed.items()]
  return _write(config, workdir, REDUCED_ROWS, names, runs, REDUCED_PAIRS,
                (REDUCED_RESULTS_FILE, REDUCED_TABLE_FILE, REDUCED_FIGURE_FILE), 'Fashion-MNIST Reduced MPL',
                {'teacher': teacher, 'teacher_row': teacher_row, 'steps_per_second': speed,
                 'table_suffix': '\n'.join(lines) + '\n'}, start)


# ---- base tuning ------------------------------------------------------------------------------------------------


def _final_validation(one):
  return one['top1']['validation']['model_ema']


def _last_fifth_gain(curve, num_steps):
  """Validation top-1 at the end minus at the evaluation nearest 4/5 of the run (None for a too short curve)."""
  if len(curve) < 2:
    return None
  steps = [step for step, _ in curve]
  at_four_fifths = min(range(len(steps)), key=lambda i: abs(steps[i] - 0.8 * num_steps))
  return curve[-1][1] - curve[at_four_fifths][1]


def tune_bases(config, workdir, *, train_fn):
  """The 'tune_bases' mode (module docstring): the stages of `TUNING_STAGES`, then the budget; writes the JSON."""
  sweeps.share_compilations(workdir)
  picked, grid_results, picked_curves = {}, [], {}
  for stage, name, grid in TUNING_STAGES:
    earlier = tuple(pair for chosen in picked.values() for pair in chosen.items())
    best = None
    for values in itertools.product(*grid.values()):
      setting = tuple(zip(grid, values))
      tag = ','.join(f'{field.split(".")[-1]}={value}' for field, value in setting)
      run_dir = os.path.join(workdir, 'tune', stage, tag, f'seed_{TUNING_SEED}')
      one = sweeps.one_run(sweeps.run_config(config, ROWS[name], TUNING_SEED, earlier + setting), ROWS[name],
                               run_dir, train_fn)
      grid_results.append({'stage': stage, 'row': name, 'setting': dict(setting),
                           'validation_top1': _final_validation(one), 'validation_curve': one['validation_curve'],
                           'workdir': run_dir, 'cpu_time_s': one['cpu_time_s'], 'wall_time_s': one['wall_time_s']})
      if best is None or _final_validation(one) > _final_validation(best[1]):
        best = (setting, one)
    picked[stage], picked_curves[name] = dict(best[0]), best[1]['validation_curve']
    logging.info('fashion_mnist tuning: stage %s picked %s', stage, picked[stage])
  # The budget, on the three bases at the picked settings (supervised is in no stage: one run of its own).
  chosen = tuple(pair for stage in picked.values() for pair in stage.items())
  supervised = sweeps.one_run(sweeps.run_config(config, ROWS['supervised'], TUNING_SEED, chosen),
                                  ROWS['supervised'], os.path.join(workdir, 'tune', 'budget', 'supervised',
                                                                   f'seed_{TUNING_SEED}'), train_fn)
  picked_curves['supervised'] = supervised['validation_curve']
  budget = {}
  for name, curve in picked_curves.items():
    gain = _last_fifth_gain(curve, config.num_train_steps)
    budget[name] = {'gain_last_fifth': gain, 'enough': gain is not None and gain < BUDGET_GAIN}
  bases = {'picked': picked, 'num_train_steps': config.num_train_steps, 'budget': budget,
           'workdirs': [g['workdir'] for g in grid_results] + [supervised['workdir']],
           'budget_enough': all(b['enough'] for b in budget.values()), 'grid': grid_results,
           'selected_on': f'validation top-1 of the EMA network at the end of the run, seed {TUNING_SEED}',
           'cpu_hours': (sum(g['cpu_time_s'] for g in grid_results) + supervised['cpu_time_s']) / 3600}
  path = os.path.join(workdir, BASES_FILE)
  run_directory.write_bytes(run_directory.as_path(path), json.dumps(bases, indent=1))
  table = _tuning_table(bases)
  run_directory.write_bytes(run_directory.as_path(os.path.join(workdir, TUNING_TABLE_FILE)), table)
  curves = {f"{g['stage']}: {g['setting']}": [g['validation_curve']] for g in grid_results}
  sweeps.plot_validation(os.path.join(workdir, TUNING_FIGURE_FILE), curves, config.num_train_steps,
                             f'Fashion-MNIST base tuning: validation top-1 of the EMA network, seed {TUNING_SEED}')
  print(f'Fashion-MNIST base tuning ({config.num_train_steps} steps, validation split, seed {TUNING_SEED}, '
        f"{bases['cpu_hours']:.2f} CPU hours):\n{table}bases: {path}\nnext: --config.sweep.bases={path}", flush=True)
  return bases


def _tuning_table(bases):
  lines = ['| stage | setting | validation top-1 (%) | picked |', '|---|---|---:|---|']
  for g in bases['grid']:
    chosen = all(bases['picked'][g['stage']].get(k) == v for k, v in g['setting'].items())
    lines.append(f"| {g['stage']} | {g['setting']} | {100 * g['validation_top1']:.2f} | {'yes' if chosen else ''} |")
  lines += ['', f"| base | validation gain over the last fifth (points) | enough (< {100 * BUDGET_GAIN:.1f}) |",
            '|---|---:|---|']
  for name, b in bases['budget'].items():
    gain = '-' if b['gain_last_fifth'] is None else f"{100 * b['gain_last_fifth']:+.2f}"
    lines.append(f"| {name} | {gain} | {'yes' if b['enough'] else 'no: raise num_train_steps and tune again'} |")
  return '\n'.join(lines) + '\n'
