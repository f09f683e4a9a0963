"""compile_check: topology names, the real MPL step compiled for a small TPU topology on this CPU-only machine
(libtpu's compiler, no TPU), its memory and FLOPs, "does not fit" for a step larger than HBM, and one-line errors.

The compile tests need libtpu (`pip install -e '.[tpu]'`) and are skipped without it; the name parsing and the
missing-libtpu message are checked either way. Workload: TwoMoon's MLP through the MPL step (compiles in seconds).
"""

import pathlib
import subprocess
import sys

import pytest

from configs import imagenet
from configs import two_moons
from meta_pseudo_labels import compile_check
from meta_pseudo_labels import errors
from meta_pseudo_labels.execution import sharding
from meta_pseudo_labels.run import config_validation

requires_libtpu = pytest.mark.skipif(
    not compile_check.libtpu_available(),
    reason="libtpu not installed (pip install -e '.[tpu]'): XLA's TPU compiler lives in it")


def small_config(batch_size=8):
  config = two_moons.get_config()
  config.experiment = 'train'
  config.batch_size = batch_size
  return config


@pytest.mark.parametrize('name, libtpu_topology, num_devices', [
    ('v4-8', 'v4:2x2x1', 4), ('v4-32', 'v4:2x2x4', 16), ('v4-64', 'v4:2x4x4', 32), ('v4-2048', 'v4:8x8x16', 1024),
    ('v5p-128', 'v5:4x4x4', 64), ('v5e-16', 'v5e:4x4', 16), ('v5litepod-8', 'v5e:2x4', 8),
    ('v6e-256', 'v6e:16x16', 256), ('v3-2048', 'v3:32x32', 2048), ('v5p:4x4x12', 'v5:4x4x12', 192),
])
def test_parse_topology(name, libtpu_topology, num_devices):
  topology = compile_check.parse_topology(name)
  assert topology.libtpu_topology == libtpu_topology
  assert topology.num_devices == num_devices


@pytest.mark.parametrize('name, message', [
    ('v9-8', 'not a TPU slice of a known generation'), ('h100-8', 'not a TPU slice'),
    ('v4-12', '6 chips is not a power of two'), ('v4-7', r'counts TensorCores \(2 per v4 chip\)'),
    ('v4:2x2', 'a v4 chip mesh has 3 dimensions'),
])
def test_bad_topology_is_a_config_error(name, message):
  with pytest.raises(errors.ConfigError, match=message):
    compile_check.parse_topology(name)


def test_without_libtpu_one_line_error(monkeypatch):
  monkeypatch.setitem(sys.modules, 'libtpu', None)   # how Python spells "not importable"
  assert not compile_check.libtpu_available()
  with pytest.raises(errors.ConfigError, match=r"libtpu is not installed.*pip install -e '\.\[tpu\]'"):
    compile_check.topology_devices(compile_check.parse_topology('v4-8'))


@requires_libtpu
def test_mpl_step_compiles_for_a_tpu_topology():
  result = compile_check.check(small_config(), compile_check.parse_topology('v5e-4'))
  assert result['num_devices'] == 4 and result['device_kind'].startswith('TPU v5')
  assert result['workload']['mesh'] == {'data': 4, 'fsdp': 1, 'spatial': 1}
  memory = result['memory']
  assert result['fits'] and 0 < memory['total'] < memory['hbm'] == 16 * 2**30
  assert memory['arguments'] > 0 and memory['temporaries'] > 0
  assert memory['aliased'] > 0   # the donated state is updated in place
  # 4 devices each run the per-device program; two MLPs on 120 examples are some 1e4 to 1e7 FLOPs per device.
  assert 1e4 < result['flops_per_device'] < 1e7
  assert result['flops_per_step'] == pytest.approx(4 * result['flops_per_device'])
  report = compile_check.format_report(result)
  assert 'fits: yes' in report and 'per-device memory' in report
  assert set(result) == set(compile_check.RESULT_KEYS) and result['largest_buffers']
  assert result['workload']['remat'] == {'teacher': 'none', 'student': 'none'}


@requires_libtpu
def test_too_large_a_step_does_not_fit():
  config = small_config(batch_size=2**24)   # 250M examples through two MLPs on one 16 GiB chip
  config.mesh.data = 1
  result = compile_check.check(config, compile_check.parse_topology('v5e-1'))
  assert result['fits'] is False
  assert result['memory'] is None and 'RESOURCE_EXHAUSTED' in result['compiler_message']
  assert set(result) == set(compile_check.RESULT_KEYS)   # the same keys as a step that fits: --json compares
  # The largest allocations come from XLA's buffer assignment even though the compile failed: 250M x 8 floats.
  assert result['largest_buffers'][0]['bytes'] >= 2**24 * 15 * 8 * 4
  last = compile_check.format_report(result).splitlines()[-1]
  assert last.startswith('fits: NO, does not fit: ') and '; largest buffers: 7.50 GiB (f32[' in last


def test_largest_buffers_read_from_the_memory_usage_report(tmp_path):
  (tmp_path / 'module_0001.jit_guarded_step.cl_1.after_optimizations-memory-usage-report.txt').write_text(
      'Memory Space: default (color=0)\nTotal bytes: 27785425920 (25.88GiB)\n'
      '  cumulative_size;       size;       offset; used_by_n_values; shapes_list\n'
      '    7.50GiB( 22%);    7.50GiB;            0;                1; f32[251658240,8]\n'
      '   15.00GiB( 43%);  448.00MiB;   8053063680;                8; bf16[117440512,2], 2\u00d7f32[251658240,2]\n'
      'Memory Space: host (color=5)\n'
      '    1.00GiB(100%);    1.00GiB;            0;                1; f32[1024,262144]\n')
  assert compile_check.largest_buffers(str(tmp_path)) == [
      {'bytes': 15 * 2**29, 'values': 1, 'shapes': 'f32[251658240,8]'},
      {'bytes': 448 * 2**20, 'values': 8, 'shapes': 'bf16[117440512,2], 2\u00d7f32[251658240,2]'}]
  assert compile_check.largest_buffers(str(tmp_path / 'missing')) == []


@requires_libtpu
def test_command_line_mesh_error_is_one_line():
  result = subprocess.run(
      [sys.executable, '-m', 'meta_pseudo_labels.compile_check', '--config=configs/two_moons.py',
       '--topology=v5e-4', '--config.mesh.data=3'],
      cwd=pathlib.Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300,
      env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin', 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith('error: mesh: data x fsdp x spatial = data=3')


def test_imagenet_l2_defaults_are_the_papers_layout_and_the_plan_that_fits():
  """configs/imagenet.py's defaults on 2048 TPUv3 cores: 128 x 8 x 2 with `block` remat (docs/SCALING.md)."""
  config = imagenet.get_config()
  assert sharding.mesh_shape(config.mesh, 2048) == (128, 8, 2) and config.model.remat == 'block'
  config_validation.validate(config, 2048)
  for smaller in (imagenet.get_config('b0'), imagenet.get_config('cpu'), imagenet.get_config('l2,cpu')):
    assert (smaller.mesh.fsdp, smaller.mesh.spatial, smaller.model.remat) == (1, 1, 'none')


def _reduced(config):
  config.mpl.teacher = 'reduced'
  config.uda.weight = 0.0
  config.reduced.top_k = 2
  config.reduced.hidden_sizes = (8,)
  return config


def test_reduced_mpl_step_lowers_without_the_large_teacher():
  """Reduced MPL (App. E) through the same lowering, on this machine's CPU devices (no libtpu needed): T_R in the
  teacher's place, the batch without the weak view, with the stored targets."""
  import jax  # pylint: disable=g-import-not-at-top
  full, full_info = compile_check.lower_mpl_step(small_config(), jax.devices())
  reduced, info = compile_check.lower_mpl_step(_reduced(small_config()), jax.devices())
  assert info['teacher'].startswith('reduced') and full_info['teacher'] == 'mlp'
  assert info['parameters']['teacher'] == (2 * 8 + 8) + (8 * 2 + 2)   # T_R: 2 -> 8 -> 2
  assert info['examples_per_step'] == 8 * (1 + 7) < full_info['examples_per_step']
  assert reduced.compile() is not None and full is not None


def test_imagenet_reduced_configs_are_valid():
  from configs import imagenet_reduced  # pylint: disable=g-import-not-at-top
  for arg, devices in (('', 512), ('l2', 2048)):   # B7: data parallel on 512 devices; L2: the 128 x 8 x 2 layout
    config = imagenet_reduced.get_config(arg)
    assert config.mpl.teacher == 'reduced' and config.uda.weight == 0
    config_validation.validate(config, devices)
  assert imagenet_reduced.get_config().model.name == 'efficientnet-b7'
  assert imagenet_reduced.get_config('l2').model.remat == 'block'
