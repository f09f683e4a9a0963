"""A run's directory, the one owner of what is in it: a local path or any URL `etils.epath` opens (`gs://...`).

    workdir/
      config.json           the config the run was started with (resuming checks it: `check_compatible`)
      inputs.json           what evaluation feeds the models (data/input_spec.py), for prediction and export
      results.json          the final evaluation (train.py)
      report.png            the run's picture (run_report.py)
      checkpoints/<phase>/  orbax step directories of the phase's state (checkpoint.py)
      tensorboard/          event files (reporting.py)

Every module that reads or writes a workdir goes through `RunDirectory`: the path stays an `epath.Path` (never
`os.path`, `open` or `os.path.abspath`, which turn `gs://bucket/run` into a local `<cwd>/gs:/bucket/run`), and a
checkpoint directory is handed to orbax as the URL itself. On a TPU pod every worker opens the same `gs://` URL, so a
preempted pod resumes from the checkpoints all of them wrote.

Atomic writes (`write_json`, `write_bytes`): on a local or mounted file system the file is written under a temporary
name and renamed over the target (a crash never leaves a half-written file); on an object store (a URL: gs://,
s3://) the object is written directly, since an object upload becomes visible only once complete and a "rename"
there is a copy plus a delete, no more atomic than the upload itself.
"""

import io
import json
import os
import struct

from etils import epath

from meta_pseudo_labels import errors

CONFIG = 'config.json'
INPUTS = 'inputs.json'
RESULTS = 'results.json'
REPORT = 'report.png'
CHECKPOINTS = 'checkpoints'
TENSORBOARD = 'tensorboard'

# Fields that decide the shapes and structure of the saved state (or the meaning of its step counter), and the
# fields that decide the data splits and the random streams: resuming with any of them changed either cannot work or
# silently makes another run (a new split_seed could put examples the model was trained on as labeled into the
# validation split), so it is refused. Other fields (step counts, learning rates, cadence) may change on resume.
STATE_DEFINING_FIELDS = (
    'method', 'model', 'student_model', 'dataset.source', 'dataset.name', 'dataset.num_classes',
    'dataset.image_size', 'teacher_optimizer.momentum', 'teacher_optimizer.nesterov',
    'student_optimizer.momentum', 'student_optimizer.nesterov', 'finetune.optimizer.momentum',
    'finetune.optimizer.nesterov', 'mpl.feedback',
    'seed', 'dataset.split_seed', 'dataset.train_split', 'dataset.num_labeled', 'dataset.num_validation',
    'dataset.num_unlabeled', 'dataset.unlabeled_source',
)
# Fields inside STATE_DEFINING_FIELDS' subtrees that change memory and FLOPs only, not the state: a run may resume
# with another rematerialisation policy (and a workdir written before the field existed resumes).
STATE_FREE_FIELDS = ('model.remat', 'student_model.remat')
# Fields whose zero / non-zero choice adds or removes a stage of the optimizer chain (optimizers.create_optimizer),
# hence a node of the optimizer state: only that choice must match, the value may change.
STATE_SWITCH_FIELDS = tuple(f'{optimizer}.{field}'
                            for optimizer in ('teacher_optimizer', 'student_optimizer', 'finetune.optimizer')
                            for field in ('weight_decay', 'grad_clip_norm'))


def _is_object_store(path):
  return '://' in os.fspath(path)


def as_path(path):
  """`path` as an `epath.Path`: a URL exactly as given, a local path made absolute (orbax's file driver wants that)."""
  return epath.Path(path) if _is_object_store(path) else epath.Path(os.path.abspath(path))


def write_bytes(path, data):
  """Writes `data` to `path` (an epath.Path) atomically: see the module docstring."""
  if isinstance(data, str):
    data = data.encode()
  if _is_object_store(path):
    path.write_bytes(data)
    return
  partial = path.parent / f'{path.name}.tmp'
  partial.write_bytes(data)
  partial.replace(path)


def save_figure(figure, path, **savefig_options):
  """A matplotlib figure as a PNG at `path` (a local path or a URL), written atomically."""
  png = io.BytesIO()
  figure.savefig(png, format='png', **savefig_options)
  write_bytes(as_path(path), png.getvalue())


def read_json(path, what):
  """The JSON file at `path`; a CheckpointError naming it if it is missing (then it is not `what`) or damaged."""
  try:
    return json.loads(epath.Path(path).read_text())
  except FileNotFoundError:
    raise errors.CheckpointError(f'{path}: missing, so this is not {what}') from None
  except (OSError, ValueError) as e:
    raise errors.CheckpointError(f'{path}: unreadable ({e}); restore it from a copy') from None


class RunDirectory:
  """One run's directory (see the module docstring); `RunDirectory(url)` touches nothing until asked."""

  def __init__(self, workdir):
    self.path = as_path(workdir)

  def __str__(self):
    return os.fspath(self.path)

  def __truediv__(self, name):
    return self.path / name

  # ---- creating it -------------------------------------------------------------------------------------------

  def prepare(self, process_index=0):
    """Creates the directory and checks it is writable, before any expensive work.

    Writability is tested by writing and removing a probe file (named after this process, so it never clashes with
    a file of the run): `os.access` says yes to root on a read-only mount and knows nothing of remote file systems.
    """
    probe = self.path / f'.write_probe.{os.getpid()}.{process_index}'
    try:
      self.path.mkdir(parents=True, exist_ok=True)
      probe.write_text('')
      probe.unlink()
    except OSError as e:
      raise errors.ConfigError(f'--workdir {self}: cannot write there ({e.strerror or e}); choose a writable '
                               'directory') from None
    return self

  # ---- the files -----------------------------------------------------------------------------------------------

  def write_json(self, name, value, **dump_options):
    write_bytes(self.path / name, json.dumps(value, **dump_options))

  def read_json(self, name, what='a training workdir'):
    return read_json(self.path / name, what)

  def exists(self, name):
    return (self.path / name).exists()

  def write_config(self, config_dict):
    """Stores the config the run was started with (atomically)."""
    self.write_json(CONFIG, config_dict, indent=2, sort_keys=True)

  def read_config(self):
    """The config the run was trained with, as a plain dict."""
    return self.read_json(CONFIG)

  def write_inputs(self, spec_dict):
    self.write_json(INPUTS, spec_dict, indent=2)

  def read_inputs(self):
    """The input spec's dict (data/input_spec.py), or None for a run of a version that did not write it."""
    return self.read_json(INPUTS) if self.exists(INPUTS) else None

  def write_results(self, results):
    self.write_json(RESULTS, results, indent=2, sort_keys=True)

  # ---- checkpoints and event files --------------------------------------------------------------------------------

  def checkpoints(self, phase):
    """The URL of `phase`'s checkpoint directory, as orbax gets it (never made absolute or local)."""
    return self.path / CHECKPOINTS / phase

  def has_checkpoints(self, phase):
    directory = self.checkpoints(phase)
    return directory.is_dir() and any(entry.name.isdigit() for entry in directory.iterdir())

  @property
  def tensorboard(self):
    return self.path / TENSORBOARD

  # ---- the compatibility check ------------------------------------------------------------------------------------

  def check_compatible(self, config_dict):
    """Raises CheckpointError if the directory was started with a config whose state this one cannot restore.

    Args:
      config_dict: the new config as a plain dict (`config.to_dict()`).
    Returns:
      The names of the fields that differ but are allowed to (for a warning), or [] for a fresh directory.
    """
    if not self.exists(CONFIG):
      return []
    saved = self.read_config()
    config_dict = json.loads(json.dumps(config_dict))   # as config.json stores it (tuples become lists)
    for tree in (saved, config_dict):
      for name in STATE_FREE_FIELDS:
        parent, _, key = name.rpartition('.')
        if isinstance(_lookup(tree, parent), dict):
          _lookup(tree, parent).pop(key, None)
    clashes = [name for name in STATE_DEFINING_FIELDS if _lookup(saved, name) != _lookup(config_dict, name)]
    clashes += [name for name in STATE_SWITCH_FIELDS
                if bool(_lookup(saved, name)) != bool(_lookup(config_dict, name))]
    if clashes:
      name = clashes[0]
      why = ' (zero and non-zero build different optimizer states)' if name in STATE_SWITCH_FIELDS else ''
      raise errors.CheckpointError(
          f'{self} holds a run with {name}={_lookup(saved, name)!r}, this config has '
          f'{_lookup(config_dict, name)!r}{why}: use a new --workdir, or resume with the config in '
          f'{self.path / CONFIG}')
    return sorted(_differences(saved, config_dict))


def _lookup(tree, dotted):
  for key in dotted.split('.'):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _differences(a, b, prefix=''):
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, dict) and isinstance(y, dict):
      yield from _differences(x, y, f'{prefix}{key}.')
    elif x != y:
      yield f'{prefix}{key}'


# ---- TensorBoard event files, read back ------------------------------------------------------------------------


def _records(data):
  """The records of a TFRecord file's bytes (length, its masked CRC-32C, data, its masked CRC-32C), up to the first
  damaged one (a truncated tail or a checksum mismatch: what follows is not trusted)."""
  # pylint: disable=g-import-not-at-top  # TensorBoard's pure-Python CRC-32C (TensorFlow's reader wants a gfile path)
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
  offset = 0
  while offset + 12 <= len(data):
    header, (header_crc,) = data[offset:offset + 8], struct.unpack('<I', data[offset + 8:offset + 12])
    (length,) = struct.unpack('<Q', header)
    start, end = offset + 12, offset + 12 + length
    if masked_crc32c(header) != header_crc or end + 4 > len(data):
      return
    record = data[start:end]
    if masked_crc32c(record) != struct.unpack('<I', data[end:end + 4])[0]:
      return
    yield record
    offset = end + 4


def read_scalars(logdir):
  """{tag: {step: value}} of the scalars in every event file under `logdir` (a path or URL), in file-name order:
  later files win (a resumed run's values replace those of the process it resumed). A damaged file (the tail of
  a killed process's file) contributes what was readable before the damage."""
  # pylint: disable=g-import-not-at-top  # only reading event files back needs the tensorboard package's protos
  from tensorboard.compat.proto import event_pb2
  from tensorboard.util import tensor_util
  scalars = {}
  for path in sorted(epath.Path(logdir).glob('events.out.tfevents.*')):
    for record in _records(path.read_bytes()):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField('simple_value'):
          number = value.simple_value
        elif value.metadata.plugin_data.plugin_name == 'scalars':
          number = float(tensor_util.make_ndarray(value.tensor))
        else:
          continue
        scalars.setdefault(value.tag, {})[event.step] = number
  return scalars
