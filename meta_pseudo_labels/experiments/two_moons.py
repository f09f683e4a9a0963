"""The TwoMoon experiment of Meta Pseudo Labels (Pham et al., CVPR 2021, Sec. 3.1) and its ablations.

Every method of `METHODS` trains, for each of `config.sweep.num_seeds` seeds, on the same generated points. Seed i
picks the labeled points (`num_labeled / num_classes` per moon), initialises the networks and orders the minibatches,
identically for every method: the supervised network and the Pseudo Labels teacher start where the MPL teacher
starts, every student where the MPL student starts, and all of them see the same batches. Accuracy is read over all
the points (labeled ones included), as in the paper's figure.

The steps are the core's own (`mpl.mpl_step`, `mpl.supervised_step`, `evaluation.eval_step`): one method is one jitted
program, `jax.vmap` over seeds of a `jax.lax.scan` over steps, so the whole sweep takes minutes on a laptop CPU.

Writes to the workdir: `two_moons_results.json` (per method and seed: accuracies and training metrics; the
config), `two_moons_table.md` (accuracy over seeds: mean, std, min, max) and `two_moons_boundaries.png` (the
decision boundary of every method for seed `config.sweep.plot_seed`, in the style of the paper's Figure 2).
"""

import concurrent.futures
import dataclasses
import os
import time
from typing import Any, NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from meta_pseudo_labels import errors
from meta_pseudo_labels.data import data_sources
from meta_pseudo_labels.execution import workload
from meta_pseudo_labels.method import mpl
from meta_pseudo_labels.method import train_state
from meta_pseudo_labels.run import evaluation
from meta_pseudo_labels.rundir import reporting
from meta_pseudo_labels.rundir import run_directory

RESULTS_FILE = 'two_moons_results.json'
TABLE_FILE = 'two_moons_table.md'
FIGURE_FILE = 'two_moons_boundaries.png'
INPUT_SHAPE = (2,)
FINAL_FRACTION = 0.1   # training metrics are also summarised over this last fraction of the steps


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the table: which trainer runs, and the `config.mpl` fields it sets."""
  description: str
  trainer: str                          # 'supervised' | 'pseudo_labels' | 'mpl'
  mpl_fields: tuple[tuple[str, Any], ...] = ()


METHODS = {
    'supervised': Method('labeled points only', 'supervised'),
    'pseudo_labels': Method('teacher trained on the labeled points, then frozen; student on its hard labels',
                            'pseudo_labels'),
    'mpl_hard_taylor': Method('MPL (paper): sampled hard labels, h = CE_old - CE_new', 'mpl',
                              (('feedback', 'hard_taylor'), ('pseudo_labels', 'sampled'), ('h_sign', 1.0))),
    'mpl_hard_dot': Method('MPL, sampled hard labels, h = eta_S <g_l, g_u>', 'mpl',
                           (('feedback', 'hard_dot'), ('pseudo_labels', 'sampled'), ('h_sign', 1.0))),
    'mpl_argmax': Method('ablation: mpl_hard_taylor with argmax labels (released code)', 'mpl',
                         (('feedback', 'hard_taylor'), ('pseudo_labels', 'argmax'), ('h_sign', 1.0))),
    'mpl_exact': Method('MPL, soft labels, meta-gradient through the student step', 'mpl',
                        (('feedback', 'exact'), ('pseudo_labels', 'soft'))),
    'soft_no_feedback': Method('control for mpl_exact: soft labels, no feedback (teacher on its own loss)', 'mpl',
                               (('feedback', 'none'), ('pseudo_labels', 'soft'))),
    'mpl_flipped_sign': Method('ablation: mpl_hard_taylor with h = CE_new - CE_old (released code)', 'mpl',
                               (('feedback', 'hard_taylor'), ('pseudo_labels', 'sampled'), ('h_sign', -1.0))),
    'mpl_feedback_off': Method('ablation: no feedback; teacher on its own loss, student distils its sampled labels',
                               'mpl', (('feedback', 'none'), ('pseudo_labels', 'sampled'))),
}


class SeedKeys(NamedTuple):
  split: jax.Array      # which points are labeled
  init: jax.Array       # network initialisation (split as in `train_state.create_mpl_state`)
  batches: jax.Array    # minibatch order
  steps: jax.Array      # the steps' own rng (dropout; unused by the MLP)


class Split(NamedTuple):
  labeled: jax.Array    # [num_labeled] indices into the points
  unlabeled: jax.Array  # [num_points - num_labeled]


class Trained(NamedTuple):
  student: dict                # {'params', 'batch_stats'}; the supervised network for 'supervised'
  teacher: Optional[dict]      # None for 'supervised'
  metrics: dict                # name -> [num_steps] training metrics


def method_names(config):
  """The methods the sweep runs, in table order; a one-line ConfigError for an unknown name."""
  names = tuple(config.sweep.methods) or tuple(METHODS)
  unknown = [name for name in names if name not in METHODS]
  if unknown:
    raise errors.ConfigError(f'sweep.methods: unknown method(s) {unknown}; choose from {list(METHODS)}')
  return names


def _check(config, labels):
  """One-line ConfigErrors for sweep settings the data cannot satisfy."""
  num_classes = config.dataset.num_classes
  if num_classes != 2:
    raise errors.ConfigError(f'dataset.num_classes: two moons have 2 classes, got {num_classes}')
  if config.sweep.num_seeds < 1:
    raise errors.ConfigError(f'sweep.num_seeds: must be >= 1, got {config.sweep.num_seeds}')
  if not 0 <= config.sweep.plot_seed < config.sweep.num_seeds:
    raise errors.ConfigError(f'sweep.plot_seed: must be in [0, sweep.num_seeds={config.sweep.num_seeds}), got '
                             f'{config.sweep.plot_seed}')
  num_labeled = config.dataset.num_labeled
  smallest_class = int(np.bincount(labels, minlength=num_classes).min())
  if num_labeled % num_classes or not 0 < num_labeled // num_classes <= smallest_class:
    raise errors.ConfigError(f'dataset.num_labeled: need a positive multiple of {num_classes} (same number per '
                             f'moon) of at most {num_classes * smallest_class}, got {num_labeled}')
  if not 0 < config.batch_size <= num_labeled:
    raise errors.ConfigError(f'batch_size: must be in [1, dataset.num_labeled={num_labeled}], got '
                             f'{config.batch_size}')
  num_unlabeled = len(labels) - num_labeled
  if not 0 < config.batch_size * config.uda_ratio <= num_unlabeled:
    raise errors.ConfigError(f'uda_ratio: batch_size * uda_ratio = {config.batch_size * config.uda_ratio} '
                             f'unlabeled points per step, but there are {num_unlabeled}; lower uda_ratio')
  if config.finetune.num_steps:
    raise errors.ConfigError('finetune.num_steps: the TwoMoon sweep shows students without finetuning; set 0')


def _method_config(config, method):
  """A copy of `config` with the method's `config.mpl` fields set."""
  method_config = config.copy_and_resolve_references()
  for field, value in method.mpl_fields:
    setattr(method_config.mpl, field, value)
  return method_config


def _seed_keys(config, seed):
  return SeedKeys(*jax.random.split(jax.random.fold_in(jax.random.key(config.seed), seed), 4))


def _choose_split(rng, labels, num_labeled):
  """`num_labeled / 2` labeled points per moon, drawn by `rng`; the rest are unlabeled (`labels`: numpy)."""
  per_class = num_labeled // 2
  labeled = jnp.concatenate([
      jax.random.choice(key, np.flatnonzero(labels == label), (per_class,), replace=False)
      for label, key in enumerate(jax.random.split(rng, 2))])
  is_labeled = jnp.zeros(labels.shape, bool).at[labeled].set(True)
  return Split(labeled, jnp.nonzero(~is_labeled, size=len(labels) - num_labeled)[0])


def _scan_steps(step_fn, state, batch_fn, keys, num_steps):
  """`num_steps` of `step_fn(state, batch, rng)`; the batch of step t is `batch_fn(fold_in(keys.batches, t))`."""
  def body(state, t):
    return step_fn(state, batch_fn(jax.random.fold_in(keys.batches, t)), keys.steps)
  return jax.lax.scan(body, state, jnp.arange(num_steps))


def _labeled_batch(points, labels, split, config, rng):
  chosen = jax.random.choice(rng, split.labeled, (config.batch_size,), replace=False)
  return points[chosen], labels[chosen]


def _unlabeled_batch(split, config, rng):
  """Indices of `batch_size * uda_ratio` unlabeled points drawn uniformly with replacement (a sort-free draw)."""
  positions = jax.random.randint(rng, (config.batch_size * config.uda_ratio,), 0, split.unlabeled.shape[0])
  return split.unlabeled[positions]


def _train_alone(config, model, optimizer_name, rng, batch_fn, keys):
  """`model` trained alone by `mpl.supervised_step` on `batch_fn`'s batches (no EMA, no UDA): (state, metrics)."""
  state = train_state.create_supervised_state(rng, model, getattr(config, optimizer_name), INPUT_SHAPE,
                                              total_steps=config.num_train_steps, keep_ema=False, name=optimizer_name)
  hparams = mpl.SupervisedHparams(label_smoothing=float(config.label_smoothing))
  return _scan_steps(lambda s, b, r: mpl.supervised_step(s, b, r, hparams=hparams), state, batch_fn, keys,
                     config.num_train_steps)


def _train_supervised(config, teacher_model, points, labels, split, keys):
  """The teacher network trained alone on the labeled points (no EMA, no UDA)."""
  teacher_rng, _ = jax.random.split(keys.init)

  def batch_fn(rng):
    x, y = _labeled_batch(points, labels, split, config, rng)
    return {'labeled_image': x, 'labeled_label': y}
  state, metrics = _train_alone(config, teacher_model, 'teacher_optimizer', teacher_rng, batch_fn, keys)
  return Trained(student=state.network.variables, teacher=None, metrics=metrics)


def _train_pseudo_labels(config, teacher_model, student_model, points, labels, split, keys):
  """Pseudo Labels (Lee 2013): the supervised network, frozen, labels the unlabeled points for a fresh student."""
  teacher = _train_supervised(config, teacher_model, points, labels, split, keys).student
  pseudo_labels = jnp.argmax(teacher_model.apply(teacher, points, train=False), axis=-1).astype(labels.dtype)
  _, student_rng = jax.random.split(keys.init)

  def batch_fn(rng):
    chosen = _unlabeled_batch(split, config, rng)
    return {'labeled_image': points[chosen], 'labeled_label': pseudo_labels[chosen]}
  state, metrics = _train_alone(config, student_model, 'student_optimizer', student_rng, batch_fn, keys)
  return Trained(student=state.network.variables, teacher=teacher, metrics=metrics)


def _train_mpl(config, teacher_model, student_model, points, labels, split, keys):
  """MPL with the feedback mode and sign of `config.mpl`; the student is evaluated as trained (EMA off)."""
  state = train_state.create_mpl_state(keys.init, teacher_model, student_model, INPUT_SHAPE,
                                       teacher_optimizer=config.teacher_optimizer,
                                       student_optimizer=config.student_optimizer, total_steps=config.num_train_steps)
  hparams = mpl.MplHparams.from_config(config)

  def batch_fn(rng):
    labeled_rng, unlabeled_rng = jax.random.split(rng)
    x, y = _labeled_batch(points, labels, split, config, labeled_rng)
    unlabeled = points[_unlabeled_batch(split, config, unlabeled_rng)]
    return {'labeled_image': x, 'labeled_label': y, 'unlabeled_weak': unlabeled, 'unlabeled_strong': unlabeled}
  state, metrics = _scan_steps(lambda s, b, r: mpl.mpl_step(s, b, r, hparams=hparams), state, batch_fn, keys,
                               config.num_train_steps)
  return Trained(student=state.student.variables, teacher=state.teacher.variables, metrics=metrics)


TRAINERS = {'supervised': _train_supervised, 'pseudo_labels': _train_pseudo_labels, 'mpl': _train_mpl}


def _accuracy(model, variables, points, labels):
  """Top-1 accuracy over all the points, through the core's `eval_step`."""
  batch = {'image': points, 'label': labels, 'mask': jnp.ones(labels.shape, jnp.float32)}
  sums = evaluation.eval_step(model.apply, variables, batch)
  return sums['top1_correct'] / sums['count']


def _run_method(config, method, teacher_model, student_model, points, labels, seed_keys):
  """Trains and evaluates `method` for every seed at once (`points`, `labels`: numpy arrays).

  Returns per seed: student accuracy, teacher accuracy (None without a teacher), the training metrics of every
  step, the student's variables and the labeled indices.
  """
  trainer = TRAINERS[method.trainer]
  models_used = (teacher_model,) if method.trainer == 'supervised' else (teacher_model, student_model)

  def one_seed(keys):
    split = _choose_split(keys.split, labels, config.dataset.num_labeled)
    points_array, labels_array = jnp.asarray(points), jnp.asarray(labels)
    trained = trainer(config, *models_used, points_array, labels_array, split, keys)
    student_accuracy = _accuracy(models_used[-1], trained.student, points_array, labels_array)
    teacher_accuracy = (None if trained.teacher is None else
                        _accuracy(teacher_model, trained.teacher, points_array, labels_array))
    return student_accuracy, teacher_accuracy, trained.metrics, trained.student, split.labeled

  # XLA's default CPU backend optimisation: at 50k steps running, not compiling, dominates. Measured on mpl_exact
  # (10 seeds x 50k steps, one process, 2-core VM): 22.0 s process CPU time against 43.7 s at optimisation level 0
  # (which compiles faster and paid off at the old 5000 steps), the same accuracies to the printed digit.
  return jax.jit(jax.vmap(one_seed))(seed_keys)


def _summary(values):
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()), 'std': float(values.std(ddof=1)) if len(values) > 1 else 0.0,
          'min': float(values.min()), 'max': float(values.max())}


def _metric_summaries(metrics):
  """name -> per-seed values at the last step, and means over the whole run and its last FINAL_FRACTION of steps."""
  summaries = {}
  for name, values in metrics.items():
    values = np.asarray(values)   # [seeds, steps]
    last = max(1, int(round(values.shape[1] * FINAL_FRACTION)))
    summaries[name] = {'last_step': values[:, -1].tolist(), 'mean_over_run': values.mean(axis=1).tolist(),
                       'mean_over_final_steps': values[:, -last:].mean(axis=1).tolist()}
  return summaries


def format_table(results, names):
  """Markdown table: accuracy (%) over all points, over seeds; teacher accuracy where the method has one."""
  lines = ['| method | student acc. mean (%) | std | min | max | teacher acc. mean (%) | what it is |',
           '|---|---:|---:|---:|---:|---:|---|']
  for name in names:
    row = results[name]
    student = row['student_accuracy']
    teacher = f"{100 * row['teacher_accuracy']['mean']:.1f}" if row['teacher_accuracy'] else '-'
    lines.append(f"| {name} | {100 * student['mean']:.1f} | {100 * student['std']:.1f} | "
                 f"{100 * student['min']:.1f} | {100 * student['max']:.1f} | {teacher} | {row['description']} |")
  return '\n'.join(lines) + '\n'


def plot_boundaries(path, points, labels, panels):
  """Paper-style figure: per panel, the predicted class over the plane, the points, the labeled points marked.

  `panels` is a list of (title, probability_fn or None, labeled_indices); probability_fn maps [M, 2] grid points
  to p(class 1) [M]; None draws the ground truth alone.
  """
  import matplotlib   # pylint: disable=g-import-not-at-top  # only the figure needs matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt   # pylint: disable=g-import-not-at-top

  margin = 0.5
  (x0, y0), (x1, y1) = points.min(axis=0) - margin, points.max(axis=0) + margin
  grid_x, grid_y = np.meshgrid(np.linspace(x0, x1, 200), np.linspace(y0, y1, 200))
  grid = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.float32)
  columns = 4
  rows = -(-len(panels) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
  colors = np.array(['tab:blue', 'tab:orange'])
  for axis, (title, probability_fn, labeled) in zip(axes.ravel(), panels):
    if probability_fn is not None:
      probability = np.asarray(probability_fn(grid)).reshape(grid_x.shape)
      axis.contourf(grid_x, grid_y, probability, levels=[0.0, 0.5, 1.0], colors=['#c6dbef', '#fdd0a2'])
      axis.contour(grid_x, grid_y, probability, levels=[0.5], colors='k', linewidths=0.8)
    axis.scatter(points[:, 0], points[:, 1], c=colors[labels], s=2, linewidths=0)
    axis.scatter(points[labeled, 0], points[labeled, 1], c=colors[labels[labeled]], s=90, marker='*',
                 edgecolors='k', linewidths=0.8)
    axis.set_title(title, fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])
  for axis in axes.ravel()[len(panels):]:
    axis.axis('off')
  figure.tight_layout()
  run_directory.save_figure(figure, path, dpi=80)
  plt.close(figure)


def _probability_fn(model, variables):
  apply = jax.jit(lambda x: jax.nn.softmax(model.apply(variables, x, train=False), axis=-1)[:, 1])
  return lambda grid: apply(jnp.asarray(grid))


def _method_result(name, config, teacher_model, student_model, points, labels, seed_keys):
  """Runs method `name` over all seeds; returns (its results entry, its figure panel, the labeled indices)."""
  start = time.time()
  method = METHODS[name]
  student_accuracy, teacher_accuracy, metrics, students, labeled = jax.device_get(_run_method(
      _method_config(config, method), method, teacher_model, student_model, points, labels, seed_keys))
  result = {
      'description': method.description,
      'config_mpl': dict(method.mpl_fields),
      'student_accuracy': {'per_seed': np.asarray(student_accuracy).tolist(), **_summary(student_accuracy)},
      'teacher_accuracy': (None if teacher_accuracy is None else
                           {'per_seed': np.asarray(teacher_accuracy).tolist(), **_summary(teacher_accuracy)}),
      'train_metrics': _metric_summaries(metrics),
      'wall_time_s': time.time() - start,
  }
  logging.info('two_moons: %s: accuracy %.1f +- %.1f %% over %d seeds (%.1f s)', name,
               100 * result['student_accuracy']['mean'], 100 * result['student_accuracy']['std'],
               len(student_accuracy), result['wall_time_s'])
  plot = config.sweep.plot_seed
  model = teacher_model if method.trainer == 'supervised' else student_model
  panel = (f'{name}\nseed {plot}: {100 * student_accuracy[plot]:.1f}%, '
           f'mean {100 * result["student_accuracy"]["mean"]:.1f}%',
           _probability_fn(model, jax.tree.map(lambda leaf: leaf[plot], students)), np.asarray(labeled[plot]))
  return result, panel, np.asarray(labeled)


def run(config, workdir):
  """Runs the sweep of `config` (see module docstring), writes its outputs to `workdir`, returns the results.

  Methods run in parallel threads (one per CPU core): each is a separate XLA program, and compiling them
  dominates the sweep's time on a laptop.
  """
  start = time.time()
  points, labels = data_sources.make_two_moons(seed=config.dataset.split_seed)   # 2000 points, noise 0.1
  points, labels = np.asarray(points, np.float32), np.asarray(labels, np.int32)
  _check(config, labels)
  names = method_names(config)
  teacher_model, student_model = workload.model_pair(config)
  seeds = list(range(config.sweep.num_seeds))
  seed_keys = jax.tree.map(lambda *keys: jnp.stack(keys), *[_seed_keys(config, seed) for seed in seeds])

  def method_result(name):
    return _method_result(name, config, teacher_model, student_model, points, labels, seed_keys)
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    outputs = list(pool.map(method_result, names))
  results = {name: result for name, (result, _, _) in zip(names, outputs)}
  panels = [panel for _, panel, _ in outputs]
  labeled = outputs[0][2]   # the same for every method

  run_directory.as_path(workdir).mkdir(parents=True, exist_ok=True)
  table = format_table(results, names)
  paths = {key: os.path.join(workdir, file) for key, file in
           (('results', RESULTS_FILE), ('table', TABLE_FILE), ('figure', FIGURE_FILE))}
  plot_boundaries(paths['figure'], points, labels,
                  [(f'ground truth, labeled points of seed {config.sweep.plot_seed}', None,
                    labeled[config.sweep.plot_seed])] + panels)
  wall_time = time.time() - start
  return reporting.write_sweep_results(
      config, paths, table,
      {'experiment': 'two_moons', 'seeds': seeds, 'num_points': len(labels), 'labeled_indices': labeled.tolist(),
       'methods': results, 'wall_time_s': wall_time},
      f'TwoMoon: accuracy over all {len(labels)} points, {len(seeds)} seeds, {config.num_train_steps} steps '
      f'({wall_time:.0f} s)')
