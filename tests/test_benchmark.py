"""The benchmark harness measures what it says, and the benchmark runs end to end in a tiny configuration.

Speeds are never asserted (the machine is shared): only that every field is present, positive and finite, and that
the measurements mean what they claim (FLOPs of a known matmul, donation seen in the memory analysis).
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from meta_pseudo_labels import benchmark

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_xla_flops_counts_two_per_multiply_add():
  a = jnp.ones((64, 32), jnp.float32)
  b = jnp.ones((32, 16), jnp.float32)
  assert benchmark.compiled_flops(jnp.matmul, a, b) == 2 * 64 * 32 * 16


def test_measure_step_sees_donation_and_feeds_the_state_back():
  def step(state, x):
    return {'w': state['w'] + x, 'count': state['count'] + 1}, jnp.sum(x)

  state = {'w': jnp.zeros((128, 128), jnp.float32), 'count': jnp.zeros((), jnp.int32)}
  x = jnp.ones((128, 128), jnp.float32)
  record = benchmark.measure_step(step, state, x, examples=128, warmup=1, repeats=3)
  assert record['compile_seconds'] > 0 and record['step_seconds'] > 0
  assert record['examples_per_second'] == pytest.approx(128 / record['step_seconds'])
  memory = record['memory']
  assert memory['state_bytes'] == 128 * 128 * 4 + 4
  assert memory['alias_bytes'] >= 128 * 128 * 4       # the donated state is reused for the new state
  assert 0.99 <= memory['donated_fraction'] <= 1.0
  assert memory['peak_bytes'] > 0
  assert record['hlo']['host_transfers'] == 0
  assert state['w'].is_deleted()                      # donated: the caller's buffer was consumed


def test_peak_memory_counts_the_temporaries():
  def step(state, x):
    table = jnp.sort(jnp.outer(x, x), axis=0)          # a [1024, 1024] float32 temporary (4 MiB): a sort's
    return state + jnp.sum(table[::2]), x              # operand and result are materialised, never fused away

  record = benchmark.measure_step(step, jnp.zeros(()), jnp.ones((1024,)), examples=1, warmup=0, repeats=1)
  memory = record['memory']
  assert memory['temp_bytes'] >= 1024 * 1024 * 4
  assert memory['peak_bytes'] >= memory['temp_bytes'] + memory['argument_bytes']


def test_host_callbacks_are_counted_as_host_transfers():
  def step(state, x):
    jax.debug.callback(lambda v: None, x)
    return state + x, x

  record = benchmark.measure_step(step, jnp.zeros(4), jnp.ones(4), examples=4, warmup=0, repeats=1)
  assert record['hlo']['host_transfers'] > 0


def test_matmul_reference_is_positive_and_finite():
  record = benchmark.matmul_reference(128, warmup=1, repeats=2)
  assert record['flops'] == 2 * 128 ** 3
  assert math.isfinite(record['flops_per_second']) and record['flops_per_second'] > 0
  # Process CPU time counts every thread, so it is at least a small part of the wall time (not 0, not NaN).
  assert math.isfinite(record['flops_per_cpu_second']) and record['cpu_seconds'] > 0


TINY_CONFIG = '''
from configs import common


def get_config():
  """A TwoMoon-sized MPL workload: the MLP, 4 labeled and 8 unlabeled points, UDA on."""
  config = common.get_base_config()
  config.dataset.source = 'two_moons'
  config.dataset.num_classes = 2
  config.dataset.num_labeled = 4
  config.dataset.num_validation = 0
  config.dataset.augment = 'none'
  config.model.name = 'mlp'
  config.model.dropout_rate = 0.0
  config.batch_size = 4
  config.uda_ratio = 2
  config.uda.weight = 1.0
  return common.shrink_for_cpu(config, steps=10)
'''

STEPS = ('teacher_supervised', 'student_supervised', 'mpl_exact', 'mpl_hard_dot', 'mpl_hard_taylor')


def _positive_finite(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_benchmark_command_prints_every_field(tmp_path):
  config_path = tmp_path / 'tiny.py'
  config_path.write_text(TINY_CONFIG)
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)
  completed = subprocess.run(
      [sys.executable, '-m', 'meta_pseudo_labels.benchmark', f'--config={config_path}', '--json', '--warmup=1',
       '--repeats=2', '--matmul_size=128', '--pipeline_batches=3'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(completed.stdout)

  assert result['device']['platform'] == 'cpu'
  assert result['device']['host_cpu_model']
  load = result['machine_load']
  assert load['quiet'] in (True, False) and len(load['load_before']) == 3 and len(load['load_after']) == 3
  assert bool(load['warning']) == (not load['quiet'])
  assert result['workload']['batch_size'] == 4 and result['workload']['uda_ratio'] == 2
  assert _positive_finite(result['matmul']['flops_per_second'])
  assert _positive_finite(result['matmul']['flops_per_cpu_second'])
  assert set(result['steps']) == set(STEPS)
  for name, record in result['steps'].items():
    for field in ('compile_seconds', 'compile_cpu_seconds', 'step_seconds', 'step_cpu_seconds',
                  'examples_per_second', 'flops', 'flops_per_second', 'flops_per_cpu_second'):
      assert _positive_finite(record[field]), (name, field, record[field])
    assert _positive_finite(record['memory']['peak_bytes']), name
    assert record['memory']['donated_fraction'] > 0.9, name   # the state is updated in place
    assert record['hlo']['host_transfers'] == 0, name
  assert result['steps']['mpl_hard_taylor']['examples_per_step'] == 4 + 8
  # The PyTorch reference exists for WideResNet pairs only: for the MLP it says why it did not run.
  assert 'WideResNet' in result['torch_reference']['skipped'] or 'torch' in result['torch_reference']['skipped']
  assert result['steps']['student_supervised']['examples_per_step'] == 8

  floor = result['floor_flops']
  assert floor['total'] == pytest.approx(floor['teacher_forward_backward'] + floor['student_forward_backward']
                                         + 2 * floor['student_forward_labeled'])
  assert set(result['mpl']) == {'exact', 'hard_dot', 'hard_taylor'}
  for mode, ratios in result['mpl'].items():
    for field in ('flops_over_floor', 'time_over_supervised', 'cpu_time_over_supervised',
                  'flops_per_second_over_matmul', 'flops_per_cpu_second_over_matmul', 'flops_over_hard_taylor',
                  'time_over_hard_taylor', 'cpu_time_over_hard_taylor'):
      assert _positive_finite(ratios[field]), (mode, field)
  # The exact mode differentiates through the student's update: strictly more work than hard_taylor.
  assert result['mpl']['exact']['flops_over_hard_taylor'] > 1.0

  pipeline = result['input_pipeline']
  if 'skipped' not in pipeline:
    assert _positive_finite(pipeline['examples_per_second'])
    assert _positive_finite(pipeline['over_step'])

  # The text report (the command without --json) renders the same result: one row per step and per mode.
  report = benchmark.format_report(result).splitlines()
  for name in STEPS:
    assert sum(line.startswith(name + ' ') for line in report) == 1, name
  for mode in ('exact', 'hard_dot', 'hard_taylor'):
    assert sum(line.startswith(mode + ' ') for line in report) == 1, mode


def test_a_busy_or_busier_machine_is_flagged_and_a_quiet_one_is_not(monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda _: {0, 1}, raising=False)
  assert benchmark.machine_load([0.2, 0.3, 0.3], [0.4, 0.3, 0.3]) == dict(
      load_before=[0.2, 0.3, 0.3], load_after=[0.4, 0.3, 0.3], cpus=2, quiet=True, warning='')
  busy = benchmark.machine_load([1.5, 1.0, 1.0], [1.5, 1.0, 1.0])      # over 0.5 per CPU before
  rising = benchmark.machine_load([0.1, 0.1, 0.1], [1.3, 0.5, 0.2])    # others started during the run
  for record in (busy, rising):
    assert record['quiet'] is False and record['warning'].startswith('NOT A QUIET MACHINE')
    assert 'WARNING: NOT A QUIET MACHINE' in benchmark.load_line(record)
  assert benchmark.machine_load(None, None)['quiet'] is None


def test_the_run_s_own_threads_do_not_make_a_quiet_machine_look_busy(monkeypatch):
  """The 2026-12-06 WRN-28-2 run: 1-min load 0.67 before, 1.76 after two minutes on both of 2 cores, nothing else
  running. Its own threads explain the rise (about 1.7); a further 1.2 would be other processes."""
  monkeypatch.setattr(os, 'sched_getaffinity', lambda _: {0, 1}, raising=False)
  monkeypatch.setattr(benchmark, 'usage_now', lambda: (1120.0, 734.0))
  alone = benchmark.machine_load([0.67, 1.28, 1.56], [1.76, 1.48, 1.60], usage_before=(1000.0, 500.0))
  assert alone['quiet'] is True and alone['warning'] == '' and alone['own_load'] == pytest.approx(1.11, abs=0.01)
  assert benchmark.machine_load([0.67, 1.28, 1.56], [1.76, 1.48, 1.60])['quiet'] is False   # without the usage
  others = benchmark.machine_load([0.67, 1.28, 1.56], [2.95, 1.9, 1.7], usage_before=(1000.0, 500.0))
  assert others['quiet'] is False and "beyond the 1.11 this run's own threads explain" in others['warning']


def test_cpu_model_is_named():
  assert isinstance(benchmark.cpu_model(), str) and benchmark.cpu_model()


def test_the_accelerator_command_imports_no_tensorflow(tmp_path):
  """`--pipeline_batches=0` (the GPU command of docs/PERFORMANCE.md) times synthetic batches only: no TensorFlow."""
  config_path = tmp_path / 'tiny.py'
  config_path.write_text(TINY_CONFIG)
  code = (f'import sys; sys.argv = ["benchmark", "--config={config_path}", "--feedback_modes=hard_taylor", '
          '"--warmup=0", "--repeats=1", "--matmul_size=64", "--pipeline_batches=0", "--json"]\n'
          'from meta_pseudo_labels import benchmark\n'
          'try:\n  benchmark._main()\nexcept SystemExit:\n  pass\n'
          'assert "tensorflow" not in sys.modules, "tensorflow was imported"\nprint("NO_TF")')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  completed = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=240, check=False)
  assert completed.returncode == 0 and 'NO_TF' in completed.stdout, completed.stderr[-3000:]


def test_end_to_end_times_the_training_program_and_its_loop(monkeypatch):
  """`--end_to_end`: the real program (main, in a child) on random small images, steps/s and the loop's parts."""
  from configs import cifar10_4k  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(REPO_ROOT)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]))
  overrides = dict(num_train_steps=2, batch_size=8, uda_ratio=1, eval_batch_size=8, **{
      'dataset.image_size': 8, 'dataset.num_labeled': 10, 'dataset.num_validation': 8, 'dataset.num_unlabeled': 16,
      'dataset.cutout_size': 4, 'dataset.pad_crop': 1, 'finetune.num_steps': 0})
  config = cifar10_4k.get_config('cpu')
  for field, value in overrides.items():
    *parents, leaf = field.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  args = ['--config=configs/cifar10_4k.py:cpu'] + [f'--config.{field}={value}' for field, value in overrides.items()]
  result = benchmark.end_to_end(config, args, methods=['supervised'])
  record = result['runs']['supervised/as_given']
  assert record['steps'] == 2 and record['speedup'] == 1.0
  assert _positive_finite(record['steps_per_second']) and _positive_finite(record['cpu_seconds'])
  parts = set(record['loop_seconds']['supervised'])
  assert {'compile', 'sync', 'input', 'transfer', 'evaluation', 'checkpoint'} <= parts
  assert 'supervised/as_given' in benchmark.format_end_to_end(result)
