"""The picture of a finished run: `workdir/report.png`, written beside results.json at the end of every run.

Top row, the learning curves read back from the run's own TensorBoard event files (what `reporting` wrote; for a
resumed run the later process's values win): training losses, validation top-1 and loss of every evaluated model
(teacher, student, EMA student ...), the MPL feedback h (Pham et al. Sec. 2, Eq. 3's coefficient) and its baseline,
the UDA confidence-mask rate, the learning rates. Below, per split (validation, test): the confusion matrix of every
final model (rows: true class, normalised to 1) and their per-class top-1 accuracies.
"""

import math

from matplotlib.backends import backend_agg
from matplotlib import figure as mpl_figure
import numpy as np

from meta_pseudo_labels.rundir import run_directory

MAX_CLASS_LABELS = 30   # more classes: no tick labels (unreadable), the matrix alone

# Panel title -> which scalar tags it draws (a predicate on the tag).
CURVES = (
    ('training loss', lambda tag: tag.endswith('/loss') and not tag.startswith(('validation/', 'final/'))),
    ('validation top-1', lambda tag: tag.startswith('validation/') and tag.endswith('/top1')),
    ('validation loss', lambda tag: tag.startswith('validation/') and tag.endswith('/loss')),
    ('MPL feedback h', lambda tag: tag in ('mpl/h', 'mpl/baseline')),
    ('UDA mask rate', lambda tag: tag.endswith('/uda_mask_rate')),
    ('learning rate', lambda tag: tag.endswith('/learning_rate')),
)


def _draw_curves(axes, title, series):
  axes.set_title(title)
  axes.set_xlabel('step')
  if not series:
    axes.text(0.5, 0.5, 'not recorded in this run', ha='center', va='center', transform=axes.transAxes)
    return
  for tag, values in sorted(series.items()):
    steps = sorted(values)
    axes.plot(steps, [values[s] for s in steps], label=tag, marker='.' if len(steps) < 30 else None)
  axes.legend(fontsize='x-small')
  axes.grid(alpha=0.3)


def _draw_confusion(axes, title, confusion, class_names):
  totals = confusion.sum(axis=1, keepdims=True)
  normalised = confusion / np.maximum(totals, 1)
  axes.imshow(normalised, vmin=0.0, vmax=1.0, cmap='Blues')
  axes.set_title(title, fontsize='small')
  axes.set_xlabel('predicted')
  axes.set_ylabel('true')
  num_classes = len(confusion)
  if num_classes <= MAX_CLASS_LABELS:
    ticks = range(num_classes)
    axes.set_xticks(ticks, class_names, rotation=90, fontsize='x-small')
    axes.set_yticks(ticks, class_names, fontsize='x-small')
    if num_classes <= 12:
      for true in range(num_classes):
        for predicted in range(num_classes):
          if confusion[true, predicted]:
            axes.text(predicted, true, int(confusion[true, predicted]), ha='center', va='center',
                      fontsize='x-small', color='white' if normalised[true, predicted] > 0.5 else 'black')
  else:
    axes.set_xticks([])
    axes.set_yticks([])


def _draw_per_class(axes, title, per_model, class_names):
  """Bars of every model's per-class top-1, a dot on each so that a zero shows; 'no examples' where a class has none."""
  num_classes = len(class_names)
  width = 0.8 / max(len(per_model), 1)
  for i, (name, metrics) in enumerate(per_model.items()):
    accuracy = [math.nan if a is None else a for a in metrics['per_class_top1']]
    positions = np.arange(num_classes) + (i - (len(per_model) - 1) / 2) * width
    bars = axes.bar(positions, accuracy, width, label=f'{name} (ECE {metrics["ece"]:.3f})')
    axes.plot(positions, accuracy, 'o', markersize=3, color=bars.patches[0].get_facecolor())
  for c, accuracy in enumerate(next(iter(per_model.values()))['per_class_top1']):
    if accuracy is None and num_classes <= MAX_CLASS_LABELS:
      axes.text(c, 0.5, 'no examples', rotation=90, ha='center', va='center', fontsize='x-small', color='grey')
  axes.set_title(title)
  axes.set_xlim(-0.5, num_classes - 0.5)
  axes.set_ylim(-0.03, 1.05)
  axes.set_ylabel('top-1 of the class')
  if num_classes <= MAX_CLASS_LABELS:
    axes.set_xticks(range(num_classes), class_names, rotation=90, fontsize='x-small')
  axes.legend(fontsize='x-small')


def write(rundir, final):
  """Draws `report.png` of the run_directory.RunDirectory `rundir` from its event files, its inputs.json (the class
  names) and the final evaluation `final` ({split: {model: Evaluator.evaluate's metrics, with 'confusion'}});
  returns its path."""
  scalars = run_directory.read_scalars(rundir.tensorboard)
  class_names = (rundir.read_inputs() or {}).get('class_names')
  splits = list(final)
  models = list(final[splits[-1]])
  num_classes = len(final[splits[-1]][models[0]]['confusion'])
  class_names = [str(name) for name in (class_names or range(num_classes))]
  columns = max(len(CURVES), len(models) + 1)
  fig = mpl_figure.Figure(figsize=(3.6 * columns, 3.4 * (1 + len(splits))), layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  grid = fig.add_gridspec(1 + len(splits), columns)
  for column, (title, wanted) in enumerate(CURVES):
    _draw_curves(fig.add_subplot(grid[0, column]), title,
                 {tag: values for tag, values in scalars.items() if wanted(tag)})
  for row, split in enumerate(splits, start=1):
    for column, model in enumerate(models):
      metrics = final[split][model]
      _draw_confusion(fig.add_subplot(grid[row, column]),
                      f'{split}: {model}, top-1 {100 * metrics["top1"]:.1f}%', metrics['confusion'], class_names)
    _draw_per_class(fig.add_subplot(grid[row, len(models):]), f'{split}: per-class top-1', final[split],
                    class_names)
  fig.suptitle(f'{rundir.path.name}: learning curves (top), final models (below)')
  path = rundir / run_directory.REPORT
  run_directory.save_figure(fig, path, dpi=80)
  return path
