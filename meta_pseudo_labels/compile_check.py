r"""Compiles the real MPL training step ahead of time for a TPU topology this machine does not have.

    python -m meta_pseudo_labels.compile_check --config=configs/imagenet.py --topology=v4-32 \
        [--config.mesh.fsdp=16 --config.mesh.spatial=2 ...] [--num_slices=2] [--json]

Why: a pod run fails late and expensively when the step does not fit in HBM (after the VMs are created, the data
is staged and every host has compiled). XLA's TPU compiler is in libtpu, and libtpu can compile for a described
topology without any TPU attached (`jax.experimental.topologies.get_topology_desc`), so the exact program a pod
would run can be compiled, and its memory and FLOPs read, on a laptop or a CPU-only CI machine.

What is compiled is what `train.py` runs for the MPL phase, built by the same `step_builder.build_train_step`:
`mpl.mpl_step` (with `mpl.teacher='reduced'`: Reduced MPL's, T_R in the teacher's place and no large teacher) with
the divergence guard and on-device metric sums, the state sharded by `sharding.state_shardings`
(FSDP rules), the global batch by `sharding.batch_shardings` (batch over data x fsdp, width over spatial), the state
and metric sums donated, on the mesh `sharding.create_mesh` builds from `config.mesh` over the topology's devices.
Nothing is executed, and neither the input pipeline nor TensorFlow is imported.

Printed: per-device memory (arguments, outputs, temporaries, generated code, and the bytes outputs reuse from
donated arguments), their total against the chip's HBM, FLOPs per step (XLA's cost analysis of the per-device SPMD
program, and times the device count), the largest HBM allocations (XLA's buffer assignment, read from the
memory-usage report the compiler dumps into a temporary directory), and whether the step fits. `--json` prints the
same as one JSON object with every key of `RESULT_KEYS` always present (null where a figure does not exist) and
sorted, so two runs compare key by key. A step that does not fit is reported as such, in one line that names the
largest buffers, with the compiler's own figures (XLA:TPU refuses to compile a program that exceeds HBM), exit
status 1; user errors (unknown topology, a mesh that does not divide the devices, libtpu missing) are one line and
exit status 2.

Topologies: `v4-N`, `v5p-N` (N TensorCores, two per chip, one megacore device per chip, 3-D torus), `v5e-N`,
`v6e-N` (N chips, one core each, 2-D), `v3-N` (N cores, two devices per chip, 2-D); N a power of two (v4-8,
v5e-16, v6e-256, ...). Any other slice shape can be given as `generation:AxBxC` in chips, e.g. `v5p:4x4x12`.

Needs libtpu (`pip install -e '.[tpu]'`; kept out of requirements.txt). Works on a TPU VM too; there
`ALLOW_MULTIPLE_LIBTPU_LOAD=1` (set here unless already set) lets it run next to a training job holding the chips.
"""

import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any, Optional

import jax

from meta_pseudo_labels import errors
from meta_pseudo_labels.execution import sharding
from meta_pseudo_labels.execution import step_builder
from meta_pseudo_labels.execution import workload
from meta_pseudo_labels.method import mpl
from meta_pseudo_labels.method import train_state
from meta_pseudo_labels.run import config_validation

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  """What a TPU generation looks like to libtpu's topology description and to JAX."""
  libtpu_name: str        # prefix of libtpu's topology name ('v5' is v5p)
  dims: int               # 2-D (v3, v5e, v6e) or 3-D (v4, v5p) chip mesh
  cores_per_chip: int     # TensorCores counted in the slice name (v4-8 = 4 chips)
  megacore: bool          # the two cores of a chip are one JAX device
  hbm_bytes_per_device: int
  wrap_edge: int          # a chip-mesh dimension of this size (or more, 3-D: all >= 4) is a torus ring


GENERATIONS = {
    'v3': Generation('v3', 2, 2, False, 16 * GiB, 32),    # 32 GiB per chip, 16 per core (= device)
    'v4': Generation('v4', 3, 2, True, 32 * GiB, 4),
    'v5p': Generation('v5', 3, 2, True, 95 * GiB, 4),
    'v5e': Generation('v5e', 2, 1, False, 16 * GiB, 16),
    'v6e': Generation('v6e', 2, 1, False, 32 * GiB, 16),
}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6': 'v6e'}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                      # as given, e.g. 'v4-32'
  generation: str                # key of GENERATIONS
  chips: tuple[int, ...]         # chip-mesh shape
  num_slices: int = 1

  @property
  def spec(self) -> Generation:
    return GENERATIONS[self.generation]

  @property
  def libtpu_topology(self) -> str:
    return f'{self.spec.libtpu_name}:{"x".join(map(str, self.chips))}'

  @property
  def num_chips(self) -> int:
    return math.prod(self.chips)

  @property
  def num_devices(self) -> int:
    per_chip = 1 if self.spec.megacore else self.spec.cores_per_chip
    return self.num_chips * per_chip * self.num_slices

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    edge = self.spec.wrap_edge
    if self.spec.dims == 3:
      ring = all(size >= edge for size in self.chips)
      return (ring,) * 3
    return tuple(size >= edge for size in self.chips) + (False,)


def _chip_shape(num_chips: int, dims: int) -> tuple[int, ...]:
  """Google's slice shapes for a power-of-two chip count: 3-D from 2x2x1, 2-D from 1x1, doubling the smallest
  dimension (the last of equals): v4-32 = 2x2x4, v4-64 = 2x4x4, v5e-32 = 4x8, v6e-256 = 16x16."""
  shape = [2, 2, 1] if dims == 3 and num_chips >= 4 else [1] * dims
  while math.prod(shape) < num_chips:
    smallest = min(shape)
    index = max(i for i, size in enumerate(shape) if size == smallest)
    shape[index] *= 2
  if math.prod(shape) != num_chips:
    raise ValueError(num_chips)
  return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """`v4-32`, `v5p-128`, `v5e-16`, `v6e-256`, `v3-32`, or `generation:AxB[xC]` in chips; raises ConfigError."""
  known = ', '.join(sorted(GENERATIONS))
  if not isinstance(num_slices, int) or num_slices < 1:
    raise errors.ConfigError(f'--num_slices: {num_slices!r} must be a positive integer')
  match = re.fullmatch(r'(v\w+?)[-:](.+)', name.strip().lower())
  generation = ALIASES.get(match.group(1), match.group(1)) if match else None
  if generation not in GENERATIONS:
    raise errors.ConfigError(f'--topology: {name!r} is not a TPU slice of a known generation ({known}); use e.g. '
                             'v4-32, v5p-64, v5e-16, v6e-256 or generation:AxBxC (chips), e.g. v5p:4x4x12')
  spec = GENERATIONS[generation]
  size = match.group(2)
  if name.strip().lower().startswith(f'{match.group(1)}:'):
    chips = tuple(int(x) for x in size.split('x')) if re.fullmatch(r'\d+(x\d+)*', size) else ()
    if len(chips) != spec.dims or min(chips) < 1:
      raise errors.ConfigError(f'--topology: {name!r}: a {generation} chip mesh has {spec.dims} dimensions, e.g. '
                               f'{generation}:{"x".join(["2"] * spec.dims)}')
    return Topology(name, generation, chips, num_slices)
  if not size.isdigit() or int(size) % spec.cores_per_chip:
    raise errors.ConfigError(f'--topology: {name!r}: the size after {match.group(1)}- counts TensorCores '
                             f'({spec.cores_per_chip} per {generation} chip), e.g. {generation}-'
                             f'{8 * spec.cores_per_chip}')
  num_chips = int(size) // spec.cores_per_chip
  try:
    chips = _chip_shape(num_chips, spec.dims)
  except ValueError:
    raise errors.ConfigError(f'--topology: {name!r}: {num_chips} chips is not a power of two; give the chip mesh '
                             f'as {generation}:AxB{"xC" if spec.dims == 3 else ""}') from None
  return Topology(name, generation, chips, num_slices)


# ---- libtpu ------------------------------------------------------------------------------------------------------


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


LIBTPU_MISSING = ("libtpu is not installed, and XLA's TPU compiler lives in it: pip install -e '.[tpu]' (the "
                  'libtpu release matching this jax) and run again')


def topology_devices(topology: Topology) -> list:
  """The JAX devices of a TPU topology, described by libtpu (compile-only: nothing can run on them)."""
  if not libtpu_available():
    raise errors.ConfigError(LIBTPU_MISSING)
  # libtpu takes /tmp/libtpu_lockfile for the chips of this host; describing a topology uses no chips, so this
  # must not fail (or block) because a training job, or another process that probed for TPUs, holds it.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Chips per host: 2x2 on every multi-host slice of these generations (fewer on a slice smaller than a host).
  chips = topology.chips + (1,) * (3 - len(topology.chips))
  hosts = tuple(min(size, bound) for size, bound in zip(chips, (2, 2, 1)))
  try:
    description = topologies.get_topology_desc(
        platform='tpu', topology_name=topology.libtpu_topology,
        chip_config_name='megacore' if topology.spec.megacore else 'default', chips_per_host_bounds=hosts,
        num_slices=topology.num_slices, wrap=topology.wrap)
  except Exception as e:  # pylint: disable=broad-except  # libtpu raises JaxRuntimeError / RuntimeError
    raise errors.ConfigError(f'--topology {topology.name}: libtpu cannot describe {topology.libtpu_topology} '
                             f'({_first_line(e)}); check the name, or the libtpu version (pip install -e .[tpu])'
                             ) from None
  devices = list(description.devices)
  if len(devices) != topology.num_devices:
    raise errors.ConfigError(f'--topology {topology.name}: libtpu describes {len(devices)} devices, expected '
                             f'{topology.num_devices}; give the chip mesh explicitly, e.g. '
                             f'{topology.generation}:{"x".join(map(str, topology.chips))}')
  return devices


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


# ---- the compile -------------------------------------------------------------------------------------------------


def lower_mpl_step(config, devices):
  """The training loop's jitted MPL step (`step_builder.build_train_step`: guard and metric sums included), lowered
  for `devices`; returns (lowered, info).

  Lowering needs only abstract values: the state's shapes come from `jax.eval_shape` of its initialiser.
  """
  if config.method != 'mpl':
    raise errors.ConfigError(f'method: {config.method!r}; compile_check compiles the MPL step, use a config with '
                             "method='mpl'")
  config_validation.validate(config, len(devices))
  mesh = sharding.create_mesh(config.mesh, devices)
  teacher, student = workload.model_pair(config)
  rng = jax.eval_shape(lambda: jax.random.key(config.seed))
  example_shape = workload.input_shape(config)
  reduced = workload.is_reduced(config)
  optimizers = dict(teacher_optimizer=config.teacher_optimizer, student_optimizer=config.student_optimizer,
                    total_steps=config.num_train_steps)
  if reduced:   # Reduced MPL (App. E): T_R on stored targets in the teacher's place; no large teacher in memory
    create = lambda r: train_state.create_reduced_mpl_state(r, config.reduced, config.dataset.num_classes, student,
                                                            example_shape, **optimizers)
  else:
    create = lambda r: train_state.create_mpl_state(r, teacher, student, example_shape, **optimizers)
  state = jax.eval_shape(create, rng)
  state_shardings = sharding.state_shardings(state, mesh, config.mesh.fsdp_min_size)
  batch = workload.abstract_batch(config)
  train_step = step_builder.build_train_step(
      functools.partial(mpl.mpl_step, hparams=mpl.MplHparams.from_config(config)), state, state_shardings, batch,
      mesh, skip_nonfinite=config.on_nonfinite == 'skip')
  lowered = train_step.lower(state, batch, rng)
  info = {
      'mesh': {axis: int(size) for axis, size in mesh.shape.items()},
      'teacher': (f'reduced (T_R: MLP {tuple(config.reduced.hidden_sizes)} on the top {config.reduced.top_k} '
                  'stored classes)') if reduced else config.model.name,
      'student': workload.student_model_config(config).name,
      'dtype': config.model.dtype,
      'feedback': config.mpl.feedback,
      'remat': {'teacher': config.model.remat, 'student': workload.student_model_config(config).remat},
      'batch_size': config.batch_size,
      'uda_ratio': config.uda_ratio,
      'input_shape': list(example_shape),
      'examples_per_step': config.batch_size * (1 + (1 if reduced else 2) * config.uda_ratio),
      'state_bytes': workload.tree_bytes(state),
      'state_bytes_per_device': workload.shard_bytes(state, state_shardings),
      'batch_bytes_per_device': workload.shard_bytes(batch, train_step.batch_shardings),
      'parameters': {'teacher': workload.parameter_count(state.teacher.params),
                     'student': workload.parameter_count(state.student.params)},
  }
  return lowered, info


# XLA:TPU's out-of-memory messages, e.g. "... required for HLO temporaries (25.88G) exceeds available HBM
# (15.75G)" or "Used 45.6G of 31.7G hbm": the required and available figures.
OOM_PATTERNS = (re.compile(r'\(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)', re.IGNORECASE),
                re.compile(r'Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm', re.IGNORECASE))


def _out_of_memory(error: BaseException) -> Optional[str]:
  text = str(error)
  if 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text or 'out of memory' in text.lower():
    return text
  return None


def memory_report(compiled, hbm_bytes: int) -> dict[str, Any]:
  """Per-device bytes of one step; `total` is `workload.memory_stats`' peak (the buffers alive at the step's peak,
  bounded above; its docstring says why), against the device's HBM."""
  stats = workload.memory_stats(compiled)
  return {
      'arguments': stats['argument_bytes'],
      'outputs': stats['output_bytes'],
      'aliased': stats['alias_bytes'],
      'temporaries': stats['temp_bytes'],
      'generated_code': stats['generated_code_bytes'],
      'total': stats['peak_bytes'],
      'hbm': hbm_bytes,
      'fits': stats['peak_bytes'] <= hbm_bytes,
  }


# The report's keys, always all present (None where a figure does not exist, e.g. memory after an out-of-memory
# compile), so that a script can compare two `--json` outputs key by key. Bump JSON_SCHEMA when a key changes.
JSON_SCHEMA = 1
RESULT_KEYS = ('schema', 'topology', 'libtpu_topology', 'num_slices', 'device_kind', 'num_devices', 'num_hosts',
               'hbm_bytes_per_device', 'workload', 'lower_seconds', 'compile_seconds', 'fits', 'memory',
               'flops_per_device', 'flops_per_step', 'compiler_message', 'compiler_required', 'compiler_available',
               'largest_buffers')
LARGEST_BUFFERS = 5
_UNITS = {'B': 1, 'KiB': 2**10, 'MiB': 2**20, 'GiB': 2**30, 'TiB': 2**40}
# A row of the memory-usage report XLA dumps after buffer assignment (`--xla_dump_to`), largest allocation first:
#   "   15.00GiB( 43%);    7.50GiB;   8053063680;    8; bf16[117440512,2], 2×f32[251658240,2], ..."
_REPORT_ROW = re.compile(r'\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*\d+;\s*(\d+);\s*(.*)$')


def largest_buffers(dump_dir: str, count: int = LARGEST_BUFFERS) -> list[dict[str, Any]]:
  """The `count` largest HBM allocations of the step from XLA's buffer assignment, largest first.

  Read from the memory-usage report the TPU compiler writes to `dump_dir` (it writes it before it checks the total
  against HBM, so it exists for a step that does not fit too): each allocation's bytes, how many HLO values share
  it over the step, and their shapes (layout padding included in the bytes)."""
  reports = sorted(pathlib.Path(dump_dir).glob('*guarded_step*memory-usage-report.txt'))
  rows = []
  for line in reports[-1].read_text().splitlines()[1:] if reports else ():
    if line.startswith('Memory Space'):   # the next memory space (host, ...) after HBM's, the default
      break
    row = _REPORT_ROW.match(line)
    if row:
      rows.append({'bytes': round(float(row.group(1)) * _UNITS.get(row.group(2), 1)),
                   'values': int(row.group(3)), 'shapes': row.group(4).strip()})
  return rows[:count]


def check(config, topology: Topology) -> dict[str, Any]:
  """Compiles the MPL step for `topology`; returns a report with `RESULT_KEYS` (see `format_report`). Raises MplError
  on user errors."""
  devices = topology_devices(topology)
  start = time.perf_counter()
  lowered, info = lower_mpl_step(config, devices)
  result = dict.fromkeys(RESULT_KEYS)
  result.update(
      schema=JSON_SCHEMA, topology=topology.name, libtpu_topology=topology.libtpu_topology,
      num_slices=topology.num_slices, device_kind=devices[0].device_kind, num_devices=len(devices),
      num_hosts=len({d.process_index for d in devices}), workload=info, lower_seconds=time.perf_counter() - start,
      hbm_bytes_per_device=topology.spec.hbm_bytes_per_device, largest_buffers=[])
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix='compile_check_') as dump_dir:
    try:
      compiled = lowered.compile(compiler_options={'xla_dump_to': dump_dir,
                                                   'xla_dump_hlo_module_re': '.*guarded_step.*'})
    except Exception as e:  # pylint: disable=broad-except  # XLA raises JaxRuntimeError; OOM is an answer here
      message = _out_of_memory(e)
      if message is None:
        raise
      compiled = None
      result['compiler_message'] = _first_line(e)
      for pattern in OOM_PATTERNS:
        found = pattern.search(message)
        if found:
          result['compiler_required'], result['compiler_available'] = found.groups()
          break
    result['compile_seconds'] = time.perf_counter() - start
    result['largest_buffers'] = largest_buffers(dump_dir)
  if compiled is None:
    result['fits'] = False
    return result
  result['memory'] = memory_report(compiled, topology.spec.hbm_bytes_per_device)
  result['fits'] = result['memory']['fits']
  result['flops_per_device'] = workload.xla_flops(compiled)
  result['flops_per_step'] = result['flops_per_device'] * len(devices)
  return result


def _gib(n: float) -> str:
  """Bytes in GiB, or MiB below 1 GiB (small test workloads)."""
  return f'{n / GiB:.2f} GiB' if n >= GiB or n == 0 else f'{n / 2**20:.2f} MiB'


def format_report(result: dict[str, Any]) -> str:
  w = result['workload']
  mesh = ' x '.join(f'{axis}={size}' for axis, size in w['mesh'].items())
  per_device = w['examples_per_step'] / (w['mesh']['data'] * w['mesh']['fsdp'])
  lines = [
      f"topology {result['topology']} ({result['libtpu_topology']}, {result['num_slices']} slice(s)): "
      f"{result['num_devices']} x {result['device_kind']} on {result['num_hosts']} host(s), "
      f"{_gib(result['hbm_bytes_per_device'])} HBM per device",
      f"mesh {mesh}",
      f"MPL step ({w['feedback']}): teacher {w['teacher']} ({w['parameters']['teacher'] / 1e6:.1f}M params, remat "
      f"{w['remat']['teacher']}), student {w['student']} ({w['parameters']['student'] / 1e6:.1f}M, remat "
      f"{w['remat']['student']}), {w['dtype']}, "
      f"B={w['batch_size']} labeled + 2 x {w['batch_size'] * w['uda_ratio']} unlabeled at "
      f"{'x'.join(map(str, w['input_shape']))} = {w['examples_per_step']} examples/step, "
      f"{per_device:g} per batch shard",
      f"training state {_gib(w['state_bytes'])} in all, {_gib(w['state_bytes_per_device'])} per device; "
      f"batch {_gib(w['batch_bytes_per_device'])} per device",
      f"lowered in {result['lower_seconds']:.1f} s, compiled in {result['compile_seconds']:.1f} s",
  ]
  buffers = ', '.join(f"{_gib(b['bytes'])} ({_shapes(b['shapes'])})" for b in result['largest_buffers'])
  if result['memory'] is not None:
    m = result['memory']
    lines += [
        f"per-device memory: arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
        f"({_gib(m['aliased'])} of them in donated arguments), temporaries {_gib(m['temporaries'])}, code "
        f"{_gib(m['generated_code'])}; total {_gib(m['total'])} of {_gib(m['hbm'])} HBM "
        f"({100 * m['total'] / m['hbm']:.0f}%)",
        f"FLOPs per step: {result['flops_per_device']:.4g} per device, {result['flops_per_step']:.4g} on all "
        f"{result['num_devices']} devices",
        f"largest buffers: {buffers or 'not reported'}",
        'fits: ' + ('yes' if result['fits'] else f'NO, does not fit: {_total_over_hbm(m)}; largest buffers: {buffers}'),
    ]
  else:
    lines += ['FLOPs per step: not available (XLA stops before its cost analysis when memory does not fit)',
              f"fits: NO, does not fit: {result['compiler_message'].rstrip('.')}"
              + (f'; largest buffers: {buffers}' if buffers else '')]
  return '\n'.join(lines)


def _total_over_hbm(memory) -> str:
  return f"{_gib(memory['total'])} per device, over the {_gib(memory['hbm'])} of HBM"


def _shapes(shapes: str, keep: int = 2) -> str:
  """The first `keep` shapes of an allocation's list (a long list is values reusing the buffer over the step)."""
  parts = shapes.split(', ')
  return ', '.join(parts[:keep]) + (f', +{len(parts) - keep} more' if len(parts) > keep else '')


# ---- command line ------------------------------------------------------------------------------------------------


def _main():
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'Experiment config file, e.g. configs/imagenet.py; override fields with --config.x=y '
      '(--config.mesh.fsdp=16 ...).', lock_config=True)
  topology_flag = flags.DEFINE_string('topology', None, 'TPU slice: v4-32, v5p-64, v5e-16, v6e-256, v3-32, or '
                                      'generation:AxBxC in chips.')
  slices_flag = flags.DEFINE_integer('num_slices', 1, 'Slices joined over the data-centre network (multislice); '
                                     'the mesh data axis is split over them.')
  json_flag = flags.DEFINE_bool('json', False, 'Print one JSON object instead of the report.')
  flags.mark_flags_as_required(['config', 'topology'])

  def main(argv):
    errors.no_positional_arguments(argv)
    with errors.one_line_user_errors():
      topology = parse_topology(topology_flag.value, slices_flag.value)
      result = check(config_flag.value, topology)
    print(json.dumps(result, indent=1, sort_keys=True) if json_flag.value else format_report(result), flush=True)
    sys.exit(0 if result['fits'] else 1)

  app.run(main)


if __name__ == '__main__':
  _main()
