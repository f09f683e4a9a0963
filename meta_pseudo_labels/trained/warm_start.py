"""Starting a run's networks from trained ones: `config.teacher_init` / `config.student_init`.

Each names a network (`trained_models.load`): a workdir 'W' (its final network), 'W:<network>' ('W:teacher',
'W:student_ema', 'W:model', ...), 'W:<phase>' (that phase's final network: 'W:finetune', 'W:mpl' -> the EMA
student) or a directory written by `export`. Its parameters and BatchNorm statistics replace the fresh ones of the
teacher (for 'supervised' / 'uda': the one network) and the student; the optimizer states, the EMA (a copy of the
started student) and the MPL baseline start as in a fresh run, since the new run's schedules start at step 0.

A network of another architecture or class count is refused with one line before anything is trained. Only a fresh
run reads them: a run resuming from its own checkpoints never does, so a moved or deleted source does not matter
then, and the resumed state is bitwise the one saved.
"""

from absl import logging
import jax
import jax.numpy as jnp

from meta_pseudo_labels import errors
from meta_pseudo_labels.execution import workload
from meta_pseudo_labels.rundir import run_directory
from meta_pseudo_labels.trained import networks
from meta_pseudo_labels.trained import trained_models

FIELDS = ('teacher_init', 'student_init')


def check_reference(reference, field):
  """A one-line ConfigError naming the config field `field` when `reference` names no directory: config validation
  calls it before any work, where `load` would fail only after the run has read its data."""
  directory, _ = networks.parse_reference(reference)
  if reference and not run_directory.as_path(directory).is_dir():   # a gs:// URL stays one
    raise errors.ConfigError(f'{field}: {directory} is not a directory; name a training workdir or an exported '
                             'model directory')


def _roles(config):
  """field -> the network of networks.py's table it replaces (its state attribute and architecture field)."""
  if config.method == networks.MPL:
    return {'teacher_init': networks.TEACHER, 'student_init': networks.STUDENT}
  return {'teacher_init': networks.MODEL}


# The EMA of a started network starts as its copy (the state attribute of each).
_EMA_OF = {networks.STUDENT.state_path[0]: networks.STUDENT_EMA.state_path[0],
           networks.MODEL.state_path[0]: networks.MODEL_EMA.state_path[0]}


def _what(config, network):
  """What the errors call the network."""
  return f'the {config.method} network' if network.phase is None else f'the {network.name}'


def _architecture(config, field, num_classes):
  model = workload.student_model_config(config) if field == 'student_model' else config.model
  return f'{model.name!r} with {num_classes} classes'


def _shapes(tree):
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check(field, reference, network, abstract_variables, config, model_field, num_classes, what):
  """Raises a one-line CheckpointError unless `network` fits `abstract_variables` exactly."""
  mismatch = None
  if network.num_classes != num_classes:
    mismatch = f'it has {network.num_classes} classes, {what} here {num_classes}'
  else:
    wanted, loaded = _shapes(abstract_variables), _shapes(network.variables)
    if wanted != loaded:
      differing = sorted(set(wanted) ^ set(loaded)) or sorted(k for k in wanted if wanted[k] != loaded[k])
      mismatch = f'its variables differ from those of {what} (first at {differing[0]})'
  if mismatch:
    raise errors.CheckpointError(
        f'{field}: {reference} ({network.source}) is a {network.architecture}, {what} here a '
        f'{_architecture(config, model_field, num_classes)}: {mismatch}; name a network of the same architecture '
        'and class count')


def load(config, init, num_classes, rundir, phase_name):
  """The networks `config.teacher_init` / `student_init` name, as `{state attribute: variables}` for `apply`.

  Args:
    config: the run's config.
    init: the main phase's `init(rng, initial)`: its fresh state's shapes are those the networks must have.
    num_classes: the data's class count.
    rundir: the run's run_directory.RunDirectory.
    phase_name: the main phase's name (if it has checkpoints in `rundir`, it resumes and nothing is loaded).
  Returns:
    The loaded networks, or None when there is nothing to load.
  """
  roles = _roles(config)
  wanted = {field: getattr(config, field) for field in FIELDS if getattr(config, field)}
  if not wanted:
    return None
  if rundir.has_checkpoints(phase_name):
    logging.info('%s resumes from its own checkpoints: %s not read again', phase_name, ', '.join(wanted))
    return None
  abstract_state = jax.eval_shape(init, jax.random.key(0), None)
  initial = {}
  for field, reference in wanted.items():
    target = roles[field]
    attribute, what = target.state_path[0], _what(config, target)
    try:
      network = trained_models.load(reference)
    except errors.MplError as e:
      raise type(e)(f'{field}: {e}') from None
    _check(field, reference, network, target.variables(abstract_state), config, target.architecture, num_classes,
           what)
    logging.info('%s: %s starts from %s (%s)', field, what, network.source, network.architecture)
    initial[attribute] = network.variables
  return initial


def apply(state, initial):
  """`state` (a fresh state of the main phase) with the `load`ed networks' parameters and BatchNorm statistics in
  place of the fresh ones, their EMAs started as copies of them; `state` itself when `initial` is None."""
  if not initial:
    return state
  updates = {}
  for attribute, variables in initial.items():
    variables = jax.tree.map(jnp.asarray, variables)
    updates[attribute] = getattr(state, attribute).replace(params=variables['params'],
                                                           batch_stats=variables['batch_stats'])
    ema = _EMA_OF.get(attribute)   # the teacher has none
    if ema and getattr(state, ema, None) is not None:
      updates[ema] = jax.tree.map(jnp.copy, variables)
  return state.replace(**updates)
