r"""Runs an experiment: `python -m meta_pseudo_labels.main --config=configs/X.py[:arg] --workdir=DIR`.

Any config field can be overridden on the command line (`--config.num_train_steps=1000`,
`--config.model.name=wrn10_1`); `configs/X.py:cpu` shrinks a paper config for a laptop CPU (see configs/common.py).
Running the same command again resumes from the newest checkpoint in DIR.

Mistakes a user can fix (a config field that does not exist or has the wrong type, a missing dataset, a workdir
holding an incompatible run ...) end the program with one line on stderr naming the field or path and the fix, exit
code 2, and nothing in the workdir changed.
"""

import importlib
import os
import re
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')   # before TensorFlow is imported: no C++ INFO chatter

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from meta_pseudo_labels import errors
from meta_pseudo_labels.execution import distributed
from meta_pseudo_labels.rundir import checkpoint

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events and results.json; rerunning '
                    'the same command resumes from it.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, `path.py` or `path.py:arg` (e.g. `configs/cifar10_4k.py:cpu`). '
    'Fields can be overridden with --config.field=value.', lock_config=True)

USER_ERROR_EXIT_CODE = errors.USER_ERROR_EXIT_CODE
PREEMPTED_EXIT_CODE = 143   # 128 + SIGTERM: a checkpoint was saved; schedulers treat the job as interrupted

# config.experiment -> (module, function(config, workdir)); modules are imported only when chosen.
EXPERIMENTS = {
    'train': ('meta_pseudo_labels.run.train', 'train_and_evaluate'),
    'two_moons': ('meta_pseudo_labels.experiments.two_moons', 'run'),
    'digits': ('meta_pseudo_labels.experiments.digits', 'run'),
    'fashion_mnist': ('meta_pseudo_labels.experiments.fashion_mnist', 'run'),
    'precompute_targets': ('meta_pseudo_labels.experiments.precompute_targets', 'run'),   # Reduced MPL, App. E
}
# Sweeps of whole training runs: their function also takes the programs they run, by keyword (program modules never
# import one another, so main, which dispatches them all, hands them over): `train_fn`, the 'train' program, and
# for Fashion-MNIST's Reduced MPL rows `precompute_fn`, the 'precompute_targets' program.
SWEEPS_OF_TRAINING_RUNS = {'digits': {'train_fn': 'train'},
                           'fashion_mnist': {'train_fn': 'train', 'precompute_fn': 'precompute_targets'}}


def _experiment_function(name):
  if name not in EXPERIMENTS:
    raise errors.ConfigError(f'experiment: unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}')
  module_name, function_name = EXPERIMENTS[name]
  return getattr(importlib.import_module(module_name), function_name)


def train_and_evaluate(config, workdir):
  """Runs the experiment `config.experiment` names, writing everything under `workdir`."""
  function = _experiment_function(config.experiment)
  programs = SWEEPS_OF_TRAINING_RUNS.get(config.experiment, {})
  return function(config, workdir, **{keyword: _experiment_function(name) for keyword, name in programs.items()})


def _config_imports_work_from_anywhere(argv):
  """Config files import their siblings (`from configs import common`): put the directory that holds the config's
  folder on sys.path, so `--config=/path/to/configs/X.py` works from any working directory, not only the repo root."""
  for i, arg in enumerate(argv):
    value = arg[len('--config='):] if arg.startswith('--config=') else (
        argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
    if value:
      root = os.path.dirname(os.path.dirname(os.path.abspath(value.split(':', 1)[0])))
      if root not in sys.path:
        sys.path.insert(1, root)


def _parse_flags(argv):
  """absl's flag parsing, with config-flag mistakes turned into one line (absl prints a traceback or two lines)."""
  _config_imports_work_from_anywhere(argv)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    errors.exit_with_one_line(str(e).splitlines()[0])
  except errors.MplError as e:   # raised by a config file's get_config(arg), before main's one_line_user_errors
    errors.exit_with_one_line(str(e))
  except OSError as e:   # a config file that cannot be read, with overrides given
    _cannot_load_config(e)
  except (AttributeError, KeyError) as e:   # ml_collections: --config.<field> that the config does not have
    field, suggestion = _unknown_field(e)
    overrides = [a.split('=')[0] for a in argv if re.match(rf'--config\.(.*\.)?{re.escape(field)}(\.|=|$)', a)]
    where = f' ({overrides[0]})' if overrides else ''
    hint = f'did you mean {suggestion!r}? ' if suggestion else ''
    errors.exit_with_one_line(f'unknown config field {field!r}{where}; {hint}the config file lists the fields '
                              '(python -m meta_pseudo_labels.main --config=FILE --helpfull shows them)')


def _unknown_field(error):
  """(field, suggestion or None) from ml_collections' AttributeError(KeyError("'f'\\nDid you mean \"g\" ..."))."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  first, _, rest = (str(error.args[0]) if error.args else str(error)).partition('\n')
  suggestion = re.search(r'Did you mean "([^"]+)"', rest)
  return first.strip('"\''), suggestion.group(1) if suggestion else None


def _cannot_load_config(error):
  reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
  errors.exit_with_one_line(f'--config: cannot load {FLAGS["config"].config_filename!r} ({reason}); pass an '
                            'existing config file, e.g. --config=configs/two_moons.py')


def _hide_accelerators_from_tensorflow():
  """Where TensorFlow is installed (TFDS sources, clu's writer use it, on the host), without this it would reserve
  GPU/TPU memory that JAX needs; where it is not, nothing needs it."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # optional: TFDS sources and clu only
  except ImportError:
    return
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')


def main(argv):
  errors.no_positional_arguments(argv)
  if not FLAGS.workdir:
    errors.exit_with_one_line('--workdir is required: the directory for checkpoints and results')
  config = _CONFIG.value
  if not isinstance(config, ml_collections.ConfigDict):
    try:   # config_flags defers a file that failed to load to an object that raises its error when read
      config.experiment
    except OSError as e:
      _cannot_load_config(e)
  checkpoint.quiet_orbax_logs()
  try:
    with errors.one_line_user_errors():
      _hide_accelerators_from_tensorflow()
      distributed.initialize()
      logging.info('JAX process %d/%d, local devices %s', jax.process_index(), jax.process_count(),
                   jax.local_devices())
      train_and_evaluate(config, FLAGS.workdir)
  except errors.Preempted as e:
    print(f'preempted: {e}', file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)
  except Exception as e:  # pylint: disable=broad-except  # a dead peer: one line, prompt exit (distributed.py)
    distributed.exit_if_peer_lost(e)
    raise


def run():
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
