"""Metrics and progress: a thin writer, so the training loop never imports clu or TensorFlow.

Scalars go to TensorBoard event files under `workdir/tensorboard` and to the log: clu's default writer where clu is
installed, else `_EventFileWriter`, the tensorboard package's own event writer (no TensorFlow, no clu: the program
runs wherever JAX runs). Only the primary process writes event files; the others log; `run_directory.read_scalars`
reads them back, and `write_sweep_results` writes and prints a sweep's table and JSON.
`progress(step)` adds a line with steps/s and an ETA measured between two calls, so call it where the host has
synchronised with the device (at log steps, after fetching metrics) or the rate would measure dispatch, not
computation."""

import json
import os
import time

from absl import logging
import jax

from meta_pseudo_labels.rundir import run_directory


def format_duration(seconds):
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{secs:02d}s'


class Reporter:
  """Writes scalars/hparams and reports progress over `total_steps` (all phases of a run, one global step axis)."""

  def __init__(self, logdir, total_steps, is_primary=True):
    self.total_steps = total_steps
    self.logdir = os.fspath(logdir)   # a URL stays one
    self._writer = _create_writer(self.logdir if is_primary else None)
    self._last = None   # (step, time) of the previous progress() call

  def scalars(self, step, scalars):
    self._writer.write_scalars(step, {k: float(v) for k, v in scalars.items()})

  def hparams(self, flat_config):
    self._writer.write_hparams(flat_config)

  def progress(self, step):
    """Logs `step/total (pct), steps/s, ETA` and writes `steps_per_sec`; the first call only starts the clock."""
    now = time.monotonic()
    if self._last is not None and step > self._last[0]:
      rate = (step - self._last[0]) / max(now - self._last[1], 1e-9)
      eta = (self.total_steps - step) / rate
      logging.info('step %d/%d (%.1f%%), %.2f steps/s, ETA %s', step, self.total_steps,
                   100.0 * step / max(self.total_steps, 1), rate, format_duration(eta))
      self._writer.write_scalars(step, {'steps_per_sec': rate})
    self._last = (step, now)

  def restart_clock(self, step):
    """Forget the previous timing (after an evaluation or a checkpoint, whose time is not training speed)."""
    self._last = (step, time.monotonic())

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def _create_writer(logdir):
  """clu's default writer (log + event files, asynchronous) if clu is installed, else `_EventFileWriter`."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  # optional
  except ImportError:   # no clu (or clu without its TensorFlow)
    return _EventFileWriter(logdir)
  return metric_writers.create_default_writer(logdir, just_logging=logdir is None, asynchronous=True)


class _EventFileWriter:
  """Scalars and hparams to the log and (when `logdir` is given) to an event file, through the tensorboard
  package's own `EventFileWriter` (no TensorFlow, no clu); clu's writer interface."""

  def __init__(self, logdir):
    self._writer = None
    if logdir is not None:
      from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
      self._writer = event_file_writer.EventFileWriter(logdir)

  def _add(self, step, summary):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    if self._writer is not None:
      self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_scalars(self, step, scalars):
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    logging.info('[%d] %s', step, ', '.join(f'{tag}={value:.6g}' for tag, value in sorted(scalars.items())))
    self._add(step, summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                                               for tag, value in scalars.items()]))

  def write_hparams(self, hparams):
    from tensorboard.plugins.hparams import summary_v2  # pylint: disable=g-import-not-at-top
    logging.info('hparams: %s', hparams)
    self._add(0, summary_v2.hparams_pb(hparams))

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def write_sweep_results(config, paths, table, fields, headline):
  """Writes a sweep's markdown table and its JSON (`fields`, the versions, the config and the files), then prints
  `headline`, the table and where the files are; returns the JSON's contents."""
  run_directory.write_bytes(run_directory.as_path(paths['table']), table)
  summary = {**fields, 'jax_version': jax.__version__, 'backend': jax.default_backend(),
             'config': json.loads(config.to_json_best_effort()), 'files': paths}
  run_directory.write_bytes(run_directory.as_path(paths['results']), json.dumps(summary, indent=1))
  print(f'{headline}\n{table}', flush=True)
  for key, path in paths.items():
    print(f'{key}: {path}', flush=True)
  return summary
