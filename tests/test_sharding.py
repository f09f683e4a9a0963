"""Sharded MPL steps equal the single-device step; the mesh, FSDP and batch rules; their one-line errors.

Runs on the 8 fake CPU devices of conftest.py, with a two-convolution BatchNorm net that compiles in seconds (the
registry models are built from the same layers). Equality tolerance: float32, |a - b| <= 1e-5 + 1e-5 |b| on every
leaf of the state after two steps (parameters, BatchNorm statistics, optimizer momentum, EMA, baseline). A
sharded step computes the same sums in another order (per-device partial sums, then a cross-device reduction), so
bitwise equality is not expected; anything from a wrong sharding (per-device BatchNorm statistics, a gradient
averaged over the wrong axis, a missing halo between image strips) is orders of magnitude larger.

In `hard_taylor` mode the teacher's MPL gradient is scaled by h = CE_old - CE_new, a difference of two nearly equal
float32 losses: the reordered sums change h by ~1e-7 absolute, so for a deeper net whose h is small the teacher's
update can differ by ~1e-3 of its size (WRN-10-1: up to 3e-3) while the student and the EMA still agree to 1e-6.
That is float32 cancellation in the estimator, not a sharding error; the `exact` mode has none.
"""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from meta_pseudo_labels import errors
from meta_pseudo_labels import models
from meta_pseudo_labels.execution import sharding
from meta_pseudo_labels.method import mpl
from meta_pseudo_labels.method import train_state
from meta_pseudo_labels.models import layers

ATOL = RTOL = 1e-5
NUM_CLASSES = 10
IMAGE_SIZE = 8


def small_config(feedback='exact', batch_norm_group_size=0, model='tiny_conv'):
  """Teacher and student on 8x8 images, 8 labeled + 8 unlabeled examples, learning rates on from step 0."""
  config = common.get_base_config()
  config.model.name = model
  config.model.dropout_rate = 0.0  # dropout masks depend on the sharding of the rng draws, not what is tested
  config.dataset.image_size = IMAGE_SIZE
  config.batch_size = 8
  config.uda_ratio = 1
  config.mpl.feedback = feedback
  config.mpl.pseudo_labels = 'soft' if feedback == 'exact' else 'sampled'
  config.uda.ramp_steps = 1
  config.num_train_steps = 10
  config.batch_norm_group_size = batch_norm_group_size
  for optimizer in (config.teacher_optimizer, config.student_optimizer):
    optimizer.warmup_steps = optimizer.wait_steps = 0
    optimizer.learning_rate = 0.1
  return config


def synthetic_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  labeled, unlabeled = config.batch_size, config.batch_size * config.uda_ratio
  image = lambda n: rng.normal(size=(n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  return {'labeled_image': image(labeled), 'labeled_label': rng.integers(0, NUM_CLASSES, labeled).astype(np.int32),
          'unlabeled_weak': image(unlabeled), 'unlabeled_strong': image(unlabeled)}


class TinyConvNet(layers.Classifier):
  """Two 3x3 convolutions with grouped BatchNorm, the second strided, then a dense head: every op whose sharding
  needs care (batch statistics, halos between image strips, a reduction over space), compiled in seconds."""
  bn_group_size: int = 0

  @nn.compact
  def __call__(self, x, *, train):
    for features, stride in ((16, 1), (32, 2)):
      x = nn.Conv(features, (3, 3), strides=stride, use_bias=False)(x)
      x = nn.relu(layers.BatchNorm(group_size=self.bn_group_size)(x, train=train))
    return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=(1, 2)))


def init_fn(config):
  if config.model.name == 'tiny_conv':
    model = TinyConvNet(bn_group_size=config.batch_norm_group_size)
  else:
    model = models.create_model(config.model, NUM_CLASSES, bn_group_size=config.batch_norm_group_size)
  return functools.partial(train_state.create_mpl_state, teacher_model=model, student_model=model,
                           input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), teacher_optimizer=config.teacher_optimizer,
                           student_optimizer=config.student_optimizer, total_steps=config.num_train_steps)


def run_single_device(config, batches):
  init = init_fn(config)
  state = jax.jit(init)(jax.random.key(0))
  step = jax.jit(functools.partial(mpl.mpl_step, hparams=mpl.MplHparams.from_config(config)))
  for batch in batches:
    state, _ = step(state, batch, jax.random.key(1))
  return state


def run_sharded(config, batches, mesh_config):
  """The way the train loop runs: eval_shape -> jit(init, out_shardings) -> jit(step, in/out shardings, donate)."""
  mesh = sharding.create_mesh(mesh_config)
  init = init_fn(config)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_shardings = sharding.state_shardings(abstract, mesh, mesh_config.fsdp_min_size)
  state = jax.jit(init, out_shardings=state_shardings)(jax.random.key(0))
  global_batches = [sharding.make_global_batch(batch, mesh) for batch in batches]
  batch_shardings = jax.tree.map(lambda x: x.sharding, global_batches[0])
  step = jax.jit(functools.partial(mpl.mpl_step, hparams=mpl.MplHparams.from_config(config)),
                 in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
  for batch in global_batches:
    state, _ = step(state, batch, jax.random.key(1))
  return state, mesh


def assert_states_close(actual, expected):
  actual_leaves = jax.tree_util.tree_leaves_with_path(actual)
  expected_leaves = jax.tree.leaves(expected)
  assert len(actual_leaves) == len(expected_leaves)
  worst = 0.0
  for (path, a), b in zip(actual_leaves, expected_leaves):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL, err_msg=jax.tree_util.keystr(path))
    if a.dtype.kind == 'f' and a.size:
      worst = max(worst, float(np.max(np.abs(a - b))))
  return worst


def mesh_config(data=-1, fsdp=1, spatial=1, fsdp_min_size=2**18):
  return types.SimpleNamespace(data=data, fsdp=fsdp, spatial=spatial, fsdp_min_size=fsdp_min_size)


@pytest.fixture(scope='module')
def batches():
  config = small_config()
  return [synthetic_batch(config, seed) for seed in range(2)]


@pytest.fixture(scope='module')
def single_device_exact(batches):
  return run_single_device(small_config(), batches)


def test_params_really_change(single_device_exact):
  """Guards the equality tests below against a step that changes nothing."""
  initial = jax.jit(init_fn(small_config()))(jax.random.key(0))
  for network in ('teacher', 'student'):
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                         getattr(single_device_exact, network).params, getattr(initial, network).params)
    assert min(jax.tree.leaves(moved)) > 1e-4, network


@pytest.mark.parametrize('mesh_sizes', [
    dict(data=8), dict(fsdp=8), dict(data=4, spatial=2), dict(data=2, fsdp=2, spatial=2),
], ids=lambda sizes: '-'.join(f'{axis}{size}' for axis, size in sizes.items()))
def test_sharded_mpl_step_equals_single_device(mesh_sizes, batches, single_device_exact):
  sizes = {**dict(data=1, fsdp=1, spatial=1), **mesh_sizes}
  state, mesh = run_sharded(small_config(), batches, mesh_config(**sizes, fsdp_min_size=256))
  assert dict(mesh.shape) == sizes
  assert_states_close(state, single_device_exact)
  if sizes['fsdp'] > 1:
    # FSDP really splits the large arrays (parameters, momentum and EMA alike): each device holds 1/fsdp.
    for tree in (state.teacher.params, state.student.opt_state, state.student_ema['params']):
      split = [leaf for leaf in jax.tree.leaves(tree) if leaf.size >= 256]
      assert split
      for leaf in split:
        assert 'fsdp' in leaf.sharding.spec
        assert leaf.addressable_shards[0].data.size * sizes['fsdp'] == leaf.size
  else:
    for leaf in jax.tree.leaves(state):
      assert leaf.sharding.is_fully_replicated


def test_hard_feedback_with_grouped_batchnorm_sharded(batches):
  """hard_taylor feedback, and per-group BatchNorm whose groups of 2 lie within one device, on all three axes."""
  config = small_config(feedback='hard_taylor', batch_norm_group_size=2)
  expected = run_single_device(config, batches)
  state, _ = run_sharded(config, batches, mesh_config(data=2, fsdp=2, spatial=2, fsdp_min_size=256))
  assert_states_close(state, expected)


# ---- the rules themselves ---------------------------------------------------------------------------------------


def test_mesh_shape_resolves_the_free_axis():
  assert sharding.mesh_shape(mesh_config(data=-1, fsdp=2), 8) == (4, 2, 1)
  assert sharding.mesh_shape(mesh_config(data=2, fsdp=-1, spatial=2), 16) == (2, 4, 2)
  assert sharding.mesh_shape(mesh_config(data=8), 8) == (8, 1, 1)


@pytest.mark.parametrize('sizes, message', [
    (dict(data=3, fsdp=2), 'but 8 are available'),
    (dict(data=-1, fsdp=3), 'does not divide the 8 devices'),
    (dict(data=-1, fsdp=-1), 'only one axis may be -1'),
    (dict(data=0), 'mesh.data: 0 is not a positive integer'),
    (dict(data=-1, spatial=2.0), 'mesh.spatial'),
])
def test_mesh_errors_are_one_line(sizes, message):
  with pytest.raises(errors.ConfigError, match=message) as info:
    sharding.create_mesh(mesh_config(**sizes))
  assert '\n' not in str(info.value)


def test_fsdp_spec_rules():
  assert sharding.fsdp_spec((3, 3, 64, 128), 8, 1000) == jax.sharding.PartitionSpec(None, None, None, 'fsdp')
  assert sharding.fsdp_spec((1000, 10), 8, 1000) == jax.sharding.PartitionSpec('fsdp')   # largest divisible dim
  assert sharding.fsdp_spec((1001, 10), 8, 1000) == jax.sharding.PartitionSpec()        # none divisible
  assert sharding.fsdp_spec((128,), 8, 1000) == jax.sharding.PartitionSpec()            # small: replicated
  assert sharding.fsdp_spec((), 8, 0) == jax.sharding.PartitionSpec()                   # scalar
  assert sharding.fsdp_spec((4096, 4096), 1, 0) == jax.sharding.PartitionSpec()         # no fsdp axis


def test_batch_shardings_and_errors():
  mesh = sharding.create_mesh(mesh_config(data=2, fsdp=2, spatial=2))
  specs = jax.tree.map(lambda s: s.spec, sharding.batch_shardings(
      {'image': jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32), 'label': jax.ShapeDtypeStruct((8,), jnp.int32)},
      mesh))
  assert specs == {'image': jax.sharding.PartitionSpec(('data', 'fsdp'), None, 'spatial', None),
                   'label': jax.sharding.PartitionSpec(('data', 'fsdp'))}
  with pytest.raises(errors.ConfigError, match="'label'.*not divisible by the 4 devices"):
    sharding.batch_shardings({'label': jax.ShapeDtypeStruct((6,), jnp.int32)}, mesh)
  with pytest.raises(errors.ConfigError, match="image width of batch array 'image': 15 is not divisible"):
    sharding.batch_shardings({'image': jax.ShapeDtypeStruct((8, 15, 15, 3), jnp.float32)}, mesh)


def test_make_global_batch_single_process_is_the_local_batch():
  mesh = sharding.create_mesh(mesh_config(data=4, spatial=2))
  local = {'image': np.arange(8 * 4 * 4 * 1, dtype=np.float32).reshape(8, 4, 4, 1)}
  global_batch = sharding.make_global_batch(local, mesh)
  np.testing.assert_array_equal(np.asarray(global_batch['image']), local['image'])
  assert global_batch['image'].addressable_shards[0].data.shape == (2, 4, 2, 1)
