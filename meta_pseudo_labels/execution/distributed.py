"""Multi-process start-up: one call, first thing in `main`, before anything touches a JAX backend.

Which cluster this process is part of is read from the environment, in this order:

1. `MPL_COORDINATOR_ADDRESS` (host:port of process 0), `MPL_NUM_PROCESSES`, `MPL_PROCESS_ID`: explicit, for GPU
   clusters without SLURM and for several CPU processes on one machine (tests, `launch/local.sh`). All three or
   none. `JAX_LOCAL_DEVICE_IDS` (read by JAX itself) restricts a process to some local GPUs.
2. SLURM (`srun` sets `SLURM_JOB_ID`, `SLURM_NTASKS`, `SLURM_PROCID`, ...): JAX's own SLURM detection picks the
   coordinator (first node of the step), the process count and id, and the local GPU of each task.
3. A Cloud TPU VM (libtpu installed and TPU devices present): `jax.distributed.initialize()` with no arguments;
   JAX reads the pod's workers from the TPU metadata. A single-host TPU VM is a pod of one.
4. None of these: a single process, nothing to initialise.

A dead peer ends the run in bounded time on every surviving process:

- A peer that dies (crash, OOM kill, preemption, `kill -9`) closes its connections: the survivors' next collective
  fails at once (gloo on CPU: "Connection closed by peer"; NCCL / ICI report their own transport errors).
  `exit_if_peer_lost` (called by `main`) recognises such an error, prints one line naming this process and what to
  do, and exits with `PEER_LOST_EXIT_CODE` (75, EX_TEMPFAIL: rerun to resume from the last checkpoint) through
  `os._exit`: JAX's exit handler would otherwise wait at a shutdown barrier the dead peer never reaches and then
  abort with a page of C++ stack.
- A peer that hangs without closing its connections (a stopped VM, a network partition) stops sending heartbeats:
  the coordinator declares it dead after `MPL_HEARTBEAT_TIMEOUT_SECONDS` (default 100 s, JAX's default) and JAX
  terminates every other process ("the JAX distributed service detected fatal errors ... another task died").
  A dead coordinator (process 0, which hosts the coordination service) ends the others at once the same way:
  their connection to the service closes. tests/test_multihost.py kills each of two processes mid-training.

`MPL_SHUTDOWN_TIMEOUT_SECONDS` (default 300 s) bounds the wait for the others at a normal exit and
`MPL_INITIALIZATION_TIMEOUT_SECONDS` (default 300 s) the wait for all processes to join at start.
"""

import dataclasses
import glob
import importlib.util
import os
import re
import sys
from typing import Mapping, Optional

import jax

from meta_pseudo_labels import errors

EXPLICIT_VARIABLES = ('MPL_COORDINATOR_ADDRESS', 'MPL_NUM_PROCESSES', 'MPL_PROCESS_ID')
SLURM_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
PEER_LOST_EXIT_CODE = 75   # EX_TEMPFAIL: not the user's fault; rerunning the same command resumes
# Fragments of the errors a collective or the coordination service raises when another process has gone away.
# Transport failures only: a library's name alone ('gloo', 'nccl') would also match its other errors (an NCCL
# out-of-memory), which must keep their own traceback rather than read as a lost peer.
PEER_LOST_SIGNS = ('closed by peer', 'reset by peer', 'broken pipe', 'heartbeat', 'unhealthy', 'task died',
                   'socket closed', 'connection refused', 'failed to connect', 'barrier failed',
                   'remote process exited', 'coordination service', 'unavailable:')
TIMEOUT_DEFAULTS = {
    'MPL_HEARTBEAT_TIMEOUT_SECONDS': 100,
    'MPL_SHUTDOWN_TIMEOUT_SECONDS': 300,
    'MPL_INITIALIZATION_TIMEOUT_SECONDS': 300,
}


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins the others: `kind` is 'explicit' | 'slurm' | 'tpu' | 'single'."""
  kind: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


def detect_cluster(environ: Mapping[str, str] = os.environ) -> Cluster:
  """Reads the environment (see the module docstring); raises ConfigError on a partial or malformed setting."""
  given = [name for name in EXPLICIT_VARIABLES if environ.get(name)]
  if given:
    missing = [name for name in EXPLICIT_VARIABLES if not environ.get(name)]
    if missing:
      raise errors.ConfigError(
          f'{", ".join(missing)}: not set, but {", ".join(given)} is; set all of {", ".join(EXPLICIT_VARIABLES)} '
          'for a multi-process run, or none for a single process')
    num_processes = _positive_int(environ, 'MPL_NUM_PROCESSES')
    process_id = _int(environ, 'MPL_PROCESS_ID')
    if not 0 <= process_id < num_processes:
      raise errors.ConfigError(
          f'MPL_PROCESS_ID: {process_id} is not in [0, MPL_NUM_PROCESSES={num_processes}); number the processes '
          f'0 to {num_processes - 1}')
    address = environ['MPL_COORDINATOR_ADDRESS']
    if ':' not in address:
      raise errors.ConfigError(
          f'MPL_COORDINATOR_ADDRESS: {address!r} has no port; use host:port of process 0, e.g. 10.0.0.1:12345')
    return Cluster('explicit', address, num_processes, process_id)
  if all(name in environ for name in SLURM_VARIABLES) and _positive_int(environ, 'SLURM_NTASKS') > 1:
    return Cluster('slurm')
  if _on_cloud_tpu_vm():
    return Cluster('tpu')
  return Cluster('single')


def _on_cloud_tpu_vm() -> bool:
  """libtpu installed and TPU chips visible (/dev/accel* on v2-v5e, VFIO groups on v5p and v6e)."""
  if importlib.util.find_spec('libtpu') is None:
    return False
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def _int(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ[name])
  except ValueError:
    raise errors.ConfigError(f'{name}: {environ[name]!r} is not an integer') from None


def _positive_int(environ: Mapping[str, str], name: str) -> int:
  value = _int(environ, name)
  if value < 1:
    raise errors.ConfigError(f'{name}: {value} must be a positive integer')
  return value


def timeouts(environ: Mapping[str, str] = os.environ) -> dict:
  """`jax.distributed.initialize` timeout arguments, from `MPL_*_TIMEOUT_SECONDS` or their defaults."""
  values = {name: _positive_int(environ, name) if environ.get(name) else default
            for name, default in TIMEOUT_DEFAULTS.items()}
  return dict(heartbeat_timeout_seconds=values['MPL_HEARTBEAT_TIMEOUT_SECONDS'],
              shutdown_timeout_seconds=values['MPL_SHUTDOWN_TIMEOUT_SECONDS'],
              initialization_timeout=values['MPL_INITIALIZATION_TIMEOUT_SECONDS'])


def initialize(environ: Mapping[str, str] = os.environ) -> Cluster:
  """Joins this process to its cluster (idempotent); returns what was detected.

  CPU processes exchange collectives through gloo (JAX's CPU backend has no cross-process collectives without
  it); the setting only affects the CPU backend, so it is harmless on GPU and TPU hosts.
  """
  cluster = detect_cluster(environ)
  if cluster.kind == 'single' or jax.distributed.is_initialized():
    return cluster
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = timeouts(environ)
  if cluster.kind == 'explicit':
    jax.distributed.initialize(cluster.coordinator_address, num_processes=cluster.num_processes,
                               process_id=cluster.process_id, **kwargs)
  else:  # 'slurm' and 'tpu': JAX detects the coordinator, the process count and id itself.
    jax.distributed.initialize(**kwargs)
  return cluster


def lost_peer_message(error: BaseException) -> Optional[str]:
  """One line for an error caused by another process going away, or None if `error` is anything else.

  Only in a multi-process run: a single process has no peers, and its errors are its own.
  """
  if not jax.distributed.is_initialized() or jax.process_count() < 2:
    return None
  text = str(error)
  lowered = text.lower()
  sign = next((s for s in PEER_LOST_SIGNS if s in lowered), None)
  if sign is None:
    return None
  # XLA nests the cause under one 'Error dispatching computation: ' per pending computation; keep the cause.
  detail = re.sub(r'^(INTERNAL: )?(Error dispatching computation: )+', '', text.strip().splitlines()[0])
  if len(detail) > 160:
    detail = detail[:157] + '...'
  return (f'process {jax.process_index()} of {jax.process_count()}: lost contact with another process ({detail}); '
          'it crashed, was killed or was preempted: see its log for why, then rerun the same command on every '
          'process to resume from the last checkpoint')


def exit_if_peer_lost(error: BaseException) -> None:
  """If `error` means a peer is gone: print one line and exit now with PEER_LOST_EXIT_CODE; else return.

  `os._exit` skips JAX's atexit shutdown, which would block at a barrier the dead process never reaches (up to
  the shutdown timeout) and then abort the interpreter; there is nothing left to save (the last checkpoint was
  committed by all processes together, and no process can complete a new one without the dead peer).
  """
  message = lost_peer_message(error)
  if message is None:
    return
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(PEER_LOST_EXIT_CODE)  # pylint: disable=protected-access
