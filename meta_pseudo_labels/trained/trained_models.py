"""The networks a run leaves behind, by name: in its workdir's checkpoints, or in a directory `export` wrote.

Prediction, export and warm starts (`config.teacher_init` / `config.student_init`) all take a network from here:

    network = trained_models.restore(workdir, 'student_finetuned')   # or trained_models.load('W:teacher')
    logits = network.module().apply(network.variables, inputs, train=False)

A workdir (rundir/run_directory.py: a local path or a gs:// URL) holds `config.json` (the run's config),
`inputs.json` (the input spec: preprocessing, channel statistics and class names, `input_spec`) and
`checkpoints/<phase>/<step>`; it is read through `run_directory.RunDirectory` alone.
Network names are the ones the run's evaluation reports (results.json), from the table in networks.py: for method
'mpl' 'teacher', 'student' and 'student_ema' (phase 'mpl') and 'student_finetuned' (phase 'finetune'); for
'supervised' / 'uda' 'model' and 'model_ema'. Only the network's parameters and BatchNorm statistics are read,
never an optimizer state.

An exported directory holds `variables.npz` (the same two collections, keys 'params/<module>/.../<name>'),
`metadata.json` (architecture, class count, input spec, where it came from) and `model.jax_exported`
(export.py: the serialized StableHLO program, loadable with jax alone).
"""

import dataclasses
import io
import json
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
from meta_pseudo_labels.rundir import run_directory
from meta_pseudo_labels.trained import networks


ARTIFACT_VARIABLES = 'variables.npz'
ARTIFACT_METADATA = 'metadata.json'
ARTIFACT_PROGRAM = 'model.jax_exported'


@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
  """One trained network: its architecture, variables (numpy) and what it takes as input."""
  name: str                    # a key of networks.NETWORKS
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


def run_config(workdir):
  """The config a workdir was trained with (config.json), as a plain dict."""
  return run_directory.RunDirectory(workdir).read_config()


def network_names(config):
  """The networks a run of `config` (a dict) trains, in evaluation order."""
  return [network.name for network in networks.of_run(config['method'], config['finetune']['num_steps'],
                                                      reduced_teacher=config['mpl'].get('teacher') == 'reduced')]


def final_network(config):
  """The run's final network: the finetuned student, else the EMA student (MPL); the network itself otherwise."""
  return networks.final(config['method'], config['finetune']['num_steps']).name


def _phase_steps(config, phase):
  return config['finetune']['num_steps'] if phase == networks.FINETUNE else config['num_train_steps']


def _model_config(config, field):
  """The architecture of field `field` (a dict): a named student overrides the teacher's fields it sets
  (workload.student_model_config on the saved config.json)."""
  if field == 'student_model' and config['student_model']['name']:
    return {**config['model'], **config['student_model']}
  return config['model']


def read_input_spec(workdir, config):
  """The input spec the run saved; for a workdir trained before inputs.json existed, rebuilt from its data."""
  rundir = run_directory.RunDirectory(workdir)
  saved = rundir.read_inputs()
  if saved is not None:
    return input_spec.InputSpec.from_dict(saved)
  logging.warning('%s is missing (a run of an older version): reading the training data %s again for its channel '
                  'statistics', rundir / run_directory.INPUTS,
                  config['dataset']['data_dir'] or config['dataset']['name'])
  # Only this fallback needs the training data (TFDS data: TensorFlow) and ml_collections; the rest runs on jax alone.
  import ml_collections  # pylint: disable=g-import-not-at-top
  from meta_pseudo_labels.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config)
  return input_pipeline.create(config.dataset, input_pipeline.BatchSpec.from_config(config),
                               seed=config.seed).input_spec


def restore(workdir, name=None):
  """The network `name` (default: `final_network`) from the newest checkpoint of its phase in `workdir`."""
  config = run_config(workdir)
  name = name or final_network(config)
  available = network_names(config)
  if name not in available:
    raise errors.ConfigError(f'{workdir}: the run (method {config["method"]!r}) has no network {name!r}; '
                             f'choose one of {available}')
  network = networks.NETWORKS[name]
  phase = network.phase_of(config['method'])
  directory = run_directory.RunDirectory(workdir).checkpoints(phase)
  variables, step = checkpoint.read_variables(directory, network.state_path)
  if step != _phase_steps(config, phase):
    logging.warning('%s: the newest checkpoint is step %d of %d: the run did not finish, using it as it is',
                    directory, step, _phase_steps(config, phase))
  return TrainedNetwork(name=name, source=f'{directory}/{step}',
                        model_config=_model_config(config, network.architecture),
                        num_classes=config['dataset']['num_classes'], variables=variables,
                        inputs=read_input_spec(workdir, config))


# ---- exported directories ----------------------------------------------------------------------------------------


def _unflatten(flat):
  """The variables of an exported .npz ('params/stem/kernel' keys), every collection present."""
  return {**{collection: {} for collection in checkpoint.VARIABLE_COLLECTIONS},
          **traverse_util.unflatten_dict(flat, sep='/')}


def is_artifact(directory):
  return (run_directory.as_path(directory) / ARTIFACT_METADATA).is_file()


def write_artifact(directory, network, program_bytes, extra_metadata):
  """Writes an exported directory (a local path or a URL): the program, the variables and the metadata (see the
  module docstring); the metadata last, so a directory with metadata is complete (`is_artifact`)."""
  directory = run_directory.as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  run_directory.write_bytes(directory / ARTIFACT_PROGRAM, program_bytes)
  variables = traverse_util.flatten_dict(jax.tree.map(np.asarray, network.variables), sep='/')
  npz = io.BytesIO()
  np.savez(npz, **variables)
  run_directory.write_bytes(directory / ARTIFACT_VARIABLES, npz.getvalue())
  metadata = {'network': network.name, 'source': network.source, 'model': network.model_config,
              'num_classes': network.num_classes, 'inputs': network.inputs.to_dict(), **extra_metadata}
  run_directory.write_bytes(directory / ARTIFACT_METADATA, json.dumps(metadata, indent=2))


def read_artifact(directory):
  """The network of an exported directory (its variables and metadata; the program is for jax alone)."""
  directory = run_directory.as_path(directory)
  metadata = run_directory.read_json(directory / ARTIFACT_METADATA, 'an exported model directory')
  path = directory / ARTIFACT_VARIABLES
  try:
    with np.load(io.BytesIO(path.read_bytes())) as npz:
      variables = _unflatten({key: npz[key] for key in npz.files})
  except (OSError, ValueError) as e:
    raise errors.CheckpointError(f'{path}: unreadable ({e}); export the model again') from None
  return TrainedNetwork(name=metadata['network'], source=str(directory), model_config=metadata['model'],
                        num_classes=metadata['num_classes'], variables=variables,
                        inputs=input_spec.InputSpec.from_dict(metadata['inputs']))


# ---- 'W', 'W:<network or phase>' or an exported directory --------------------------------------------------------


def load(reference):
  """The network a reference names (`networks.parse_reference`); a workdir without a suffix gives its final
  network."""
  directory, name = networks.parse_reference(reference)
  if is_artifact(directory):
    if name:
      raise errors.ConfigError(f'{reference}: {directory} is an exported model (one network); drop ":{name}"')
    return read_artifact(directory)
  return restore(directory, name)
