"""Checks a training config before any expensive work (data loading, compilation) and names the fix.

Every problem is an `errors.ConfigError` with one line: the field, the value, and what to do.

`validate` runs this module's checks first, then every owner's rules on the sub-config it owns, all called from one
place (`_owners`): a model's own fields are `models.check_config`'s, an optimizer's ranges and schedule
`optimizers.check_config`'s, the MPL fields' ranges and combinations (feedback mode, pseudo labels, h_sign,
baseline rate, label smoothing, EMA decay) `mpl.MplHparams`', the views' ranges `augment.check_config`'s, the mesh
and the batches against it `sharding.check_config`'s, a warm start's directory `warm_start.check_reference`'s.
Each choice is listed once, by the module that implements it (`dataset_choices.SOURCES`,
`step_builder.ON_NONFINITE`, ...), and checked here against that list. This module adds what no single user of a
field can see: the types and finiteness of values typed on the command line (checked here before any owner reads
them), and the constraints between fields (labeled examples per class, a model against the kind of data, the
student's wait against the run's length, the BatchNorm group against the batch). Checks that need the data (a
labeled count larger than the dataset, a class without examples) belong to the input pipeline, which raises
`errors.DataError` when it first reads the data.
"""

import math
import numbers

from meta_pseudo_labels import errors
from meta_pseudo_labels import models
from meta_pseudo_labels.data import augment
from meta_pseudo_labels.data import dataset_choices
from meta_pseudo_labels.execution import sharding
from meta_pseudo_labels.execution import step_builder
from meta_pseudo_labels.method import mpl
from meta_pseudo_labels.method import optimizers
from meta_pseudo_labels.trained import warm_start

METHODS = ('mpl', 'supervised', 'uda')   # train.py's programs: MPL + finetuning, or one network alone
# Conv nets halve the resolution up to 5 times; below this the last stages see a single pixel of padding.
MIN_IMAGE_SIZE = 8


def _get(config, field):
  value = config
  for key in field.split('.'):
    value = getattr(value, key)
  return value


def _choice(config, field, choices):
  value = _get(config, field)
  if value not in choices:
    raise errors.ConfigError(f'{field}: unknown value {value!r}; choose one of {list(choices)}')
  return value


def _integer(config, field, minimum=-math.inf):
  value = _get(config, field)
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    at_least = f' >= {minimum}' if minimum > -math.inf else ''
    raise errors.ConfigError(f'{field}: must be an integer{at_least}, got {value!r}')
  return int(value)


def _number(config, field):
  """A finite number (an inf learning rate would only surface as a divergence after compiling); its range is the
  owner's."""
  value = _get(config, field)
  if not isinstance(value, numbers.Real) or isinstance(value, bool):
    raise errors.ConfigError(f'{field}: must be a number, got {value!r}')
  if not math.isfinite(value):
    raise errors.ConfigError(f'{field}: must be a finite number, got {value!r}')
  return value


def _model_input(config, field):
  """Whether the model of `field` takes the data's kind of input (a name the registry lacks is the owner's)."""
  name = _get(config, field).name
  vector_input = config.dataset.source == 'two_moons'
  if name in models.MODELS and (name in models.VECTOR_MODELS) != vector_input and config.dataset.source != 'npz':
    kind = 'vectors (dataset.source two_moons)' if name in models.VECTOR_MODELS else 'images'
    raise errors.ConfigError(f'{field}.name: {name!r} takes {kind}, but dataset.source is '
                             f'{config.dataset.source!r}; choose a model for this data')


def validate(config, num_devices):
  """Raises `errors.ConfigError` for the first problem found in a training config (see the module docstring)."""
  batch_sizes = _fields(config)
  _owners(config, num_devices, batch_sizes)


def _fields(config):
  """This module's checks (module docstring); returns the run's global batches, {config field: size}."""
  method = _choice(config, 'method', METHODS)
  _choice(config, 'on_nonfinite', step_builder.ON_NONFINITE)
  for field in ('seed', 'dataset.split_seed'):   # roots of jax.random.key and numpy's generators, which want >= 0
    _integer(config, field, 0)

  # Data.
  _choice(config, 'dataset.source', dataset_choices.SOURCES)
  _choice(config, 'dataset.augment', dataset_choices.AUGMENTATIONS)
  _choice(config, 'dataset.labeled_view', dataset_choices.LABELED_VIEWS)
  num_classes = _integer(config, 'dataset.num_classes', 2)
  if config.dataset.source != 'two_moons':
    _integer(config, 'dataset.image_size', MIN_IMAGE_SIZE)
    for field in ('randaugment_num_ops', 'cutout_size', 'pad_crop'):
      _integer(config, f'dataset.{field}')
    _number(config, 'dataset.randaugment_magnitude')
  num_labeled = _integer(config, 'dataset.num_labeled', 1)
  if num_labeled < num_classes:
    raise errors.ConfigError(f'dataset.num_labeled: {num_labeled} labeled examples leave some of the {num_classes} '
                             f'classes without one; use at least {num_classes}')
  _integer(config, 'dataset.num_validation', 0)
  if _get(config, 'dataset.num_unlabeled') != -1:
    _integer(config, 'dataset.num_unlabeled', 1)
  if config.dataset.source in ('folder', 'npz', 'idx') and not config.dataset.data_dir:
    raise errors.ConfigError(f'dataset.data_dir: source {config.dataset.source!r} needs a path '
                             '(an image-folder root, an .npz file or an idx directory); set '
                             '--config.dataset.data_dir=PATH')

  # Models.
  _model_input(config, 'model')
  if config.student_model.name:
    _model_input(config, 'student_model')
  elif _get(config, 'student_model.remat') != 'none':
    raise errors.ConfigError(f'student_model.remat: {config.student_model.remat!r} applies only with '
                             'student_model.name set; with name empty the student is `model`, remat included: set '
                             'model.remat, or name the student')

  # Warm starts: the format here; the directory is `warm_start.check_reference`'s, the network's architecture
  # is checked when the run builds its state.
  for field in warm_start.FIELDS:
    reference = _get(config, field)
    if not isinstance(reference, str):
      raise errors.ConfigError(f"{field}: must be a string (a workdir 'W', 'W:<network>' or an exported "
                               f'directory), got {reference!r}')
    if reference and field == 'student_init' and method != 'mpl':
      raise errors.ConfigError(f"student_init: method {method!r} trains no student; use teacher_init for its network")

  # Steps and cadence.
  _integer(config, 'num_train_steps', 1)
  _integer(config, 'finetune.num_steps', 0)
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                'steps_per_dispatch'):
    _integer(config, field, 1)
  _integer(config, 'uda.ramp_steps', 1)

  # Losses and optimizers: types and finiteness here, the ranges are the owners' (`_owners`).
  for field in ('label_smoothing', 'ema_decay', 'mpl.h_sign', 'mpl.baseline_rate', 'uda.weight', 'uda.temperature',
                'uda.threshold'):
    _number(config, field)
  for name in ('teacher_optimizer', 'student_optimizer', 'finetune.optimizer'):
    for field in ('learning_rate', 'weight_decay', 'grad_clip_norm', 'momentum'):
      _number(config, f'{name}.{field}')
    for field in ('warmup_steps', 'wait_steps'):
      _integer(config, f'{name}.{field}', 0)
  if method == 'mpl' and config.mpl.teacher == 'reduced':
    # Reduced MPL (App. E): T_R on a trained teacher's stored targets (reduced.targets_dir: trained/teacher_targets.py
    # checks them when the run starts; compile_check needs none).
    if config.teacher_init:
      raise errors.ConfigError('teacher_init: the reduced teacher T_R starts at the identity on the stored targets; '
                               'the trained teacher goes into reduced.teacher of the precompute, not here')
    _integer(config, 'reduced.top_k', 1)
    if any(not isinstance(size, int) or size < 1 for size in config.reduced.hidden_sizes):
      raise errors.ConfigError(f'reduced.hidden_sizes: {tuple(config.reduced.hidden_sizes)}; need positive integers '
                               '(() is allowed: T_R is then a residual linear map)')
  wait_steps, num_train_steps = config.student_optimizer.wait_steps, config.num_train_steps
  if method == 'mpl' and wait_steps >= num_train_steps:
    raise errors.ConfigError(f'student_optimizer.wait_steps: the student waits {wait_steps} steps at lr 0 but the run '
                             f'has num_train_steps={num_train_steps}, so it would never learn; lower '
                             '--config.student_optimizer.wait_steps (a `:cpu` config waits 10 % of its steps)')

  # Batches: each is split over the mesh's data x fsdp devices (`sharding.check_config`).
  batch_size = _integer(config, 'batch_size', 1)
  batch_sizes = {'batch_size': batch_size, 'eval_batch_size': _integer(config, 'eval_batch_size', 1)}
  if method == 'mpl' and config.finetune.num_steps:
    batch_sizes['finetune.batch_size'] = _integer(config, 'finetune.batch_size', 1)
  if method in ('mpl', 'uda'):
    batch_sizes['batch_size * uda_ratio'] = batch_size * _integer(config, 'uda_ratio', 1)
  group = _integer(config, 'batch_norm_group_size', 0)
  if group and batch_size % group:
    raise errors.ConfigError(f'batch_norm_group_size: {group} does not divide batch_size {batch_size}; '
                             'use a divisor of the batch size, or 0 for the whole batch')
  return batch_sizes


def _owners(config, num_devices, batch_sizes):
  """Every owner's rules on the sub-config it owns (module docstring), once `_fields` has checked their types."""
  warm_start.check_reference(config.teacher_init, 'teacher_init')
  warm_start.check_reference(config.student_init, 'student_init')
  models.check_config(config.model, 'model')
  if config.student_model.name:
    models.check_config(config.student_model, 'student_model')
  optimizers.check_config(config.teacher_optimizer, 'teacher_optimizer')
  optimizers.check_config(config.student_optimizer, 'student_optimizer')
  optimizers.check_config(config.finetune.optimizer, 'finetune.optimizer')
  mpl.MplHparams.from_config(config)
  image_data = config.dataset.source != 'two_moons'
  sharding.check_config(config.mesh, num_devices, batch_sizes,
                        image_size=config.dataset.image_size if image_data else None)
  if image_data:
    augment.check_config(config.dataset)
