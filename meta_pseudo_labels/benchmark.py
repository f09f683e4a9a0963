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

FLOPs come from XLA's cost analysis of the compiled executable (2 per multiply-add, padding-aware), memory from
its memory analysis (peak, and the bytes aliased between donated inputs and outputs: the state updated in
place). Steps are timed with `block_until_ready` after warm-up; the median of `repeats` steps is reported.

Like the rest of the core this module imports neither TensorFlow nor ml_collections at import time: the input
pipeline is imported only for its own measurement (skipped with a note where TensorFlow is absent), and
ml_collections only by the command line.
"""

import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FEEDBACK_MODES = ('exact', 'hard_dot', 'hard_taylor')
# HLO ops that move data between host and device inside a step; a training step should contain none.
HOST_TRANSFER_OPS = ('infeed', 'outfeed', 'send(', 'recv(', 'host_callback', 'xla_python_cpu_callback',
                     'xla_python_gpu_callback', 'xla_ffi_python')


# ---- measuring one compiled function ---------------------------------------------------------------------------

def xla_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable from XLA's cost analysis (a dict, or a list of one per program)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    return float(sum(part.get('flops', 0.0) for part in analysis))
  return float(analysis.get('flops', 0.0))


def memory_stats(compiled) -> dict[str, int]:
  """Device memory of one call: peak, and its parts (arguments, outputs, temporaries, donated-and-reused)."""
  stats = compiled.memory_analysis()
  argument = int(stats.argument_size_in_bytes)
  output = int(stats.output_size_in_bytes)
  alias = int(stats.alias_size_in_bytes)
  temp = int(stats.temp_size_in_bytes)
  # Where the backend does not report a peak, the buffers live at once bound it: inputs + outputs not aliased to
  # an input + temporaries.
  peak = int(getattr(stats, 'peak_memory_in_bytes', 0) or argument + output - alias + temp)
  return dict(peak_bytes=peak, argument_bytes=argument, output_bytes=output, temp_bytes=temp, alias_bytes=alias)


def hlo_op_counts(compiled) -> dict[str, int]:
  """Convolutions, dots and host transfers in the optimised HLO: redundant passes and host round-trips show here."""
  text = compiled.as_text()
  return dict(convolutions=text.count(' convolution('), dots=text.count(' dot('),
              host_transfers=sum(text.count(op) for op in HOST_TRANSFER_OPS))


def _tree_bytes(tree) -> int:
  return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


def _median_seconds(call: Callable[[], Any], warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_step(step: Callable, state, *args, examples: int, warmup: int, repeats: int) -> dict[str, Any]:
  """Compiles `step(state, *args) -> (state, aux)` with the state donated, then times it fed its own output.

  Returns compile seconds, the median step seconds, examples/s (`examples` per step), XLA FLOPs and FLOP/s, memory
  (with `donated_fraction`: aliased bytes / state bytes, 1.0 when the whole state is updated in place) and the HLO
  op counts.
  """
  jitted = jax.jit(step, donate_argnums=0)
  start = time.perf_counter()
  compiled = jitted.lower(state, *args).compile()
  compile_seconds = time.perf_counter() - start
  state_bytes = _tree_bytes(state)
  carry = [state]

  def call():
    carry[0], aux = compiled(carry[0], *args)
    return carry[0], aux

  seconds = _median_seconds(call, warmup, repeats)
  flops = xla_flops(compiled)
  memory = memory_stats(compiled)
  memory['state_bytes'] = state_bytes
  memory['donated_fraction'] = memory['alias_bytes'] / state_bytes if state_bytes else 0.0
  return dict(compile_seconds=compile_seconds, step_seconds=seconds, examples_per_step=examples,
              examples_per_second=examples / seconds, flops=flops, flops_per_second=flops / seconds,
              memory=memory, hlo=hlo_op_counts(compiled))


def compiled_flops(fn: Callable, *args) -> float:
  """FLOPs of `fn(*args)` compiled standalone (not run)."""
  return xla_flops(jax.jit(fn).lower(*args).compile())


def matmul_reference(size: int, warmup: int, repeats: int) -> dict[str, float]:
  """FLOP/s of a [size, size] @ [size, size] float32 matmul: the practical compute peak of this process."""
  a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (size, size), jnp.float32)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  seconds = _median_seconds(lambda: compiled(a, b), warmup, repeats)
  flops = 2.0 * size ** 3
  return dict(size=size, seconds=seconds, flops=flops, flops_per_second=flops / seconds)
