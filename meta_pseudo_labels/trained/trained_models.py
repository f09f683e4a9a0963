"""The networks a run leaves behind, by name: in its workdir's checkpoints, or in a directory `export` wrote.

Prediction, export and warm starts (`config.teacher_init` / `config.student_init`) all take a network from here:

    network = trained_models.restore(workdir, 'student_finetuned')   # or trained_models.load('W:teacher')
    logits = network.module().apply(network.variables, inputs, train=False)

A workdir holds `config.json` (the run's config, checkpoint.write_config), `inputs.json` (the input spec:
preprocessing, channel statistics and class names, `input_spec`) and `checkpoints/<phase>/<step>`.
Network names are the ones the run's evaluation reports (results.json): for method 'mpl' 'teacher', 'student' and
'student_ema' (phase 'mpl') and 'student_finetuned' (phase 'finetune'); for 'supervised' / 'uda' 'model' and
'model_ema'. Only the network's parameters and BatchNorm statistics are read, never an optimizer state.

An exported directory holds `variables.npz` (the same two collections, keys 'params/<module>/.../<name>'),
`metadata.json` (architecture, class count, input spec, where it came from) and `model.jax_exported`
(export.py: the serialized StableHLO program, loadable with jax alone).
"""

import dataclasses
import json
import os
import types
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import numpy as np

from meta_pseudo_labels import errors
from meta_pseudo_labels import models
from meta_pseudo_labels.data import input_spec
from meta_pseudo_labels.rundir import checkpoint

# name -> (phase, keys of the network's {'params', 'batch_stats'} in that phase's state, its architecture's field).
# Phase None: the run's method ('supervised' | 'uda' train one network in a phase named after the method).
NETWORKS = {
    'teacher': ('mpl', ('teacher',), 'model'),
    'student': ('mpl', ('student',), 'student_model'),
    'student_ema': ('mpl', ('student_ema',), 'student_model'),
    'student_finetuned': ('finetune', ('network',), 'student_model'),
    'model': (None, ('network',), 'model'),
    'model_ema': (None, ('ema',), 'model'),
}
# A phase named instead of a network stands for the phase's final network: the one MPL reports (App. C: the EMA
# student) and finetunes, the finetuned student, the supervised / UDA network itself.
PHASE_NETWORKS = {'mpl': 'student_ema', 'finetune': 'student_finetuned', 'supervised': 'model', 'uda': 'model'}

ARTIFACT_VARIABLES = 'variables.npz'
ARTIFACT_METADATA = 'metadata.json'
ARTIFACT_PROGRAM = 'model.jax_exported'


@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
  """One trained network: its architecture, variables (numpy) and what it takes as input."""
  name: str                    # a key of NETWORKS
  source: str                  # where it was read (a checkpoint step directory or an exported directory)
  model_config: dict           # the run's `model` / `student_model` config (models.create_model's fields)
  num_classes: int
  variables: Any               # {'params': ..., 'batch_stats': ...} of numpy arrays
  inputs: input_spec.InputSpec    # what it takes (the run's eval preprocessing)

  def module(self):
    """The Flax module (BatchNorm over the whole batch: in evaluation it uses its statistics only)."""
    return models.create_model(types.SimpleNamespace(**self.model_config), num_classes=self.num_classes)

  @property
  def architecture(self):
    return f'{self.model_config["name"]!r} with {self.num_classes} classes'


def _read_json(path, what):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise errors.CheckpointError(f'{path}: missing, so this is not {what}') from None
  except (OSError, ValueError) as e:
    raise errors.CheckpointError(f'{path}: unreadable ({e}); restore it from a copy') from None


def run_config(workdir):
  """The config a workdir was trained with (config.json), as a plain dict."""
  return _read_json(os.path.join(workdir, checkpoint.CONFIG_FILENAME), 'a training workdir')


def network_names(config):
  """The networks a run of `config` (a dict) trains, in evaluation order."""
  if config['method'] == 'mpl':
    # Reduced MPL's teacher T_R (App. E) reads stored targets, not images: not a network to load by name.
    teacher = [] if config['mpl'].get('teacher') == 'reduced' else ['teacher']
    return teacher + ['student', 'student_ema'] + (['student_finetuned'] if config['finetune']['num_steps'] else [])
  return ['model', 'model_ema']


def final_network(config):
  """The run's final network: the finetuned student, else the EMA student (MPL); the network itself otherwise."""
  return network_names(config)[-1] if config['method'] == 'mpl' else 'model'


def _phase_steps(config, phase):
  return config['finetune']['num_steps'] if phase == 'finetune' else config['num_train_steps']


def _model_config(config, field):
  return config['student_model'] if field == 'student_model' and config['student_model']['name'] else config['model']


def read_input_spec(workdir, config):
  """The input spec the run saved; for a workdir trained before inputs.json existed, rebuilt from its data."""
  path = os.path.join(workdir, input_spec.FILENAME)
  if os.path.exists(path):
    return input_spec.InputSpec.from_dict(_read_json(path, 'a training workdir'))
  logging.warning('%s is missing (a run of an older version): reading the training data %s again for its channel '
                  'statistics', path, config['dataset']['data_dir'] or config['dataset']['name'])
  # Only this fallback needs TensorFlow and ml_collections: everything else here runs with jax alone.
  import ml_collections  # pylint: disable=g-import-not-at-top
  from meta_pseudo_labels.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.create(ml_collections.ConfigDict(config)).input_spec


def restore(workdir, name=None):
  """The network `name` (default: `final_network`) from the newest checkpoint of its phase in `workdir`."""
  config = run_config(workdir)
  name = name or final_network(config)
  available = network_names(config)
  if name not in available:
    raise errors.ConfigError(f'{workdir}: the run (method {config["method"]!r}) has no network {name!r}; '
                             f'choose one of {available}')
  phase, path, field = NETWORKS[name]
  phase = phase or config['method']
  directory = os.path.join(workdir, 'checkpoints', phase)
  variables, step = checkpoint.read_variables(directory, path)
  if step != _phase_steps(config, phase):
    logging.warning('%s: the newest checkpoint is step %d of %d: the run did not finish, using it as it is',
                    directory, step, _phase_steps(config, phase))
  return TrainedNetwork(name=name, source=f'{directory}/{step}', model_config=_model_config(config, field),
                        num_classes=config['dataset']['num_classes'], variables=variables,
                        inputs=read_input_spec(workdir, config))


# ---- exported directories ----------------------------------------------------------------------------------------


def _unflatten(flat):
  """The variables of an exported .npz ('params/stem/kernel' keys), every collection present."""
  return {**{collection: {} for collection in checkpoint.VARIABLE_COLLECTIONS},
          **traverse_util.unflatten_dict(flat, sep='/')}


def is_artifact(directory):
  return os.path.isfile(os.path.join(directory, ARTIFACT_METADATA))


def write_artifact(directory, network, program_bytes, extra_metadata):
  """Writes an exported directory: the program, the variables and the metadata (see the module docstring)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, ARTIFACT_PROGRAM), 'wb') as f:
    f.write(program_bytes)
  variables = traverse_util.flatten_dict(jax.tree.map(np.asarray, network.variables), sep='/')
  np.savez(os.path.join(directory, ARTIFACT_VARIABLES), **variables)
  metadata = {'network': network.name, 'source': network.source, 'model': network.model_config,
              'num_classes': network.num_classes, 'inputs': network.inputs.to_dict(), **extra_metadata}
  with open(os.path.join(directory, ARTIFACT_METADATA), 'w') as f:
    json.dump(metadata, f, indent=2)


def read_artifact(directory):
  """The network of an exported directory (its variables and metadata; the program is for jax alone)."""
  metadata = _read_json(os.path.join(directory, ARTIFACT_METADATA), 'an exported model directory')
  path = os.path.join(directory, ARTIFACT_VARIABLES)
  try:
    with np.load(path) as npz:
      variables = _unflatten({key: npz[key] for key in npz.files})
  except (OSError, ValueError) as e:
    raise errors.CheckpointError(f'{path}: unreadable ({e}); export the model again') from None
  return TrainedNetwork(name=metadata['network'], source=directory, model_config=metadata['model'],
                        num_classes=metadata['num_classes'], variables=variables,
                        inputs=input_spec.InputSpec.from_dict(metadata['inputs']))


# ---- 'W', 'W:<network or phase>' or an exported directory --------------------------------------------------------


def parse_reference(reference):
  """'W' | 'W:<network or phase>' | an exported directory -> (directory, network name or None).

  The suffix counts only if it names a network or phase, so paths with colons (gs://...) stay whole.
  """
  directory, _, suffix = reference.rpartition(':')
  if directory and (suffix in NETWORKS or suffix in PHASE_NETWORKS):
    return directory, PHASE_NETWORKS.get(suffix, suffix)
  return reference, None


def load(reference):
  """The network a reference names (see `parse_reference`); a workdir without a suffix gives its final network."""
  directory, name = parse_reference(reference)
  if is_artifact(directory):
    if name:
      raise errors.ConfigError(f'{reference}: {directory} is an exported model (one network); drop ":{name}"')
    return read_artifact(directory)
  return restore(directory, name)
