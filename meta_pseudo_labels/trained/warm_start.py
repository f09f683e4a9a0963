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

import dataclasses

from absl import logging
import jax
import jax.numpy as jnp

from meta_pseudo_labels import errors
from meta_pseudo_labels.execution import workload
from meta_pseudo_labels.trained import trained_models

FIELDS = ('teacher_init', 'student_init')


def _roles(config):
  """field -> (the state's network attribute, the config field of its architecture, what the error calls it)."""
  if config.method == 'mpl':
    return {'teacher_init': ('teacher', 'model', 'the teacher'),
            'student_init': ('student', 'student_model', 'the student')}
  return {'teacher_init': ('network', 'model', f'the {config.method} network')}


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


def prepare(config, phase, num_classes, rundir):
  """Returns `(phase, initial)`: the phase whose init takes the loaded networks, and those networks.

  Args:
    config: the run's config.
    phase: the run's main phase (train.Phase: `init(rng, source)`, `name`), unchanged if nothing is to be loaded.
    num_classes: the data's class count.
    rundir: the run's run_directory.RunDirectory (a phase that has checkpoints there resumes; nothing is loaded).
  Returns:
    `(phase, None)` when there is nothing to load; else a phase whose init is `init(rng, initial)` with the
    loaded `{attribute: variables}` put into the fresh state, and `initial` to pass as its source.
  """
  roles = _roles(config)
  wanted = {field: getattr(config, field) for field in FIELDS if getattr(config, field)}
  if not wanted:
    return phase, None
  if rundir.has_checkpoints(phase.name):
    logging.info('%s resumes from its own checkpoints: %s not read again', phase.name, ', '.join(wanted))
    return phase, None
  abstract = jax.eval_shape(phase.init, jax.random.key(0), None)
  initial = {}
  for field, reference in wanted.items():
    attribute, model_field, what = roles[field]
    try:
      network = trained_models.load(reference)
    except errors.MplError as e:
      raise type(e)(f'{field}: {e}') from None
    _check(field, reference, network, getattr(abstract, attribute).variables, config, model_field, num_classes,
           what)
    logging.info('%s: %s starts from %s (%s)', field, what, network.source, network.architecture)
    initial[attribute] = network.variables

  def init(rng, networks):
    state = phase.init(rng, None)
    updates = {}
    for attribute, variables in networks.items():
      variables = jax.tree.map(jnp.asarray, variables)
      updates[attribute] = getattr(state, attribute).replace(params=variables['params'],
                                                             batch_stats=variables['batch_stats'])
      copy = jax.tree.map(jnp.copy, variables)
      if attribute == 'student':
        updates['student_ema'] = copy
      elif attribute == 'network' and state.ema is not None:
        updates['ema'] = copy
    return state.replace(**updates)

  return dataclasses.replace(phase, init=init), initial
