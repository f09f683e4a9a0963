"""The training program: phases, logging, evaluation cadence, checkpoints, divergence handling, results.json.

`train_and_evaluate(config, workdir)` runs, by `config.method`:
- 'mpl': the MPL phase (teacher and student, `num_train_steps`, Pham et al. Sec. 2-3), then the student's
  finetuning on labeled data alone (`finetune.num_steps`, Sec. 3.2). With `mpl.teacher='reduced'` (Reduced MPL,
  App. E) the teacher is T_R on a trained teacher's stored targets (`reduced.targets_dir`, joined to the unlabeled
  batches by example id: trained/teacher_targets.py); the rest is the same. Finetuning starts from the EMA student, the
  network the MPL phase evaluates and selects (App. C: the EMA student is the one reported), with a fresh optimizer.
- 'supervised' (labeled batches only) and 'uda' (the teacher's supervised + UDA loss alone): one phase of
  `mpl.supervised_step` with the teacher's optimizer.
Then every model is evaluated on the validation split (held out of train; model selection never sees test) and the
test split, and `workdir/results.json` is written.

Reliability, by design:
- Resume is bitwise: each phase checkpoints its whole state (parameters, BatchNorm statistics, optimizer and
  schedule counters, EMA, MPL baseline) under `workdir/checkpoints/<phase>`; the batches of step s are a pure
  function of (seed, s) and the step rng is `fold_in(rng, step)` inside the steps (the views too, made inside the
  jitted step by `pipeline.with_views`), so restarting at the saved step replays exactly what an uninterrupted run
  computes.
- The host waits for the device only at sync points (log, eval and checkpoint steps, the phase end, a preemption):
  metrics are summed on the device by the jitted step and fetched there, one transfer per sync.
- Divergence guard (built into the jitted step by `step_builder.py`): every step computes whether all its metrics
  (losses and gradient norms) and its new state are finite. `on_nonfinite='skip'` discards a non-finite step's
  update inside the jitted step (the state keeps its previous values, only the step counter moves on; skips are
  counted). 'stop' raises a TrainingError naming the first non-finite step and term at the next sync point.
  Every save is preceded by a sync, so no checkpoint ever holds a diverged state and the last good one stays
  intact.
- SIGTERM / preemption: the loop saves at the next step boundary (on every host at the same step) and raises
  `errors.Preempted`; rerunning the same command resumes.
"""

import collections
import contextlib
import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from meta_pseudo_labels import errors
from meta_pseudo_labels.data import input_pipeline
from meta_pseudo_labels.execution import sharding
from meta_pseudo_labels.execution import step_builder
from meta_pseudo_labels.execution import workload
from meta_pseudo_labels.method import mpl
from meta_pseudo_labels.method import train_state
from meta_pseudo_labels.run import config_validation
from meta_pseudo_labels.run import evaluation
from meta_pseudo_labels.rundir import checkpoint
from meta_pseudo_labels.rundir import reporting
from meta_pseudo_labels.rundir import run_directory
from meta_pseudo_labels.rundir import run_report
from meta_pseudo_labels.trained import networks
from meta_pseudo_labels.trained import teacher_targets
from meta_pseudo_labels.trained import warm_start

# Test-only fault injection (tests/test_reliability.py): `MPL_INJECT_FAULT=<kind>@<phase>:<step>` acts once loop
# step <step> of <phase> is done, after any checkpoint save of that step has started:
#   kill        SIGKILL at once (a crash; a save of this step may be left half-written),
#   kill_saved  wait until pending saves are complete, then SIGKILL (a crash some time after the last save),
#   term        SIGTERM (a preemption notice, handled exactly like one sent from outside).
# It never touches the computation, so the run it interrupts is the run a user gets; the variable is read once per
# phase, and a phase it does not name calls a no-op.
FAULT_ENV = 'MPL_INJECT_FAULT'
_FAULT_KINDS = ('kill', 'kill_saved', 'term')


def _no_fault(step, ckpt):
  del step, ckpt


def _fault_point(phase_name):
  """The fault hook of `phase_name`, `(step, ckpt) -> None`, called after every loop step (see FAULT_ENV)."""
  fault = os.environ.get(FAULT_ENV, '')
  kind, _, where = fault.partition('@')
  name, _, fault_step = where.partition(':')
  if kind not in _FAULT_KINDS or name != phase_name:
    return _no_fault

  def inject(step, ckpt):
    if str(step) != fault_step:
      return
    if kind == 'kill_saved':
      ckpt.wait()
    logging.warning('%s=%s: sending %s to this process', FAULT_ENV, fault, 'SIGTERM' if kind == 'term' else 'SIGKILL')
    logging.flush()
    os.kill(os.getpid(), signal.SIGTERM if kind == 'term' else signal.SIGKILL)
  return inject


@dataclasses.dataclass(frozen=True)
class Phase:
  """One stretch of training with its own state type, step function, data and checkpoint directory."""
  name: str                      # one of networks.PHASES: checkpoint sub-directory, log prefix
  num_steps: int
  global_offset: int             # where the phase starts on the run's step axis (TensorBoard, progress)
  init: Callable[[Any, Any], Any]        # (rng, source) -> state; pure (jitted with out_shardings); source: the
                                         # networks it starts from (warm_start.load's, the EMA student) or None
  step: Callable[[Any, Any, Any], Any]   # (state, batch, rng) -> (state, metrics); pure
  batches: Callable[[int], Any]          # start_step -> iterator of host-local batches
  eval_models: Callable[[Any], dict]     # state -> {name: (apply_fn, variables)}


# ---- helpers ----------------------------------------------------------------------------------------------------


def _hparams(config_dict):
  """The config as TensorBoard hyper-parameters: 'a.b.c' keys, scalars kept, anything else as its text."""
  return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
          for key, value in traverse_util.flatten_dict(config_dict, sep='.').items()}


# ---- phases -----------------------------------------------------------------------------------------------------


def _phases(config, pipeline):
  """The phases of `config.method` (see the module docstring), on one global step axis."""
  input_shape = pipeline.input_shape
  teacher_model, student_model = workload.model_pair(config)
  steps = config.num_train_steps

  if config.method == networks.MPL:
    hparams = mpl.MplHparams.from_config(config)
    optimizers = dict(teacher_optimizer=config.teacher_optimizer, student_optimizer=config.student_optimizer,
                      total_steps=steps)
    make_state = lambda rng: train_state.create_mpl_state(rng, teacher_model, student_model, input_shape,
                                                          **optimizers)
    batches = pipeline.mpl_batches
    apply_fns = lambda s: {'model': s.teacher.apply_fn, 'student_model': s.student.apply_fn}
    if hparams.teacher == 'reduced':   # T_R on the stored targets, joined by example id; it reads no image
      targets = teacher_targets.load(config.reduced.targets_dir, pool_ids=pipeline.unlabeled_ids(),
                                     num_classes=config.dataset.num_classes, top_k=config.reduced.top_k)
      make_state = lambda rng: train_state.create_reduced_mpl_state(
          rng, config.reduced, config.dataset.num_classes, student_model, input_shape, **optimizers)
      batches = lambda start: teacher_targets.joined_batches(pipeline.mpl_batches(start, with_unlabeled_index=True),
                                                             targets)
      apply_fns = lambda s: {'student_model': s.student.apply_fn}   # T_R is no network: nothing to evaluate
    main_phase = Phase(
        name=networks.MPL, num_steps=steps, global_offset=0,
        init=lambda rng, initial: warm_start.apply(make_state(rng), initial),
        step=pipeline.with_views(functools.partial(mpl.mpl_step, hparams=hparams), config.dataset.labeled_view),
        batches=batches,
        eval_models=_eval_models(networks.MPL, apply_fns, reduced_teacher=hparams.teacher == 'reduced'))
  else:
    hparams = mpl.SupervisedHparams.from_config(config)
    main_phase = Phase(
        name=config.method, num_steps=steps, global_offset=0,
        init=lambda rng, initial: warm_start.apply(train_state.create_supervised_state(
            rng, teacher_model, config.teacher_optimizer, input_shape, total_steps=steps,
            name='teacher_optimizer'), initial),
        step=pipeline.with_views(functools.partial(mpl.supervised_step, hparams=hparams),
                                 config.dataset.labeled_view),
        batches=(pipeline.mpl_batches if config.method == 'uda'
                 else functools.partial(_labeled_batches, pipeline, config.batch_size)),
        eval_models=_eval_models(config.method, lambda s: {'model': s.network.apply_fn}))
  if config.method != networks.MPL or not config.finetune.num_steps:
    return main_phase, None

  finetune_steps = config.finetune.num_steps

  def finetune_init(rng, ema_variables):
    del rng  # starts from the EMA student, nothing random
    network = train_state.create_network_state(ema_variables, student_model.apply, config.finetune.optimizer,
                                               finetune_steps, 'finetune.optimizer')
    return train_state.SupervisedState(step=jnp.zeros((), jnp.int32), network=network, ema=None)

  finetune_phase = Phase(
      name=networks.FINETUNE, num_steps=finetune_steps, global_offset=steps, init=finetune_init,
      step=pipeline.with_views(functools.partial(mpl.finetune_step,
                                                 hparams=mpl.SupervisedHparams.for_finetune(config))),
      batches=functools.partial(_labeled_batches, pipeline, config.finetune.batch_size),
      eval_models=_eval_models(networks.FINETUNE, lambda s: {'student_model': s.network.apply_fn}))
  return main_phase, finetune_phase


def _eval_models(phase_name, apply_fns, reduced_teacher=False):
  """state -> {network: (apply_fn, variables)} of the networks `phase_name` trains (networks.py's table), where
  `apply_fns(state)` maps an architecture field ('model', 'student_model') to the state's apply function."""
  return lambda s: {network.name: (apply_fns(s)[network.architecture], network.variables(s))
                    for network in networks.of_phase(phase_name, reduced_teacher)}


def _labeled_batches(pipeline, batch_size, start_step):
  return pipeline.labeled_batches(start_step, batch_size)


class _Run:
  """State shared by the phases of one run: mesh, reporter, evaluator, bookkeeping carried in checkpoints."""

  def __init__(self, config, rundir, pipeline, mesh, total_steps):
    self.config = config
    self.rundir = rundir
    self.pipeline = pipeline
    self.mesh = mesh
    self.is_primary = jax.process_index() == 0
    self.reporter = reporting.Reporter(rundir.tensorboard, total_steps, self.is_primary)
    self.evaluator = evaluation.Evaluator(pipeline, mesh)
    self.has_validation = pipeline.split_sizes.get('validation', 0) > 0
    self.rng = jax.random.key(config.seed)
    self.nonfinite_skipped = 0
    self.previous_wall_time = 0.0      # seconds spent by earlier (interrupted) processes of this run
    self.start_time = time.monotonic()
    # Host wall seconds per part of the loop, per phase (results.json 'loop_seconds'; `benchmark --end_to_end`).
    self.loop_seconds = collections.defaultdict(lambda: collections.defaultdict(float))

  @contextlib.contextmanager
  def timed(self, phase_name, part):
    """Adds the wall time of the block to `loop_seconds[phase_name][part]`.

    Dispatch is asynchronous: the device's step time shows where the host waits for it, in 'sync' (the metric
    fetch) and, when the host runs ahead, in the next 'step' dispatch.
    """
    start = time.perf_counter()
    try:
      yield
    finally:
      self.loop_seconds[phase_name][part] += time.perf_counter() - start

  def wall_time(self):
    return self.previous_wall_time + time.monotonic() - self.start_time

  def _sync(self, phase, step, accumulator, metric_names, last_saved):
    """Fetches the on-device metric sums (the only regular host transfer), applies the guard, writes scalars.

    `last_saved`: the newest step of this phase saved so far (None: none), named by the divergence error.
    """
    values = jax.device_get(accumulator)
    global_step = phase.global_offset + step
    nonfinite = int(values['nonfinite_steps'])
    if nonfinite:
      bad_step = int(values['first_bad_step'])
      terms = [name for name, bad in zip(step_builder.guard_terms(metric_names), values['first_bad_terms']) if bad]
      if self.config.on_nonfinite == 'stop':
        kept = (f'checkpoint {last_saved} in {self.rundir.checkpoints(phase.name)} is the last good one and is '
                'kept' if last_saved is not None else 'no checkpoint of this phase was saved yet')
        raise errors.TrainingError(
            f'{phase.name} step {bad_step}: non-finite {", ".join(terms)}; stopped, {kept}; lower the learning '
            'rate, or set --config.on_nonfinite=skip to skip such steps')
      self.nonfinite_skipped += nonfinite
      logging.warning('%s: skipped %d non-finite step(s), first at step %d (%s); %d skipped in total',
                      phase.name, nonfinite, bad_step, ', '.join(terms), self.nonfinite_skipped)
    finite_steps = int(values['finite_steps'])
    if finite_steps:
      # mpl_step's metrics are namespaced (teacher/, student/, mpl/); supervised_step's 'train/' names the phase.
      scalars = {(f'{phase.name}/{name[len("train/"):]}' if name.startswith('train/') else name):
                 float(total) / finite_steps for name, total in values['sums'].items()}
      scalars['guard/nonfinite_skipped'] = self.nonfinite_skipped
      self.reporter.scalars(global_step, scalars)

  def evaluate(self, split, named_models):
    return self.evaluator.evaluate(split, named_models)

  def run_phase(self, phase, source=None):
    """Trains `phase` to its end (resuming from its newest checkpoint) and returns its final state."""
    config = self.config
    phase_index = networks.PHASES.index(phase.name)
    init_rng = jax.random.fold_in(self.rng, 2 * phase_index)
    step_rng = jax.random.fold_in(self.rng, 2 * phase_index + 1)

    abstract_state = jax.eval_shape(phase.init, init_rng, source)
    state_shardings = sharding.state_shardings(abstract_state, self.mesh, config.mesh.fsdp_min_size)
    ckpt = checkpoint.Checkpointer(self.rundir.checkpoints(phase.name), keep=config.keep_checkpoints)
    try:
      restored = ckpt.restore(None, sharding.with_shardings(abstract_state, state_shardings))
      if restored is None:
        state = jax.jit(phase.init, out_shardings=state_shardings)(init_rng, source)
        start = 0
      else:
        state, extra, start = restored
        self.nonfinite_skipped = int(extra.get('nonfinite_skipped', 0))
        self.previous_wall_time = float(extra.get('wall_time', 0.0))
        self.start_time = time.monotonic()
        logging.info('%s: resumed from %s/%d', phase.name, ckpt.directory, start)
      if start < phase.num_steps:
        state = self._train(phase, state, state_shardings, start, step_rng, ckpt)
      with self.timed(phase.name, 'checkpoint'):
        ckpt.wait()
    finally:
      ckpt.close()
    return state

  def _dispatch_end(self, phase, step):
    """The last step of the dispatch that starts after `step`: the next multiple of `steps_per_dispatch`, or an
    earlier sync point (a log, evaluation or checkpoint step, or the phase's end).

    A function of the step numbers alone, so an interrupted run, resumed from any checkpoint (every save is at a
    dispatch's end), groups the remaining steps exactly as the uninterrupted run does: resume stays bitwise.
    """
    config = self.config
    every = [config.log_every_steps, config.checkpoint_every_steps]
    if self.has_validation:
      every.append(config.eval_every_steps)
    per_dispatch = config.steps_per_dispatch
    end = min(phase.num_steps, (step // per_dispatch + 1) * per_dispatch)
    return min([end] + [(step // n + 1) * n for n in every])

  def _train(self, phase, state, state_shardings, start, step_rng, ckpt):
    """Steps `start + 1 .. phase.num_steps`, up to `config.steps_per_dispatch` of them per call of the jitted
    step (`_dispatch_end`); a preemption notice is acted on at the end of a dispatch."""
    config = self.config
    timed = functools.partial(self.timed, phase.name)
    batches = phase.batches(start)
    with timed('input'):
      first_batch = next(batches)
    train_step = step_builder.build_train_step(phase.step, state, state_shardings,
                                               sharding.global_batch_shapes(first_batch), self.mesh,
                                               skip_nonfinite=config.on_nonfinite == 'skip')
    accumulator = train_step.new_accumulator()
    per_dispatch = config.steps_per_dispatch

    last_saved = start or None   # the checkpoint this run resumed from
    logging.info('%s: training steps %d..%d, up to %d per dispatch', phase.name, start + 1, phase.num_steps,
                 per_dispatch)
    self.reporter.restart_clock(phase.global_offset + start)
    pending = [first_batch]   # host batches drawn and not yet run
    fault_point = _fault_point(phase.name)
    step = start
    while step < phase.num_steps:
      end = self._dispatch_end(phase, step)
      with timed('input'):
        while len(pending) < end - step:
          pending.append(next(batches))
      host_batches, pending = pending, []
      if per_dispatch == 1:
        with timed('transfer'):
          batch = sharding.make_global_batch(host_batches[0], self.mesh)
        with timed('compile' if step == start else 'step'):   # asynchronous: only the first call waits (compiles)
          state, accumulator = train_step.step(state, accumulator, batch, step_rng)
      else:   # always k rows (one executable); the rows past this dispatch's steps repeat its last batch, unused
        host_batches += host_batches[-1:] * (per_dispatch - len(host_batches))
        with timed('transfer'):
          stacked = sharding.make_global_stacked_batch(jax.tree.map(lambda *x: np.stack(x), *host_batches),
                                                       self.mesh)
        with timed('compile' if step == start else 'step'):
          state, accumulator = train_step.multi_step(state, accumulator, stacked, np.int32(end - step), step_rng)
      for inner in range(step + 1, end):
        fault_point(inner, ckpt)
      step = end

      preempted = ckpt.reached_preemption(step)
      is_log = step % config.log_every_steps == 0
      is_eval = step % config.eval_every_steps == 0 and self.has_validation
      is_save = step % config.checkpoint_every_steps == 0 or step == phase.num_steps or preempted
      if not (is_log or is_eval or is_save):
        fault_point(step, ckpt)
        continue
      with timed('sync'):
        self._sync(phase, step, accumulator, train_step.metric_names, last_saved)   # raises on divergence first
        accumulator = train_step.new_accumulator()
      global_step = phase.global_offset + step
      if is_log:
        with timed('logging'):
          self.reporter.progress(global_step)
      if is_save:
        with timed('checkpoint'):
          ckpt.save(step, state, {'phase': phase.name, 'step': step, 'nonfinite_skipped': self.nonfinite_skipped,
                                  'wall_time': self.wall_time()})
        last_saved = step
      if is_eval:
        with timed('evaluation'):
          results = self.evaluate('validation', phase.eval_models(state))
        self.reporter.scalars(global_step, {f'validation/{model}/{metric}': value
                                            for model, values in results.items()
                                            for metric, value in values.items()
                                            if metric in evaluation.SCALAR_METRICS})
      fault_point(step, ckpt)
      if preempted:
        ckpt.wait()
        self.reporter.flush()
        raise errors.Preempted(f'{phase.name} step {step}: preemption notice received; checkpoint saved in '
                               f'{ckpt.directory}; rerun the same command to resume')
      self.reporter.restart_clock(global_step)
    return state


# ---- entry point ------------------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir):
  """Trains and evaluates `config` in `workdir` (resuming from its checkpoints); returns the results dict."""
  config_validation.validate(config, jax.device_count())
  rundir = run_directory.RunDirectory(workdir).prepare(jax.process_index())
  config_dict = config.to_dict()
  changed = rundir.check_compatible(config_dict)
  if changed:
    logging.warning('Resuming %s with changed fields %s', workdir, changed)
  mesh = sharding.create_mesh(config.mesh)
  pipeline = input_pipeline.create(config.dataset, input_pipeline.BatchSpec.from_config(config), seed=config.seed,
                                   process_index=jax.process_index(), process_count=jax.process_count())
  main_phase, finetune_phase = _phases(config, pipeline)
  _check_phase_checkpoints(rundir, [phase for phase in (main_phase, finetune_phase) if phase])
  initial_networks = warm_start.load(config, main_phase.init, pipeline.num_classes, rundir, main_phase.name)
  if jax.process_index() == 0:
    rundir.write_config(config_dict)
    rundir.write_inputs(pipeline.input_spec.to_dict())

  total_steps = main_phase.num_steps + (finetune_phase.num_steps if finetune_phase else 0)
  run = _Run(config, rundir, pipeline, mesh, total_steps)
  run.reporter.hparams(_hparams(config_dict))
  logging.info('Split sizes: %s; mesh %s', pipeline.split_sizes, dict(mesh.shape))

  main_state = run.run_phase(main_phase, source=initial_networks)
  final_models = main_phase.eval_models(main_state)
  if finetune_phase is not None:
    finetune_state = run.run_phase(finetune_phase, source=main_state.student_ema)
    final_models.update(finetune_phase.eval_models(finetune_state))

  splits = (['validation'] if run.has_validation else []) + ['test']
  with run.timed('final', 'evaluation'):
    final = {split: run.evaluate(split, final_models) for split in splits}
  run.reporter.scalars(total_steps, {f'final/{split}/{model}/{metric}': value
                                     for split, per_model in final.items() for model, values in per_model.items()
                                     for metric, value in values.items() if metric in evaluation.SCALAR_METRICS})
  run.reporter.close()
  results = {
      'final': {split: evaluation.for_json(per_model) for split, per_model in final.items()},
      'steps': {phase.name: phase.num_steps for phase in (main_phase, finetune_phase) if phase},
      'nonfinite_skipped': run.nonfinite_skipped,
      'wall_time_s': run.wall_time(),
      'loop_seconds': {phase: dict(parts) for phase, parts in run.loop_seconds.items()},
      'config': config_dict,
  }
  if jax.process_index() == 0:
    rundir.write_results(results)
    run_report.write(rundir, final)
    _print_summary(final, rundir)
  return results


def _check_phase_checkpoints(rundir, phases):
  """Refuses, before any training, checkpoints that do not continue this config's run.

  A phase's checkpoint past the phase's end (the run was shortened) would be taken as its result; a later phase's
  checkpoints (finetuning) continue the state the earlier phase ended with when they were written, so they are valid
  only if that phase's newest checkpoint is its last step now. Otherwise (a run extended after it reached
  finetuning) they would finetune a student this run no longer has. Nothing is deleted: the user chooses.
  """
  latest = {phase.name: checkpoint.latest_step(rundir.checkpoints(phase.name)) for phase in phases}
  for phase in phases:
    if latest[phase.name] is not None and latest[phase.name] > phase.num_steps:
      raise errors.CheckpointError(
          f'{rundir.checkpoints(phase.name)}/{latest[phase.name]} is past the end of this config\'s {phase.name} '
          f'phase ({phase.num_steps} steps): resume with the config in {rundir / run_directory.CONFIG}, or use a '
          'new --workdir')
  for earlier, later in zip(phases, phases[1:]):
    if latest[later.name] is not None and latest[earlier.name] != earlier.num_steps:
      raise errors.CheckpointError(
          f'{rundir.checkpoints(later.name)} continues a {earlier.name} phase that ended at step '
          f'{latest[earlier.name]}, but this config\'s {earlier.name} phase has {earlier.num_steps} steps: use a '
          f'new --workdir, or move {rundir.checkpoints(later.name)} away to redo {later.name} after the new end')


def _print_summary(final, rundir):
  splits = list(final)
  model_names = list(final[splits[-1]])
  width = max(len(name) for name in model_names)
  lines = [f'{"model":<{width}}  ' + '  '.join(f'{split + " top-1":>16}' for split in splits)]
  for name in model_names:
    lines.append(f'{name:<{width}}  ' + '  '.join(f'{100 * final[split][name]["top1"]:>15.2f}%' for split in splits))
  print('\n'.join(lines))
  print(f'Results: {rundir / run_directory.RESULTS}\nTensorBoard: tensorboard --logdir {rundir.tensorboard}',
        flush=True)
