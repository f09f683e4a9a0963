r"""Why an MPL student ends below its teacher: measurements on a finished MPL run (issue 12), no training.

    python -m meta_pseudo_labels.experiments.student_diagnosis --workdir=RUN_DIR [--output_json=FILE]

RUN_DIR is the workdir of a `train` run of method 'mpl' (e.g. WORKDIR/mpl/seed_0 of the digits sweep). From the MPL
phase's newest checkpoint it prints test top-1 of the teacher, the student and the EMA student

- as trained: BatchNorm statistics accumulated in training; the student's come from its x_s batches alone, the
  strong views (mpl.student_gradient; the x_l forwards of h discard theirs);
- with every BatchNorm's statistics re-estimated on clean training images (the labeled and validation pools'
  pixels, one batch, labels unused): a large gain means the stored statistics, not the weights, cost accuracy;
- with them re-estimated on strong views of the same images: what the student's weights, trained on strong views
  alone, do with statistics of the kind they were trained under. Finetuning (lr 1e-5) changes the weights little
  and replaces the statistics with those of weak labeled views, so clean against strong here is what finetuning
  can cost or gain through BatchNorm alone;

and, on the clean, weak and strong views of the validation images, the teacher's top-1 and its mean probability of
the true class: how often an argmax or a sampled label, what the student learns from on x_s, is right.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections

from meta_pseudo_labels import errors
from meta_pseudo_labels import models
from meta_pseudo_labels.data import input_pipeline
from meta_pseudo_labels.execution import workload
from meta_pseudo_labels.method import train_state
from meta_pseudo_labels.run import evaluation
from meta_pseudo_labels.rundir import checkpoint
from meta_pseudo_labels.rundir import run_directory
from meta_pseudo_labels.trained import networks

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a finished MPL run (holds config.json, checkpoints/mpl).')
_OUTPUT_JSON = flags.DEFINE_string('output_json', '', 'Also write the measurements to this JSON file (the '
                                   'Fashion-MNIST sweep keeps them beside each MPL run).')


def _top1(apply_fn, variables, batches):
  step = jax.jit(lambda v, b: evaluation.eval_step(apply_fn, v, b))
  sums = [step(variables, batch) for batch in batches]
  return float(sum(s['top1_correct'] for s in sums) / sum(s['count'] for s in sums))


def _true_class_probability(apply_fn, variables, batches):
  """Mean p_T(y | x) over the examples: how often a label sampled from the network is the true one."""
  probability = jax.jit(lambda v, b: jnp.sum(b['mask'] * jnp.take_along_axis(
      jax.nn.softmax(apply_fn(v, b['image'], train=False)), b['label'][:, None], axis=-1)[:, 0]))
  batches = list(batches)
  return float(sum(probability(variables, b) for b in batches) / sum(b['mask'].sum() for b in batches))


def _restore_mpl_state(config, workdir, teacher_model, student_model, input_shape):
  abstract = jax.eval_shape(
      lambda rng: train_state.create_mpl_state(rng, teacher_model, student_model, input_shape,
                                               teacher_optimizer=config.teacher_optimizer,
                                               student_optimizer=config.student_optimizer,
                                               total_steps=config.num_train_steps),
      jax.random.key(0))
  directory = run_directory.RunDirectory(workdir).checkpoints(networks.MPL)
  ckpt = checkpoint.Checkpointer(directory, keep=1, async_save=False)
  try:
    state, _, step = ckpt.restore(None, abstract)
  finally:
    ckpt.close()
  return state, step


def _recalibrated(model_config, num_classes, variables, images):
  """`variables` with BatchNorm statistics set to those of `images` (one train-mode pass at momentum 0)."""
  clean_config = ml_collections.ConfigDict(model_config.to_dict())
  clean_config.bn_momentum = 0.0
  model = models.create_model(clean_config, num_classes)
  _, updates = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(0)},
                           mutable=['batch_stats'])
  return {'params': variables['params'], 'batch_stats': updates['batch_stats']}


def diagnose(workdir):
  """Prints the measurements (see the module docstring) and returns them: {'step', 'test_top1': {network: {
  'as_trained', 'bn_clean', 'bn_strong'}}, 'teacher_on_validation': {view: {'top1', 'p_true_class'}}}."""
  config = ml_collections.ConfigDict(run_directory.RunDirectory(workdir).read_config())
  pipeline = input_pipeline.create(config.dataset, input_pipeline.BatchSpec.from_config(config), seed=config.seed)
  num_classes = pipeline.num_classes
  teacher_model = models.create_model(config.model, num_classes)
  student_config = workload.student_model_config(config)
  student_model = models.create_model(student_config, num_classes)
  state, step = _restore_mpl_state(config, workdir, teacher_model, student_model, pipeline.input_shape)
  test = list(pipeline.eval_batches('test'))
  clean, strong = (jnp.concatenate([b['image'][b['mask'] > 0] for split in ('train_labeled', 'validation')
                                    for b in pipeline.eval_batches(split, view=view)]) for view in ('eval', 'strong'))
  architectures = {'model': (teacher_model, config.model), 'student_model': (student_model, student_config)}
  measured = {'step': int(step), 'test_top1': {}, 'teacher_on_validation': {}}
  print(f'{workdir}: MPL step {step}; BatchNorm statistics re-estimated on {len(clean)} clean training images')
  print(f'{"network":<12} {"test top-1 as trained":>22} {"BN from clean":>14} {"BN from strong views":>21}')
  for network in networks.of_phase(networks.MPL):
    name, variables = network.name, network.variables(state)
    model, model_config = architectures[network.architecture]
    top1 = {'as_trained': _top1(model.apply, variables, test)}
    for key, images in (('bn_clean', clean), ('bn_strong', strong)):
      top1[key] = _top1(model.apply, _recalibrated(model_config, num_classes, variables, images), test)
    measured['test_top1'][name] = top1
    print(f"{name:<12} {100 * top1['as_trained']:>21.2f}% {100 * top1['bn_clean']:>13.2f}% "
          f"{100 * top1['bn_strong']:>20.2f}%")
  for view in ('eval', 'weak', 'strong'):
    batches = list(pipeline.eval_batches('validation', view=view))
    accuracy = _top1(teacher_model.apply, state.teacher.variables, batches)
    sampled = _true_class_probability(teacher_model.apply, state.teacher.variables, batches)
    measured['teacher_on_validation'][view] = {'top1': accuracy, 'p_true_class': sampled}
    print(f'teacher on the {view} views of the validation images: top-1 (an argmax label is right) '
          f'{100 * accuracy:.2f}%, mean p(true class) (a sampled label is right) {100 * sampled:.2f}%')
  return measured


def main(argv):
  errors.no_positional_arguments(argv)
  with errors.one_line_user_errors():
    measured = diagnose(_WORKDIR.value)
  if _OUTPUT_JSON.value:
    run_directory.write_bytes(run_directory.as_path(_OUTPUT_JSON.value), json.dumps(measured, indent=1))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
