"""Metrics and progress: a thin wrapper over clu's metric writers, so the training loop never imports clu.

Scalars go to TensorBoard event files under `workdir/tensorboard` and to the log (clu's default writer). Only the
primary process writes event files; the others log; `run_directory.read_scalars` reads them back, and
`write_sweep_results` writes and prints a sweep's table and JSON.
`progress(step)` adds a line with steps/s and an ETA measured between two calls, so call it where the host has
synchronised with the device (at log steps, after fetching metrics) or the rate would measure dispatch, not
computation."""

import json
import os
import time

from absl import logging
from clu import metric_writers
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
    self.logdir = os.fspath(logdir)   # a URL stays one (clu writes through TensorFlow's file systems)
    self._writer = metric_writers.create_default_writer(
        self.logdir if is_primary else None, just_logging=not is_primary, asynchronous=True)
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
