"""Checkpoints: a thin wrapper over orbax's CheckpointManager, so the training loop never imports orbax.

What it adds to orbax, and why:
- Restore falls back past an unreadable newest checkpoint. Orbax finalises a step directory only once every file is
  written (a half-written save stays a `*.orbax-checkpoint-tmp-*` directory and is cleaned up), but a finalised
  directory can still be damaged later (a truncated file on a full disk, a partial copy). Such a step is renamed to
  `<step>.corrupt` (kept for inspection, never deleted) and the next older one is tried, with a warning naming both.
- Preemption: `reached_preemption(step)` turns SIGTERM into a flag the loop polls at step boundaries. With several
  processes it defers to orbax / `multihost_utils.reached_preemption_sync_point`, so every host saves the same step.
- `read_variables(directory, path)`: one network's parameters and BatchNorm statistics out of a phase's newest
  checkpoint, read alone (no optimizer state, nothing written), for prediction, export and warm starts.
- The directory is a local path or a URL (`gs://...`, run_directory.py) and reaches orbax unchanged.
"""

import logging as python_logging
import signal
import threading

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from meta_pseudo_labels import errors
from meta_pseudo_labels.rundir import run_directory


class _QuietOrbax(python_logging.Filter):
  """Drops INFO records of orbax (dozens of lines per checkpoint); its warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= python_logging.WARNING or '/orbax/' not in record.pathname


def quiet_orbax_logs():
  """For the programs: keeps orbax's INFO chatter out of the absl log."""
  logging.get_absl_handler().addFilter(_QuietOrbax())


def _key_name(key):
  for attribute in ('key', 'name', 'idx'):   # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _shapes(tree):
  """{'teacher/params/Dense_0/kernel': shape} for a state, its abstract twin or orbax's metadata tree alike."""
  return {'/'.join(_key_name(k) for k in path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
  """Saves and restores one training phase's state plus a small JSON dict of loop bookkeeping (`extra`).

  Steps are the phase's own step counter; a checkpoint at step s holds the state after s steps, so the loop restarts
  its data iterator at s (batches are a pure function of (seed, step)).
  """

  def __init__(self, directory, keep, async_save=True):
    self.directory = run_directory.as_path(directory)   # a URL stays a URL: orbax writes gs:// itself
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,        # half-written saves of a killed run
        enable_async_checkpointing=async_save,
    )
    # Handlers named up front (not only through save/restore args) so that a step's metadata can be read alone.
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        'state': ocp.StandardCheckpointHandler(), 'extra': ocp.JsonCheckpointHandler()})
    self._preempted = threading.Event()
    self._multi_process = jax.process_count() > 1
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      # Multi-process runs leave SIGTERM to JAX's preemption notifier (read through orbax below).
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    else:
      self._previous_handler = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step boundary, then exiting.')
    self._preempted.set()

  def reached_preemption(self, step):
    """True once a preemption notice arrived; on multi-host True at the same `step` on every host."""
    if self._multi_process:
      return self._manager.reached_preemption(step)
    return self._preempted.is_set()

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step, state, extra):
    """Starts an (async) save of `state` and the JSON-serialisable `extra`; orbax deletes the oldest kept step only
    after the new one is finalised."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)

  def restore(self, step, target_abstract_state):
    """Restores `(state, extra, step)` from `step`, or the newest readable step if `step` is None.

    `target_abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (from `jax.eval_shape` plus the
    state's shardings): arrays come back sharded, straight onto the mesh. Returns None if there is no checkpoint.
    """
    steps = [step] if step is not None else self.all_steps()[::-1]
    failures = []
    for candidate in steps:
      try:
        restored = self._manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target_abstract_state), extra=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  # any unreadable step: fall back to an older one
        mismatch = self._mismatch(candidate, target_abstract_state)
        if mismatch:   # readable, but written by a config that builds another state: not damage, touch nothing
          raise errors.CheckpointError(
              f'{self.directory}/{candidate} holds a state this config does not build ({mismatch}); resume with '
              'the config it was written with (config.json in the workdir) or use a new --workdir') from None
        failures.append((candidate, e))
        logging.warning('Checkpoint %s/%d is unreadable (%s: %s); trying an older one.',
                        self.directory, candidate, type(e).__name__, str(e).splitlines()[0] if str(e) else '')
        continue
      if failures:
        self._set_aside([s for s, _ in failures])
        logging.warning('Restored %s/%d instead of the unreadable newer checkpoint(s) %s (renamed to <step>.corrupt).',
                        self.directory, candidate, [s for s, _ in failures])
      return restored['state'], restored['extra'], candidate
    if failures:
      bad_step, e = failures[0]
      raise errors.CheckpointError(
          f'{self.directory}: no readable checkpoint (step {bad_step}: {type(e).__name__}: '
          f'{str(e).splitlines()[0] if str(e) else ""}); if the config changed use a new --workdir, '
          'else remove the damaged step directories') from None
    return None

  def _mismatch(self, step, target_abstract_state):
    """How the state saved at `step` differs in structure or shapes from the target, from the step's metadata
    alone; None if they agree or the metadata cannot be read (then the step is damaged, not foreign)."""
    try:
      saved = _shapes(self._manager.item_metadata(step)['state'])
    except Exception:  # pylint: disable=broad-except  # unreadable metadata: damage, handled by the caller
      return None
    if not saved:
      return None
    wanted = _shapes(target_abstract_state)
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing:
      return f'it has no {missing[0]}'
    if extra:
      return f'it has {extra[0]}, which this config does not'
    for path in sorted(wanted):
      if saved[path] != wanted[path]:
        return f'{path} has shape {saved[path]} there, {wanted[path]} here'
    return None

  def _set_aside(self, bad_steps):
    """Renames damaged steps out of orbax's view (so the run can save those steps again) without deleting them."""
    if jax.process_index() == 0:
      for s in bad_steps:
        src = self.directory / str(s)
        if src.is_dir():
          src.rename(self.directory / f'{s}.corrupt')
    self._manager.reload()

  def wait(self):
    """Blocks until pending async saves are finalised (call before reporting a save as done, and at exit)."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


VARIABLE_COLLECTIONS = ('params', 'batch_stats')


def latest_step(directory):
  """The newest finalised step saved in `directory`, or None (no directory, or no finalised step).

  Reads the step names alone: no manager, so no orbax threads or tensorstore objects are left behind in a process
  that goes on to train (one opened and closed here coincided with aborts of later steps in the suite).
  """
  directory = run_directory.as_path(directory)
  if not directory.is_dir():
    return None
  steps = ocp.path.step.checkpoint_steps(directory)
  return max(steps) if steps else None


def read_variables(directory, path):
  """`{'params', 'batch_stats'}` (numpy) of the network at `path` (keys into the saved state, e.g. ('teacher',))
  in the newest checkpoint of `directory`; returns `(variables, step)`.

  Only these arrays are read (orbax's partial restore), so restoring a student never loads the optimizer states.
  A damaged or foreign checkpoint is a CheckpointError naming it; unlike `Checkpointer.restore`, nothing is renamed
  or written, and no older step is tried (that would silently be another model).
  """
  directory = run_directory.as_path(directory)
  if not directory.is_dir():
    raise errors.CheckpointError(f'{directory}: no such checkpoint directory; did the run reach this phase?')
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(), 'extra': ocp.JsonCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    raise errors.CheckpointError(f'{directory}: no finished checkpoint; train the run (further) first')
  where = f'{directory}/{step}'
  try:
    metadata = manager.item_metadata(step)['state']
    for key in path:
      metadata = metadata[key]
    saved = {collection: dict(metadata[collection]) for collection in VARIABLE_COLLECTIONS if collection in metadata}
  except Exception as e:  # pylint: disable=broad-except  # missing or unreadable metadata
    raise errors.CheckpointError(f'{where}: unreadable checkpoint metadata or no {"/".join(path)} in it '
                                 f'({type(e).__name__}); use another workdir or retrain') from None
  if 'params' not in saved:
    raise errors.CheckpointError(f'{where}: holds no parameters under {"/".join(path)}')
  target = {collection: tree for collection, tree in saved.items() if tree}   # e.g. an MLP's empty batch_stats
  for key in reversed(path):
    target = {key: target}
  abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), target)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract),
        partial_restore=True)))['state']
  except Exception as e:  # pylint: disable=broad-except  # truncated or missing array files
    first_line = str(e).splitlines()[0] if str(e) else ''
    raise errors.CheckpointError(f'{where}: damaged checkpoint ({type(e).__name__}: {first_line[:200]}); use an '
                                 'intact copy or retrain') from None
  finally:
    manager.close()
  for key in path:
    restored = restored[key]
  return {collection: restored.get(collection, {}) for collection in VARIABLE_COLLECTIONS}, step
