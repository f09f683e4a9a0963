r"""Benchmarks one MPL step against its floor: FLOPs, time, memory and input throughput, as in-process ratios.

    python -m meta_pseudo_labels.benchmark --config=configs/cifar10_4k.py:cpu [--config.batch_size=16] [--json]

Absolute step times on a shared machine are noise; ratios taken in one process are not. For the config's models
and batch sizes, on synthetic data of the config's shapes, this compiles and times in one process:

- `teacher_supervised`: the teacher's own step (labeled CE + UDA on both unlabeled views), `supervised_step` with
  UDA on [x_l; x_w; x_s];
- `student_supervised`: the student's step alone, `supervised_step` on the mu*B strong views;
- `mpl_<mode>`: `mpl_step` in each feedback mode ('exact', 'hard_dot', 'hard_taylor', see MPL_SPEC.md);
- the floor of an MPL step, counted by compiling its indispensable pieces standalone: teacher forward + backward
  on [x_l; x_w; x_s], student forward + backward on x_s, and two student forwards on x_l (the labeled loss before
  and after the student's update, Sec. 2 of the paper). `mpl_flops / floor_flops` near 1 means no redundant
  pass; `mpl_time / (teacher_supervised_time + student_supervised_time)` is the time price of the feedback;
- a large float32 matmul, whose FLOP/s is the machine's practical peak in this process; the MPL step's achieved
  FLOP/s is reported as a fraction of it;
- the input pipeline alone (decode, weak + strong augmentation, batching) in examples/s, next to the examples/s
  the MPL step consumes.
- where torch is installed (the optional extra `bench`) and the models are WideResNets: the PyTorch reference of
  the hard_taylor step (`torch_reference.py`), run after each timed hard_taylor step on the matching device with
  XLA:CPU's thread count, so that project / PyTorch step time (wall and CPU) is a ratio taken under one load.

`--end_to_end` times the real training program instead (`end_to_end`: `python -m meta_pseudo_labels.main` on small
in-memory images, steps/s per method and the loop's time per part). Every report records the CPU model and the load
average before and after, and warns when the machine was not quiet (`machine_load`).

Every executable is compiled with `step_builder.compiler_options()` (on CPU: convolutions in XLA's own kernels), the
options the training step uses.

The workload (models, shapes, synthetic batch) and the cost helpers are `workload.py`'s, the ones `compile_check`
uses. FLOPs come from XLA's cost analysis of the compiled executable (2 per multiply-add, padding-aware), memory from
its memory analysis (peak as `workload.memory_stats` defines it, and the bytes aliased between donated inputs and
outputs: the state updated in place). The steps are timed bare, as `mpl.py` defines them, not wrapped in the
training loop's divergence guard (`step_builder.py`): the floor they are compared with has no guard either.
Steps are timed with `block_until_ready` after warm-up; the median of `repeats` steps is reported, in wall-clock
seconds and in process CPU seconds (all threads): on a shared host the CPU-time ratios are the ones that mean
something, on an accelerator the wall-clock ones (docs/PERFORMANCE.md).

Like the rest of the core this module imports neither TensorFlow nor ml_collections at import time: the input
pipeline is imported only for its own measurement (skipped with a note where TensorFlow is absent), and
ml_collections only by the command line.
"""

import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meta_pseudo_labels import errors
from meta_pseudo_labels import torch_reference
from meta_pseudo_labels.execution import workload
from meta_pseudo_labels.execution import step_builder
from meta_pseudo_labels.method import mpl
from meta_pseudo_labels.method import train_state

FEEDBACK_MODES = tuple(mode for mode in mpl.FEEDBACK_MODES if mode != 'none')   # 'none' has no feedback to time
PIPELINE_DATA = ('synthetic', 'config')
# HLO ops that move data between host and device inside a step; a training step should contain none.
HOST_TRANSFER_OPS = ('infeed', 'outfeed', 'send(', 'recv(', 'host_callback', 'xla_python_cpu_callback',
                     'xla_python_gpu_callback', 'xla_ffi_python')


# ---- measuring one compiled function ---------------------------------------------------------------------------

def hlo_op_counts(compiled) -> dict[str, int]:
  """Convolutions, dots and host transfers in the optimised HLO: redundant passes and host round-trips show here."""
  text = compiled.as_text()
  return dict(convolutions=text.count(' convolution('), dots=text.count(' dot('),
              host_transfers=sum(text.count(op) for op in HOST_TRANSFER_OPS))


def _alternating_median_seconds(calls: Sequence[Callable[[], Any]], warmup: int,
                                repeats: int) -> list[tuple[float, float]]:
  """Median wall-clock and median process CPU seconds (all threads) of each `call()` run to completion.

  On an oversubscribed host the wall clock measures the load as much as the work; the process CPU time counts
  only the cycles this process got, so ratios of CPU seconds stay meaningful there (on an accelerator the CPU
  time is the host's dispatch overhead instead). Several calls are timed in turn, one run of each per repeat, so
  a change of load between repeats weighs on all of them alike.
  """
  for _ in range(warmup):
    for call in calls:
      jax.block_until_ready(call())
  wall, cpu = [[] for _ in calls], [[] for _ in calls]
  for _ in range(repeats):
    for index, call in enumerate(calls):
      start_wall, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(call())
      wall[index].append(time.perf_counter() - start_wall)
      cpu[index].append(time.process_time() - start_cpu)
  return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def _median_seconds(call: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, float]:
  return _alternating_median_seconds([call], warmup, repeats)[0]


def measure_step(step: Callable, state, *args, examples: int, warmup: int, repeats: int,
                 reference: Callable[[], Any] | None = None) -> dict[str, Any]:
  """Compiles `step(state, *args) -> (state, aux)` with the state donated, then times it fed its own output.

  Returns compile seconds (tracing + lowering + XLA compilation; wall and process CPU), the median step seconds
  (wall and process CPU), examples/s (`examples` per step), XLA FLOPs and FLOP/s, memory
  (with `donated_fraction`: aliased bytes / state bytes, 1.0 when the whole state is updated in place) and the HLO
  op counts. With a `reference` (the PyTorch step), it runs after each step and its medians are
  `reference_seconds` / `reference_cpu_seconds`.
  """
  jitted = jax.jit(step, donate_argnums=0, compiler_options=step_builder.compiler_options())
  start, start_cpu = time.perf_counter(), time.process_time()
  compiled = jitted.lower(state, *args).compile()
  compile_seconds, compile_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
  state_bytes = workload.tree_bytes(state)
  carry = [state]

  def call():
    carry[0], aux = compiled(carry[0], *args)
    return carry[0], aux

  timed = _alternating_median_seconds([call] + ([reference] if reference else []), warmup, repeats)
  (seconds, cpu_seconds), reference_times = timed[0], dict(zip(('reference_seconds', 'reference_cpu_seconds'),
                                                               timed[1] if reference else ()))
  flops = workload.xla_flops(compiled)
  memory = workload.memory_stats(compiled)
  memory['state_bytes'] = state_bytes
  memory['donated_fraction'] = memory['alias_bytes'] / state_bytes if state_bytes else 0.0
  return dict(compile_seconds=compile_seconds, compile_cpu_seconds=compile_cpu_seconds, step_seconds=seconds,
              step_cpu_seconds=cpu_seconds, examples_per_step=examples, examples_per_second=examples / seconds,
              flops=flops, flops_per_second=flops / seconds, flops_per_cpu_second=flops / cpu_seconds,
              memory=memory, hlo=hlo_op_counts(compiled), **reference_times)


def compiled_flops(fn: Callable, *args) -> float:
  """FLOPs of `fn(*args)` compiled standalone (not run)."""
  return workload.xla_flops(jax.jit(fn, compiler_options=step_builder.compiler_options()).lower(*args).compile())


def matmul_reference(size: int, warmup: int, repeats: int) -> dict[str, float]:
  """FLOP/s of a [size, size] @ [size, size] float32 matmul: the practical compute peak of this process."""
  a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (size, size), jnp.float32)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  seconds, cpu_seconds = _median_seconds(lambda: compiled(a, b), warmup, repeats)
  flops = 2.0 * size ** 3
  return dict(size=size, seconds=seconds, cpu_seconds=cpu_seconds, flops=flops, flops_per_second=flops / seconds,
              flops_per_cpu_second=flops / cpu_seconds)


# ---- the MPL workload ------------------------------------------------------------------------------------------

def floor_flops(config, teacher_model, student_model, batch) -> dict[str, float]:
  """FLOPs of the indispensable pieces of one MPL step, each compiled standalone (not run).

  teacher forward + backward (w.r.t. its parameters) on [x_l; x_w; x_s], student forward + backward on x_s, and
  the student's labeled loss CE(y_l, S(x_l)) before and after its update: one forward on x_l, counted twice.
  """
  rng = jax.random.key(0)
  shape = workload.input_shape(config)
  teacher_vars = jax.eval_shape(lambda: train_state.init_variables(rng, teacher_model, shape))
  student_vars = jax.eval_shape(lambda: train_state.init_variables(rng, student_model, shape))
  x_l, y_l = batch['labeled_image'], batch['labeled_label']
  x_s = batch['unlabeled_strong']
  x_teacher = jnp.concatenate([x_l, batch['unlabeled_weak'], x_s])
  y_teacher = jnp.zeros((x_teacher.shape[0],), jnp.int32)
  y_strong = jnp.zeros((x_s.shape[0],), jnp.int32)

  def network(apply_fn, variables):
    return train_state.NetworkState(params=variables['params'], batch_stats=variables['batch_stats'],
                                    opt_state=None, apply_fn=apply_fn, tx=None, learning_rate_fn=None)

  def fwd_bwd(apply_fn, variables, x, y):
    return mpl.student_gradient(network(apply_fn, variables), x, y, 0.0, rng).grads

  def forward(apply_fn, variables, x, y):
    return mpl.labeled_loss(network(apply_fn, variables), variables['params'], x, y, rng)

  teacher_fb = compiled_flops(functools.partial(fwd_bwd, teacher_model.apply), teacher_vars, x_teacher, y_teacher)
  student_fb = compiled_flops(functools.partial(fwd_bwd, student_model.apply), student_vars, x_s, y_strong)
  student_fwd = compiled_flops(functools.partial(forward, student_model.apply), student_vars, x_l, y_l)
  return dict(teacher_forward_backward=teacher_fb, student_forward_backward=student_fb,
              student_forward_labeled=student_fwd, total=teacher_fb + student_fb + 2 * student_fwd)


def torch_reference_step(config, batch) -> tuple[Callable[[], Any] | None, dict[str, Any]]:
  """The PyTorch hard_taylor step (`torch_reference`) on the same batch, on the device matching JAX's backend,
  with as many threads as XLA:CPU uses; (None, why) where torch is absent or the models are not WideResNets."""
  if not torch_reference.available():
    return None, dict(skipped='torch is not installed (pip install .[bench])')
  student_name = workload.student_model_config(config).name
  if not (config.model.name.startswith('wrn') and student_name == config.model.name):
    return None, dict(skipped=f'the reference has WideResNet pairs only, not {config.model.name}/{student_name}')
  device = torch_reference.device_for(jax.default_backend())
  if jax.default_backend() != 'cpu' and device == 'cpu':
    return None, dict(skipped=f'JAX runs on {jax.default_backend()} but torch sees no GPU (install a CUDA build '
                              'of torch): a ratio across devices would mean nothing')
  torch_reference.set_threads(len(os.sched_getaffinity(0)))
  step = torch_reference.MplStep(config, jax.device_get(batch), device)
  counter = itertools.count()
  return (lambda: torch_reference.run_to_completion(step, next(counter))), dict(device=device,
                                                                               **torch_reference.describe())


def measure_steps(config, *, feedback_modes: Sequence[str], warmup: int, repeats: int,
                  torch_reference_on: bool = True) -> dict[str, Any]:
  """Compiles and times the teacher's and the student's supervised steps and `mpl_step` in each mode; the
  hard_taylor step alternately with the PyTorch reference when `torch_reference_on` and torch is installed."""
  teacher_model, student_model = workload.model_pair(config)
  batch = workload.synthetic_batch(config)
  shape = workload.input_shape(config)
  rng = jax.random.key(config.seed)
  total = config.num_train_steps
  labeled, unlabeled = batch['labeled_image'].shape[0], batch['unlabeled_strong'].shape[0]
  uda = mpl.UdaHparams.from_config(config.uda)
  steps = {}

  teacher_state = jax.jit(lambda r: train_state.create_supervised_state(
      r, teacher_model, config.teacher_optimizer, shape, total_steps=total, keep_ema=False))(rng)
  teacher_hparams = mpl.SupervisedHparams(label_smoothing=float(config.label_smoothing), uda=uda)
  steps['teacher_supervised'] = measure_step(
      functools.partial(mpl.supervised_step, hparams=teacher_hparams), teacher_state, batch, rng,
      examples=labeled + unlabeled, warmup=warmup, repeats=repeats)

  student_state = jax.jit(lambda r: train_state.create_supervised_state(
      r, student_model, config.student_optimizer, shape, total_steps=total))(rng)
  student_hparams = mpl.SupervisedHparams(label_smoothing=float(config.label_smoothing),
                                          ema_decay=float(config.ema_decay))
  student_batch = {'labeled_image': batch['unlabeled_strong'],
                   'labeled_label': jnp.zeros((unlabeled,), jnp.int32)}
  steps['student_supervised'] = measure_step(
      functools.partial(mpl.supervised_step, hparams=student_hparams), student_state, student_batch, rng,
      examples=unlabeled, warmup=warmup, repeats=repeats)

  reference, reference_info = (torch_reference_step(config, batch) if torch_reference_on and 'hard_taylor' in
                               feedback_modes else (None, dict(skipped='not asked for')))
  base_hparams = mpl.MplHparams.from_config(config)
  for mode in feedback_modes:
    hparams = dataclasses.replace(base_hparams, feedback=mode,
                                  pseudo_labels='sampled' if mode != 'exact' else base_hparams.pseudo_labels)
    state = jax.jit(lambda r: train_state.create_mpl_state(
        r, teacher_model, student_model, shape, teacher_optimizer=config.teacher_optimizer,
        student_optimizer=config.student_optimizer, total_steps=total))(rng)
    steps[f'mpl_{mode}'] = measure_step(functools.partial(mpl.mpl_step, hparams=hparams), state, batch, rng,
                                        examples=labeled + unlabeled, warmup=warmup, repeats=repeats,
                                        reference=reference if mode == 'hard_taylor' else None)
  if reference:
    record = steps['mpl_hard_taylor']
    reference_info.update(seconds=record['reference_seconds'], cpu_seconds=record['reference_cpu_seconds'],
                          time_ratio=record['step_seconds'] / record['reference_seconds'],
                          cpu_time_ratio=record['step_cpu_seconds'] / record['reference_cpu_seconds'])
  return dict(steps=steps, floor_flops=floor_flops(config, teacher_model, student_model, batch),
              torch_reference=reference_info)


def _synthetic_image_config(config, directory: str):
  """A copy of `config` reading random uint8 images of its shapes from an .npz written to `directory`.

  The pool is small (the in-memory pipeline's cost per example does not depend on the pool's size): every class
  labeled, one labeled batch, and two steps' worth of unlabeled images.
  """
  config = copy.deepcopy(config)
  data = config.dataset
  num_classes, side = data.num_classes, data.image_size
  num_labeled = max(num_classes, config.batch_size)
  num_train = num_labeled + 2 * config.uda_ratio * config.batch_size
  rng = np.random.default_rng(0)
  path = os.path.join(directory, 'synthetic.npz')
  np.savez(path, x_train=rng.integers(0, 256, (num_train, side, side, 3), np.uint8),
           y_train=np.arange(num_train, dtype=np.int32) % num_classes,
           x_test=rng.integers(0, 256, (num_classes, side, side, 3), np.uint8),
           y_test=np.arange(num_classes, dtype=np.int32))
  data.source, data.data_dir, data.in_memory = 'npz', path, True
  data.num_labeled, data.num_validation, data.num_unlabeled, data.unlabeled_source = num_labeled, 0, -1, ''
  return config


def measure_input_pipeline(config, num_batches: int, step_examples_per_second: float,
                           data: str = 'synthetic') -> dict[str, Any]:
  """examples/s of the input layer alone: the host batches of `mpl_batches()` and their weak and strong views, made
  by the jitted `input_pipeline.model_batch` on the default device as the training step makes them; and its ratio to
  what the step consumes.

  An example is one labeled image or one unlabeled image with both its views (B + mu*B per batch), as counted for
  the steps. `data`: 'synthetic' draws random images of the config's shapes through the real pipeline (in memory:
  batching and the views, no decoding, which in-memory data sets do once at load); 'config' reads the config's
  own data set (streaming TFDS data then includes JPEG decoding in tf.data). Vector data (TwoMoon) is always the
  config's.
  """
  from meta_pseudo_labels.data import input_pipeline  # pylint: disable=g-import-not-at-top
  examples_per_batch = config.batch_size * (1 + config.uda_ratio)
  synthetic = data == 'synthetic' and config.dataset.source != 'two_moons'
  rng = jax.random.key(config.seed)
  with tempfile.TemporaryDirectory() as directory:
    source_config = _synthetic_image_config(config, directory) if synthetic else config
    pipeline = input_pipeline.create(source_config.dataset, input_pipeline.BatchSpec.from_config(source_config),
                                     seed=source_config.seed)
    views = jax.jit(lambda batch, step: input_pipeline.model_batch(
        pipeline.views, batch, input_pipeline.step_views_key(rng, step)))
    batches = pipeline.mpl_batches(0)
    jax.block_until_ready(views(next(batches), 0))  # start-up: compiling the views, the first batch
    start = time.perf_counter()
    for step in range(1, num_batches + 1):
      made = views(next(batches), step)
    jax.block_until_ready(made)
    seconds = time.perf_counter() - start
  examples_per_second = num_batches * examples_per_batch / seconds
  return dict(data='synthetic images' if synthetic else f'{config.dataset.source}:{config.dataset.name}',
              batches=num_batches, examples_per_batch=examples_per_batch, examples_per_second=examples_per_second,
              step_examples_per_second=step_examples_per_second,
              over_step=examples_per_second / step_examples_per_second)


# ---- the real training program on small images -----------------------------------------------------------------

END_TO_END_METHODS = ('mpl', 'uda', 'supervised')
# Parts of the loop (train.py's `loop_seconds`) in the order the report lists them; 'sync' is where the host waits
# for the device's steps (the metric fetch), 'step' the dispatch.
LOOP_PARTS = ('compile', 'step', 'sync', 'input', 'transfer', 'logging', 'evaluation', 'checkpoint')


def _small_image_npz(config, directory: str) -> str:
  """Random uint8 grayscale images of the config's side (e.g. 28x28, Fashion-MNIST's shapes) in an .npz: labeled,
  validation and an unlabeled pool as the config sizes them, and a test split. The step's work does not depend on
  the pixels, so random images time what real ones do."""
  data = config.dataset
  num_unlabeled = data.num_unlabeled if data.num_unlabeled > 0 else 10 * config.batch_size * config.uda_ratio
  num_train = data.num_labeled + data.num_validation + num_unlabeled
  num_test = max(data.num_validation, data.num_classes)
  rng = np.random.default_rng(0)
  side = data.image_size
  path = os.path.join(directory, 'small_images.npz')
  np.savez(path, x_train=rng.integers(0, 256, (num_train, side, side, 1), np.uint8),
           y_train=np.arange(num_train, dtype=np.int32) % data.num_classes,
           x_test=rng.integers(0, 256, (num_test, side, side, 1), np.uint8),
           y_test=np.arange(num_test, dtype=np.int32) % data.num_classes)
  return path


def end_to_end(config, config_args: Sequence[str], *, methods: Sequence[str] = END_TO_END_METHODS,
               data_path: str = '', variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
  """Runs the real training program, `python -m meta_pseudo_labels.main` with `config_args` (the `--config...`
  arguments `config` was read from), for each of `methods` on an in-memory image data set, and times it.

  One child process per run: the program as a user runs it (input pipeline, loop, evaluation, checkpoints,
  results), with nothing compiled or cached beforehand, and TensorFlow never imported here. `data_path`: an .npz
  (README's custom-data format, e.g. Fashion-MNIST); '' writes random images of the config's shapes
  (`_small_image_npz`). `variants`: {name: {dotted config field: value}} run one after the other per method (a
  change of load weighs on all of them alike), ratios taken against the first; None runs the config as given.

  Per run: wall and CPU seconds of the child, main-phase steps/s without compilation, the whole program's steps/s,
  and the loop's wall seconds per part (`LOOP_PARTS`, results.json's `loop_seconds`; absent for a trainer that does
  not record them, whose runs then have 'run' figures only).
  """
  variants = variants or {'as_given': {}}
  runs = {}
  with tempfile.TemporaryDirectory() as directory:
    data = data_path or _small_image_npz(config, directory)
    for method in methods:
      for name, overrides in variants.items():
        workdir = tempfile.mkdtemp(dir=directory)
        fields = {'method': method, 'dataset.source': 'npz', 'dataset.data_dir': data, 'dataset.in_memory': True,
                  **overrides}
        command = [sys.executable, '-m', 'meta_pseudo_labels.main', *config_args, f'--workdir={workdir}',
                   *(f'--config.{field}={value}' for field, value in fields.items())]
        children = os.times()
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        cpu_seconds = sum(os.times()[2:4]) - sum(children[2:4])
        if completed.returncode:
          raise errors.MplError(f'end_to_end {method}/{name}: the training program failed:\n'
                                f'{completed.stderr[-3000:]}')
        with open(os.path.join(workdir, 'results.json'), encoding='utf-8') as results_file:
          results = json.load(results_file)
        steps = results['steps'][method]
        phase = results.get('loop_seconds', {}).get(method, {})
        training = sum(phase.values()) - phase.get('compile', 0.0)
        runs[f'{method}/{name}'] = dict(
            method=method, variant=name, overrides=overrides, steps=steps, seconds=seconds, cpu_seconds=cpu_seconds,
            steps_per_second=steps / training if training else None,
            run_steps_per_second=sum(results['steps'].values()) / seconds,
            loop_seconds=results.get('loop_seconds', {}))
  first = next(iter(variants))
  for record in runs.values():
    base = runs[f"{record['method']}/{first}"]
    record['speedup'] = (record['steps_per_second'] / base['steps_per_second']
                         if record['steps_per_second'] and base['steps_per_second'] else None)
    record['run_speedup'] = record['run_steps_per_second'] / base['run_steps_per_second']
  return dict(data=data_path or 'random images', command_config=list(config_args), runs=runs)


def format_end_to_end(result: dict[str, Any]) -> str:
  lines = [f"{'run':<28}{'steps':>6}{'steps/s':>9}{'x':>6}{'run s':>8}{'run x':>7}{'run CPU s':>10}"
           + ''.join(f'{part:>11}' for part in LOOP_PARTS)]
  for name, record in result['runs'].items():
    phase = record['loop_seconds'].get(record['method'], {})
    per_second = record['steps_per_second']
    lines.append(f"{name:<28}{record['steps']:>6}{per_second or float('nan'):>9.3f}"
                 f"{record['speedup'] or float('nan'):>6.2f}{record['seconds']:>8.1f}{record['run_speedup']:>7.2f}"
                 f"{record['cpu_seconds']:>10.1f}"
                 + ''.join(f"{phase.get(part, float('nan')):>11.2f}" for part in LOOP_PARTS))
  lines.append("steps/s: main-phase steps over its loop's wall time without compilation; run s: the whole "
               "program (compilation, finetuning, final evaluation included); x: over the first variant; the parts: "
               "the main phase's loop wall seconds")
  return '\n'.join(lines)


def _ratios(steps: dict[str, Any], floor: dict[str, float], matmul: dict[str, Any]) -> dict[str, Any]:
  """Per feedback mode: FLOPs over the floor, time over the two supervised steps, FLOP/s over the matmul's.

  Every time ratio is given twice: in wall-clock seconds and in process CPU seconds (see `_median_seconds`).
  """
  teacher, student = steps['teacher_supervised'], steps['student_supervised']
  reference = steps.get('mpl_hard_taylor')
  ratios = {}
  for name, record in steps.items():
    if not name.startswith('mpl_'):
      continue
    mode = ratios[name[len('mpl_'):]] = dict(
        flops_over_floor=record['flops'] / floor['total'],
        time_over_supervised=record['step_seconds'] / (teacher['step_seconds'] + student['step_seconds']),
        cpu_time_over_supervised=record['step_cpu_seconds'] / (teacher['step_cpu_seconds']
                                                               + student['step_cpu_seconds']),
        flops_per_second_over_matmul=record['flops_per_second'] / matmul['flops_per_second'],
        flops_per_cpu_second_over_matmul=record['flops_per_cpu_second'] / matmul['flops_per_cpu_second'])
    if reference is not None:
      mode['flops_over_hard_taylor'] = record['flops'] / reference['flops']
      mode['time_over_hard_taylor'] = record['step_seconds'] / reference['step_seconds']
      mode['cpu_time_over_hard_taylor'] = record['step_cpu_seconds'] / reference['step_cpu_seconds']
  return ratios


# The machine counts as quiet when the 1-minute load average before the run is at most this fraction of its CPUs and
# ended no more than that above what the run's own busy threads explain: beyond it other processes took cycles the
# timed steps wanted.
QUIET_LOAD_PER_CPU = 0.5
# The kernel's 1-minute load average decays with this time constant (seconds).
LOAD_AVERAGE_SECONDS = 60.0


def cpu_model() -> str:
  """The host CPU's model name (from /proc/cpuinfo; `platform.processor()` elsewhere), e.g. 'AMD EPYC'."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as cpuinfo:
      for line in cpuinfo:
        if line.startswith('model name'):
          return line.partition(':')[2].strip()
  except OSError:
    pass
  import platform  # pylint: disable=g-import-not-at-top
  return platform.processor() or 'unknown'


def load_average() -> list[float] | None:
  """The 1, 5 and 15-minute load averages (None where the OS has none)."""
  try:
    return [round(value, 2) for value in os.getloadavg()]
  except OSError:
    return None


def usage_now() -> tuple[float, float]:
  """(wall, CPU) seconds now; the CPU seconds count this process and its waited-for children (end-to-end runs)."""
  times = os.times()
  return time.perf_counter(), times.user + times.system + times.children_user + times.children_system


def machine_load(before: list[float] | None, after: list[float] | None,
                 usage_before: tuple[float, float] | None = None) -> dict[str, Any]:
  """The load averages around a measurement and whether the machine was quiet (`QUIET_LOAD_PER_CPU`).

  Timings taken under load do not describe the code (the two sides of a ratio are not slowed alike): the report
  and the JSON carry a warning instead of a silent figure. The run's own threads raise the load average too (a
  two-minute run on both of two cores lifts it by about 1.7): with `usage_before` (`usage_now()` at the start), the
  rise they explain, their mean number of busy threads times (1 - exp(-wall / 60 s)), is not counted against it.
  """
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  record = dict(load_before=before, load_after=after, cpus=cpus, quiet=None, warning='')
  if before is None or after is None:
    record['warning'] = 'no load average on this OS: cannot tell whether the machine was quiet'
    return record
  expected = before[0]
  if usage_before is not None:
    (wall_start, cpu_start), (wall_end, cpu_end) = usage_before, usage_now()
    wall = max(wall_end - wall_start, 1e-9)
    busy_threads = min(float(cpus), (cpu_end - cpu_start) / wall)
    decay = math.exp(-wall / LOAD_AVERAGE_SECONDS)
    expected = max(before[0], before[0] * decay + busy_threads * (1.0 - decay))
    record['own_load'] = round(expected - before[0], 2)
  limit = QUIET_LOAD_PER_CPU * cpus
  busy_before, rising = before[0] > limit, after[0] - expected > limit
  record['quiet'] = not (busy_before or rising)
  if not record['quiet']:
    own = f' beyond the {expected - before[0]:.2f} this run\'s own threads explain' if usage_before else ''
    record['warning'] = (f'NOT A QUIET MACHINE: 1-min load {before[0]:.2f} before, {after[0]:.2f} after, on {cpus} '
                         f'CPUs (quiet: at most {limit:.2f} before and no rise above it{own}); other processes '
                         'took cycles, so compare only ratios measured in this one run')
  return record


def device_description() -> dict[str, Any]:
  device = jax.devices()[0]
  return dict(platform=device.platform, device_kind=device.device_kind, num_devices=jax.device_count(),
              host_cpu_model=cpu_model(), host_cpu_count=os.cpu_count(), jax_version=jax.__version__,
              xla_flags=os.environ.get('XLA_FLAGS', ''),
              compiler_options=step_builder.compiler_options(device.platform))


def run(config, *, feedback_modes: Sequence[str] = FEEDBACK_MODES, warmup: int = 1, repeats: int = 3,
        matmul_size: int = 2048, pipeline_batches: int = 0, pipeline_data: str = 'synthetic',
        torch_reference_on: bool = True) -> dict[str, Any]:
  """The whole benchmark for `config` (attribute access) in this process; returns a JSON-serialisable dict.

  The matmul reference is timed before and after the steps and the faster of the two is used, so background
  load on a shared machine lowers, never inflates, the MPL step's fraction of it. `pipeline_batches` 0 skips the
  input-pipeline measurement; `pipeline_data` is 'synthetic' or 'config' (see `measure_input_pipeline`).
  """
  if pipeline_data not in PIPELINE_DATA:
    raise errors.ConfigError(f'pipeline_data: unknown {pipeline_data!r}; choose one of {list(PIPELINE_DATA)}')
  unknown = sorted(set(feedback_modes) - set(FEEDBACK_MODES))
  if unknown:
    raise errors.ConfigError(f'feedback_modes: unknown {unknown}; choose from {list(FEEDBACK_MODES)}')
  load_before, usage_before = load_average(), usage_now()
  matmul_before = matmul_reference(matmul_size, warmup, repeats)
  measured = measure_steps(config, feedback_modes=feedback_modes, warmup=warmup, repeats=repeats,
                           torch_reference_on=torch_reference_on)
  matmul_after = matmul_reference(matmul_size, warmup, repeats)
  matmul = dict(size=matmul_size, flops=matmul_before['flops'],
                flops_per_second=max(matmul_before['flops_per_second'], matmul_after['flops_per_second']),
                flops_per_cpu_second=max(matmul_before['flops_per_cpu_second'],
                                         matmul_after['flops_per_cpu_second']),
                before=matmul_before, after=matmul_after)
  steps, floor = measured['steps'], measured['floor_flops']
  result = dict(
      device=device_description(),
      workload=dict(teacher=config.model.name,
                    student=workload.student_model_config(config).name,
                    dtype=getattr(config.model, 'dtype', 'float32'), batch_size=config.batch_size,
                    uda_ratio=config.uda_ratio, input_shape=list(workload.input_shape(config)),
                    num_classes=config.dataset.num_classes, warmup=warmup, repeats=repeats),
      matmul=matmul, steps=steps, floor_flops=floor,
      mpl=_ratios(steps, floor, matmul), torch_reference=measured['torch_reference'])
  if pipeline_batches:
    consumed = max(record['examples_per_second'] for name, record in steps.items() if name.startswith('mpl_'))
    result['input_pipeline'] = measure_input_pipeline(config, pipeline_batches, consumed, pipeline_data)
  result['machine_load'] = machine_load(load_before, load_average(), usage_before)
  return result


# ---- report ----------------------------------------------------------------------------------------------------

def load_line(load: dict[str, Any]) -> str:
  line = f"load average (1, 5, 15 min): before {load['load_before']}, after {load['load_after']}"
  return f"{line}\nWARNING: {load['warning']}" if load['warning'] else f'{line}: a quiet machine'


def format_report(result: dict[str, Any]) -> str:
  """The benchmark as text tables (what `--json` prints as one object)."""
  device, job, matmul = result['device'], result['workload'], result['matmul']
  lines = [
      f"device: {device['device_kind']} ({device['platform']}), {device['num_devices']} device(s), "
      f"host CPU {device['host_cpu_model']} x {device['host_cpu_count']}, jax {device['jax_version']}, "
      f"XLA_FLAGS={device['xla_flags']!r}, "
      f"compiler options {device['compiler_options']}",
      f"workload: teacher {job['teacher']}, student {job['student']}, {job['dtype']}, "
      f"B={job['batch_size']}, mu={job['uda_ratio']}, input {'x'.join(map(str, job['input_shape']))}"
      f", median of {job['repeats']} steps after {job['warmup']} warm-up",
      f"matmul {matmul['size']}^2 float32: {matmul['flops_per_second'] / 1e9:.1f} GFLOP/s wall, "
      f"{matmul['flops_per_cpu_second'] / 1e9:.1f} GFLOP per CPU-second (best of before "
      f"{matmul['before']['flops_per_second'] / 1e9:.1f} / after {matmul['after']['flops_per_second'] / 1e9:.1f})",
      load_line(result['machine_load']),
      '',
      f"{'step':<20}{'compile s':>10}{'cpu s':>8}{'step ms':>10}{'cpu ms':>9}{'ex/s':>10}{'GFLOP':>10}{'GFLOP/s':>9}"
      f"{'peak MiB':>10}{'donated':>9}{'convs':>7}{'host io':>8}",
  ]
  for name, record in result['steps'].items():
    memory = record['memory']
    lines.append(
        f"{name:<20}{record['compile_seconds']:>10.1f}{record['compile_cpu_seconds']:>8.1f}"
        f"{record['step_seconds'] * 1e3:>10.5g}{record['step_cpu_seconds'] * 1e3:>9.5g}"
        f"{record['examples_per_second']:>10.4g}{record['flops'] / 1e9:>10.4g}{record['flops_per_second'] / 1e9:>9.1f}"
        f"{memory['peak_bytes'] / 2**20:>10.1f}{memory['donated_fraction']:>9.2f}{record['hlo']['convolutions']:>7}"
        f"{record['hlo']['host_transfers']:>8}")
  floor = result['floor_flops']
  lines += [
      '',
      f"floor: teacher fwd+bwd {floor['teacher_forward_backward'] / 1e9:.4g} + student fwd+bwd "
      f"{floor['student_forward_backward'] / 1e9:.4g} + 2 x student fwd on x_l "
      f"{floor['student_forward_labeled'] / 1e9:.4g} = {floor['total'] / 1e9:.4g} GFLOP",
      'ratios, wall clock | process CPU time:',
      f"{'mode':<13}{'FLOPs/floor':>12}{'FLOPs/taylor':>13}{'time/(T+S sup)':>17}{'time/taylor':>15}"
      f"{'FLOP/s / matmul':>18}",
  ]
  nan = float('nan')
  for mode, ratios in result['mpl'].items():
    lines.append(
        f"{mode:<13}{ratios['flops_over_floor']:>12.3f}{ratios.get('flops_over_hard_taylor', nan):>13.3f}"
        f"{ratios['time_over_supervised']:>9.2f} | {ratios['cpu_time_over_supervised']:<5.2f}"
        f"{ratios.get('time_over_hard_taylor', nan):>7.2f} | {ratios.get('cpu_time_over_hard_taylor', nan):<5.2f}"
        f"{ratios['flops_per_second_over_matmul']:>10.2f} | {ratios['flops_per_cpu_second_over_matmul']:<5.2f}")
  reference = result.get('torch_reference', {})
  lines.append('')
  if 'skipped' in reference:
    lines.append(f"PyTorch reference: skipped ({reference['skipped']})")
  else:
    lines += [
        f"PyTorch reference (torch {reference['torch_version']}, {reference['torch_threads']} threads, "
        f"{reference['device']}), hard_taylor step timed alternately with the project's:",
        f"{'':<20}{'step s wall':>12}{'step s CPU':>12}",
        f"{'project':<20}{result['steps']['mpl_hard_taylor']['step_seconds']:>12.4g}"
        f"{result['steps']['mpl_hard_taylor']['step_cpu_seconds']:>12.4g}",
        f"{'PyTorch':<20}{reference['seconds']:>12.4g}{reference['cpu_seconds']:>12.4g}",
        f"{'project / PyTorch':<20}{reference['time_ratio']:>12.2f}{reference['cpu_time_ratio']:>12.2f}",
    ]
  pipeline = result.get('input_pipeline')
  if pipeline:
    lines.append('')
    if 'skipped' in pipeline:
      lines.append(f"input pipeline: skipped ({pipeline['skipped']})")
    else:
      lines.append(f"input pipeline ({pipeline['data']}): {pipeline['examples_per_second']:.1f} examples/s, "
                   f"{pipeline['over_step']:.2f}x what the fastest MPL step consumes "
                   f"({pipeline['step_examples_per_second']:.1f} examples/s)")
  return '\n'.join(lines)


# ---- command line (the only place that needs absl and ml_collections) ------------------------------------------

def _main():
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'Experiment config file, e.g. configs/cifar10_4k.py:cpu; override fields with --config.x=y.',
      lock_config=True)
  json_flag = flags.DEFINE_bool('json', False, 'Print one JSON object instead of tables.')
  modes_flag = flags.DEFINE_list('feedback_modes', list(FEEDBACK_MODES), 'MPL feedback modes to time.')
  warmup_flag = flags.DEFINE_integer('warmup', 1, 'Untimed steps before timing (the first run after compile).')
  repeats_flag = flags.DEFINE_integer('repeats', 3, 'Timed steps per measurement; the median is reported.')
  matmul_flag = flags.DEFINE_integer('matmul_size', 2048, 'Side of the square float32 matmul reference.')
  pipeline_flag = flags.DEFINE_integer('pipeline_batches', 20, 'Batches drawn from the input pipeline; 0 skips.')
  torch_flag = flags.DEFINE_bool('torch_reference', True, 'Time the PyTorch reference of the hard_taylor step '
                                 'alternately with it (when torch is installed).')
  pipeline_data_flag = flags.DEFINE_enum('pipeline_data', 'synthetic', PIPELINE_DATA,
                                         "The input pipeline's data: random images of the config's shapes, or "
                                         "the config's own data set.")
  end_to_end_flag = flags.DEFINE_bool(
      'end_to_end', False, 'Time the real training program (run/train.py) on small in-memory images instead of '
      'the bare steps: steps/s per method and where the loop spends its time (`end_to_end`).')
  methods_flag = flags.DEFINE_list('methods', list(END_TO_END_METHODS), 'With --end_to_end: the methods to run.')
  data_flag = flags.DEFINE_string('data', '', 'With --end_to_end: an .npz data set (README format); empty: random '
                                  "images of the config's shapes.")
  variants_flag = flags.DEFINE_string(
      'variants', '', 'With --end_to_end: JSON {name: {dotted config field: value}}, run in turn per method; '
      'ratios are over the first. Empty: the config as given.')
  flags.mark_flags_as_required(['config'])

  def main(argv):
    errors.no_positional_arguments(argv)
    with errors.one_line_user_errors():
      for name, flag in (('warmup', warmup_flag), ('repeats', repeats_flag), ('matmul_size', matmul_flag),
                         ('pipeline_batches', pipeline_flag)):
        minimum = 1 if name in ('repeats', 'matmul_size') else 0
        if flag.value < minimum:
          raise errors.ConfigError(f'--{name}: must be >= {minimum}, got {flag.value}')
      if end_to_end_flag.value:
        load_before, usage_before = load_average(), usage_now()
        config_args = [arg for arg in sys.argv[1:] if arg.startswith('--config')]
        result = end_to_end(config_flag.value, config_args, methods=methods_flag.value, data_path=data_flag.value,
                            variants=json.loads(variants_flag.value) if variants_flag.value else None)
        result.update(device=device_description(),
                      machine_load=machine_load(load_before, load_average(), usage_before))
        device = result['device']
        print(json.dumps(result, indent=1) if json_flag.value else
              f"host CPU {device['host_cpu_model']} x {device['host_cpu_count']}, jax {device['jax_version']}\n"
              f"{load_line(result['machine_load'])}\n{format_end_to_end(result)}")
        return
      result = run(config_flag.value, feedback_modes=modes_flag.value, warmup=warmup_flag.value,
                   repeats=repeats_flag.value, matmul_size=matmul_flag.value,
                   pipeline_batches=pipeline_flag.value, pipeline_data=pipeline_data_flag.value,
                   torch_reference_on=torch_flag.value)
    print(json.dumps(result, indent=1) if json_flag.value else format_report(result))

  app.run(main)


if __name__ == '__main__':
  _main()
