"""Two local JAX processes train through `main` exactly like one process with the same global batch.

What a user runs: `launch/local.sh` with NUM_PROCESSES=2 starts two `python -m meta_pseudo_labels.main` processes
that meet through `distributed.initialize()` (MPL_COORDINATOR_ADDRESS on 127.0.0.1, gloo collectives), each with
two CPU devices and each reading only its half of every batch. The reference is one process with four CPU
devices: the same mesh shape (data=4) and the same global batches. Checked:

- the final states of both phases (MPL, then finetuning) agree: every leaf of teacher, student, optimizer states
  and EMA within 1e-6 + 1e-6 |x| (float32; the same programs on the same data, gloo's all-reduce may sum in another
  order), restored in this single test process, re-sharded onto its 8 devices (FSDP over all 8);
- the same `main` command run as one process on the two-process workdir resumes from those checkpoints (nothing
  left to train) and reports the same test accuracy.

The run is TwoMoon's MLP through the `train` experiment (`experiment=train`), shrunk to 4 MPL and 2 finetuning steps.

Dead peer (issue 7): two `main` processes started directly (as a cluster's scheduler does; `local.sh` would stop
the survivor itself), one killed with SIGKILL mid-training. The survivor must exit non-zero within
DEAD_PEER_BOUND_S of the kill, saying why: when a worker dies, the coordinator's next collective fails and `main`
prints one line (`distributed.exit_if_peer_lost`, exit code 75); when the coordinator dies, JAX's coordination
client terminates the worker ("... another task died").
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from meta_pseudo_labels.execution import distributed
from meta_pseudo_labels.execution import sharding
from meta_pseudo_labels.rundir import checkpoint

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]   # ~50 s of CPU: seven processes start

REPO = pathlib.Path(__file__).resolve().parent.parent
LOCAL_SH = REPO / 'launch' / 'local.sh'
TOLERANCE = 1e-6
DEAD_PEER_BOUND_S = 60       # the survivor's exit, from the kill; the heartbeat timeout below is 10 s
START_TIMEOUT_S = 300        # both processes importing, joining and compiling on a loaded 2-core machine
PROGRESS = re.compile(r'step \d+/\d+ \(')   # reporting.Reporter.progress
OVERRIDES = ['--config.experiment=train', '--config.num_train_steps=4', '--config.finetune.num_steps=2',
             '--config.batch_size=8', '--config.dataset.num_labeled=8', '--config.checkpoint_every_steps=2',
             '--config.log_every_steps=2']


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_local_sh(workdir, num_processes, devices_per_process):
  env = dict(os.environ, CONFIG='configs/two_moons.py', WORKDIR=str(workdir), NUM_PROCESSES=str(num_processes),
             DEVICES_PER_PROCESS=str(devices_per_process), PORT=str(free_port()), PYTHON=sys.executable,
             MPL_HEARTBEAT_TIMEOUT_SECONDS='30', TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen(['bash', str(LOCAL_SH), *OVERRIDES], env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(process, workdir):
  output, _ = process.communicate(timeout=600)
  logs = ''.join(path.read_text() for path in sorted((workdir / 'logs').glob('*.log')))
  assert process.returncode == 0, output[-3000:] + logs[-3000:]
  return output


@pytest.fixture(scope='module')
def launched(tmp_path_factory):
  """Everything at once, so that the processes' start-up (imports, joining, compiling) overlaps: the two-process
  run and the one-process reference through local.sh, and the two dead-peer cases."""
  two, one = tmp_path_factory.mktemp('two_processes'), tmp_path_factory.mktemp('one_process')
  started = [(start_local_sh(two, 2, 2), two), (start_local_sh(one, 1, 4), one)]
  try:
    cases = run_dead_peer_cases(tmp_path_factory)
    outputs = [finish(process, workdir) for process, workdir in started]
  finally:
    for process, _ in started:
      if process.poll() is None:
        process.kill()
        process.wait()
  return {'two': (two, outputs[0]), 'one': (one, outputs[1]), 'dead_peer': cases}


@pytest.fixture(scope='module')
def runs(launched):
  return launched


@pytest.fixture(scope='module')
def dead_peer_cases(launched):
  return launched['dead_peer']


def restore_on_this_process(phase_dir):
  """The newest checkpoint of a phase, through the project's Checkpointer, sharded over this process's devices."""
  mesh = sharding.create_mesh(type('Mesh', (), dict(data=1, fsdp=-1, spatial=1))())
  step = max(int(p.name) for p in phase_dir.iterdir() if p.name.isdigit())
  metadata = ocp.StandardCheckpointer().metadata(phase_dir / str(step) / 'state').item_metadata
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata.tree)
  shardings = sharding.state_shardings(abstract, mesh, fsdp_min_size=0)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  ckpt = checkpoint.Checkpointer(phase_dir, keep=3, async_save=False)
  try:
    state, extra, restored_step = ckpt.restore(None, target)
  finally:
    ckpt.close()
  assert restored_step == step
  return state, extra


def test_two_processes_write_one_run(runs):
  two, output = runs['two']
  assert 'mesh {\'data\': 4' in output or 'data=4' in output or (two / 'results.json').exists()
  # Only process 0 writes results and events; process 1 logged its own start-up.
  assert (two / 'results.json').exists()
  assert 'JAX process 1/2' in (two / 'logs' / 'process_1.log').read_text()


@pytest.mark.parametrize('phase', ['mpl', 'finetune'])
def test_two_processes_equal_one_process(runs, phase):
  two_state, two_extra = restore_on_this_process(runs['two'][0] / 'checkpoints' / phase)
  one_state, one_extra = restore_on_this_process(runs['one'][0] / 'checkpoints' / phase)
  assert two_extra['step'] == one_extra['step'] > 0
  two_leaves = jax.tree_util.tree_leaves_with_path(two_state)
  assert len(two_leaves) == len(jax.tree.leaves(one_state)) > 0
  for (path, a), b in zip(two_leaves, jax.tree.leaves(one_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOLERANCE, atol=TOLERANCE,
                               err_msg=jax.tree_util.keystr(path))
  # The restored arrays really are spread over this process's 8 devices (FSDP over 8), not gathered on one.
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(two_state))


def test_one_process_resumes_the_two_process_run(runs):
  two, _ = runs['two']
  before = json.loads((two / 'results.json').read_text())['final']
  output = finish(start_local_sh(two, 1, 4), two)
  assert 'resumed from' in output
  assert 'training steps' not in output   # both phases were complete: restored, nothing trained
  after = json.loads((two / 'results.json').read_text())['final']
  assert after['test'].keys() == before['test'].keys()
  for model, values in before['test'].items():
    assert after['test'][model]['top1'] == pytest.approx(values['top1'])
    assert after['test'][model]['loss'] == pytest.approx(values['loss'], rel=1e-5)


def start_main_processes(workdir, log_dir):
  """Two `main` processes training TwoMoon for (practically) ever, as a scheduler starts them; logs to files."""
  port = free_port()
  processes = []
  for process_id in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1',
               MPL_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', MPL_NUM_PROCESSES='2', MPL_PROCESS_ID=str(process_id),
               MPL_HEARTBEAT_TIMEOUT_SECONDS='10', MPL_SHUTDOWN_TIMEOUT_SECONDS='10', TF_CPP_MIN_LOG_LEVEL='2')
    log = open(log_dir / f'process_{process_id}.log', 'w')
    processes.append(subprocess.Popen(
        [sys.executable, '-m', 'meta_pseudo_labels.main', '--config=configs/two_moons.py', f'--workdir={workdir}',
         '--config.experiment=train', '--config.num_train_steps=100000000', '--config.batch_size=8',
         '--config.dataset.num_labeled=8', '--config.log_every_steps=20', '--config.eval_every_steps=100000000',
         '--config.checkpoint_every_steps=100000000'],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    log.close()
  return processes


class DeadPeerCase:
  """Two `main` processes; once both train, `victim` is killed and the survivor's exit is timed."""

  def __init__(self, directory, victim):
    self.victim, self.logs = victim, [directory / f'process_{i}.log' for i in range(2)]
    self.processes = start_main_processes(directory / 'workdir', directory)
    self.killed_at = self.code = self.elapsed = None

  def output(self, process_id):
    return self.logs[process_id].read_text()

  def step(self):
    """Advances the case by one poll; returns True once it is over."""
    survivor = self.processes[1 - self.victim]
    if self.killed_at is None:
      # Process 0 logs progress only after steps whose collectives process 1 took part in: both have compiled and
      # are training, the survivor is in (or between) collectives.
      if PROGRESS.search(self.output(0)):
        self.processes[self.victim].kill()
        self.killed_at = time.monotonic()
      elif any(p.poll() is not None for p in self.processes):
        pytest.fail('a process ended before training: ' + ''.join(self.output(i)[-2000:] for i in range(2)))
      return False
    if survivor.poll() is not None:
      self.code, self.elapsed = survivor.returncode, time.monotonic() - self.killed_at
      return True
    return time.monotonic() - self.killed_at > DEAD_PEER_BOUND_S

  def stop(self):
    for p in self.processes:
      if p.poll() is None:
        p.kill()
      p.wait()


def run_dead_peer_cases(tmp_path_factory):
  """Both cases at once (a dead worker, a dead coordinator); returns them once each survivor exited or timed out."""
  cases = {victim: DeadPeerCase(tmp_path_factory.mktemp(f'dead_{victim}'), victim) for victim in (1, 0)}
  deadline = time.monotonic() + START_TIMEOUT_S + DEAD_PEER_BOUND_S
  try:
    pending = set(cases)
    while pending and time.monotonic() < deadline:
      pending = {victim for victim in pending if not cases[victim].step()}
      time.sleep(0.2)
    assert not pending, f'cases {pending} did not reach training within {START_TIMEOUT_S} s'
  finally:
    for case in cases.values():
      case.stop()
  return cases


@pytest.mark.parametrize('victim', [1, 0], ids=['worker_killed', 'coordinator_killed'])
def test_dead_peer_stops_the_survivor_in_bounded_time(dead_peer_cases, victim):
  case = dead_peer_cases[victim]
  output = case.output(1 - victim)
  assert case.code is not None, f'process {1 - victim} still running {DEAD_PEER_BOUND_S} s after its peer was killed'
  assert case.elapsed < DEAD_PEER_BOUND_S and case.code != 0, output[-3000:]
  if victim == 1:   # the coordinator's collective fails: one line from main, exit code 75
    assert case.code == distributed.PEER_LOST_EXIT_CODE, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith('error: process 0 of 2: lost contact with another process'), last
    assert 'rerun the same command' in last and 'Traceback' not in output
  else:             # the coordination service is gone: JAX ends the worker, naming the cause
    assert 'another task died' in output or 'lost contact with another process' in output, output[-3000:]
