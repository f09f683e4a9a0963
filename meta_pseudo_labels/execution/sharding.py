"""Device mesh, state and batch shardings, and global batches from host-local data (jit + jax.sharding).

The paper trains EfficientNet-L2 at 512x512 on 2048 TPUv3 cores as 128 replicas x 16 cores, the batch split over
replicas, the weights split 16 ways and the images split into strips (Pham et al. 2021, Sec. 4 and App. C). The
same three kinds of parallelism are the three axes of one mesh here:

- `data`: the global batch is split over it; parameters are replicated (plain data parallelism).
- `fsdp`: the batch is split over it as well, and every large array of the training state (parameters, optimizer
  slots, the student's EMA) is split along one of its dimensions, so each device holds 1/fsdp of it; XLA gathers
  a layer's weights when it is used and reduce-scatters its gradient (fully sharded data parallelism).
- `spatial`: the image width is split over it (strips), for inputs too large for one device; XLA's SPMD
  partitioner exchanges the halos convolutions need.

Everything is jit-with-shardings (the pjit line): the caller jits a step with `in_shardings`/`out_shardings` from
this module and XLA inserts the collectives. Under jit, a mean over the batch axis is a mean over the *global*
batch: the losses, the gradients and BatchNorm statistics (`batch_norm_group_size == 0`) are those of one device
holding the whole batch, which is what makes a sharded step equal to the single-device step up to the order of
floating-point reductions. `batch_norm_group_size == n` (the paper's `batch_norm_batch_size`) normalises groups of
n consecutive examples instead (see `models/layers.BatchNorm`); docs/SCALING.md has the details.

Multi-host: each process feeds only its slice of every global batch (`make_global_batch`); devices are ordered so
that process i's devices hold rows [i B/n, (i+1) B/n) on a CPU or GPU cluster. On TPU, `jax.make_mesh` may order a
host's devices non-contiguously along the batch; `jax.make_array_from_process_local_data` then places the host's
rows on its devices in order, so the global batch is a permutation of the single-host one (no effect on the
means; it only changes which examples share a group under grouped BatchNorm).
"""

from typing import Any, Optional, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from meta_pseudo_labels import errors

MESH_AXES = ('data', 'fsdp', 'spatial')
BATCH_AXES = ('data', 'fsdp')   # the batch dimension is split over both (FSDP is data parallel too)
SPATIAL_AXIS = 'spatial'
FSDP_AXIS = 'fsdp'
IMAGE_WIDTH_DIM = 2             # NHWC


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves `mesh.data/fsdp/spatial` (one of them may be -1: all devices the others leave) to sizes."""
  sizes = {axis: getattr(mesh_config, axis) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
      raise errors.ConfigError(f'mesh.{axis}: {size!r} is not a positive integer or -1 (all remaining devices)')
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise errors.ConfigError(f'mesh: only one axis may be -1, got {", ".join("mesh." + a for a in free)} = -1')
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if free:
    if num_devices % fixed:
      raise errors.ConfigError(
          f'mesh: the fixed axes ({_describe(sizes)}) use {fixed} devices, which does not divide the '
          f'{num_devices} devices available; choose sizes whose product divides {num_devices}')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise errors.ConfigError(
        f'mesh: data x fsdp x spatial = {_describe(sizes)} = {fixed} devices, but {num_devices} are available; '
        'make the product equal the device count or set one axis to -1 (all remaining devices)')
  return tuple(int(sizes[axis]) for axis in MESH_AXES)


def _describe(sizes: dict) -> str:
  return ' x '.join(f'{axis}={size}' for axis, size in sizes.items())


def create_mesh(mesh_config: Any, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The ('data', 'fsdp', 'spatial') mesh over `devices` (default: all devices of all processes).

  Axes are `AxisType.Auto` (GSPMD propagation, the pjit semantics the steps are written for). Across several TPU
  slices (devices with more than one `slice_index`), the `data` axis is split over slices, the slow data-centre
  network, and the rest of the mesh stays within a slice's ICI (`create_hybrid_device_mesh`). `devices` lets the
  AOT compile check build the mesh of a TPU topology it does not have.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if num_slices > 1:
    data = shape[0]
    if data % num_slices:
      raise errors.ConfigError(
          f'mesh.data: {data} is not a multiple of the {num_slices} TPU slices; the data axis spans the slices, '
          'so make mesh.data a multiple of the slice count')
    device_array = mesh_utils.create_hybrid_device_mesh(
        (data // num_slices,) + shape[1:], (num_slices, 1, 1), devices)
    mesh = Mesh(device_array, MESH_AXES, axis_types=axis_types)
  else:
    try:
      mesh = jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:  # an axis (e.g. spatial=2) is no product of the TPU's physical axes (e.g. 8x8x16)
      device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      mesh = Mesh(device_array, MESH_AXES, axis_types=axis_types)
  _check_spatial_within_process(mesh)
  return mesh


def _check_spatial_within_process(mesh: Mesh) -> None:
  """Hosts feed disjoint batch rows, so the devices sharing rows (the spatial axis) must be on one process."""
  processes = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
  spread = processes.max(axis=-1) != processes.min(axis=-1)
  if spread.any():
    raise errors.ConfigError(
        f'mesh.spatial: {mesh.shape[SPATIAL_AXIS]} spatial partitions span several hosts; each host feeds its own '
        'examples, so choose mesh.spatial no larger than the devices per host '
        f'({len(mesh.local_devices)}) and use mesh.fsdp to split the weights further')


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (scalars, small parameters, rng keys)."""
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, fsdp_min_size: int) -> P:
  """The partition spec of one state array: split its largest dimension divisible by `fsdp_size` over 'fsdp'.

  Arrays with fewer than `fsdp_min_size` elements (biases, BatchNorm scales, counters, small models) stay
  replicated: splitting them saves little memory and costs a collective each. Among equally large divisible
  dimensions the last wins (a conv kernel's output channels). An array with no divisible dimension stays
  replicated.
  """
  if fsdp_size == 1 or not shape or int(np.prod(shape)) < fsdp_min_size:
    return P()
  divisible = [(size, dim) for dim, size in enumerate(shape) if size % fsdp_size == 0]
  if not divisible:
    return P()
  _, dim = max(divisible)
  return P(*([None] * dim + [FSDP_AXIS]))


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp_min_size: int) -> Any:
  """A pytree of `NamedSharding` matching `abstract_state` (from `jax.eval_shape`): FSDP rules, else replicated.

  The same rule covers the parameters, the optimizer state (momentum has the parameters' shapes, so it is split
  the same way), the EMA and BatchNorm statistics; scalars (step, learning-rate counters, the MPL baseline) are
  replicated.
  """
  fsdp_size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(
      lambda leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), fsdp_size, fsdp_min_size)), abstract_state)


def check_config(mesh_config: Any, num_devices: int, batch_sizes: dict[str, int],
                 image_size: Optional[int] = None) -> None:
  """One-line ConfigErrors for a run's mesh before any work: its axes (`mesh_shape`), the image width
  (`image_size`, None for vectors) against mesh.spatial and every global batch ({config field: size}) against the
  data x fsdp devices."""
  data, fsdp, spatial = mesh_shape(mesh_config, num_devices)
  if image_size is not None:
    check_width_divides(image_size, spatial, 'dataset.image_size')
  for field, size in batch_sizes.items():
    check_batch_divides(size, data * fsdp, field)


def check_width_divides(width: int, spatial: int, name: str) -> None:
  """An image's width is split into `spatial` strips: the one statement of that rule, used by `check_config`
  (naming the config field) and by `batch_spec` (any batch a program shards)."""
  if width % spatial:
    raise errors.ConfigError(f'{name}: {width} is not divisible by mesh.spatial={spatial} (the image width is split '
                             f'into that many strips); use a multiple of {spatial} or a smaller mesh.spatial')


def check_batch_divides(size: int, batch_devices: int, name: str) -> None:
  """A global batch is split evenly over the data x fsdp devices: the one statement of that rule, used by
  `check_config` (naming the config field, before any work) and by `batch_spec` (any batch a program shards)."""
  if size % batch_devices:
    raise errors.ConfigError(
        f'{name}: {size} is not divisible by the {batch_devices} devices of the mesh axes data x fsdp; '
        f'use a multiple of {batch_devices} (batch_size, batch_size * uda_ratio, eval_batch_size and '
        'finetune.batch_size all are), or set --config.mesh.data')


def batch_spec(shape: Sequence[int], mesh: Mesh, name: str = 'batch') -> P:
  """Batch dimension over ('data', 'fsdp'); for 4-D NHWC images, the width over 'spatial' when spatial > 1."""
  if not shape:
    raise errors.ConfigError(f'batch array {name!r} is a scalar; every batch array needs a leading batch dimension')
  check_batch_divides(shape[0], mesh.shape['data'] * mesh.shape[FSDP_AXIS], f'batch array {name!r}')
  spatial = mesh.shape[SPATIAL_AXIS]
  if spatial > 1 and len(shape) == 4:
    check_width_divides(shape[IMAGE_WIDTH_DIM], spatial, f'the image width of batch array {name!r}')
    return P(BATCH_AXES, None, SPATIAL_AXIS, None)
  return P(BATCH_AXES)


def batch_shardings(abstract_batch: Any, mesh: Mesh) -> Any:
  """A pytree of `NamedSharding` for a (global) batch: any pytree of arrays or `jax.ShapeDtypeStruct`s."""
  def leaf_sharding(path, leaf):
    return NamedSharding(mesh, batch_spec(np.shape(leaf), mesh, jax.tree_util.keystr(path, simple=True)))
  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_batch)


def with_shardings(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree`'s shapes and dtypes carrying `shardings` (what restoring and lowering take)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def global_batch_shapes(host_local_batch: Any) -> Any:
  """The global batch's `jax.ShapeDtypeStruct`s: host i holds rows [i B/n, (i+1) B/n) of B rows on n hosts, so the
  global shape is the local one with the batch dimension times the process count."""
  process_count = jax.process_count()
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((x.shape[0] * process_count,) + x.shape[1:], x.dtype), host_local_batch)


def make_global_batch(host_local_batch: Any, mesh: Mesh) -> Any:
  """Global `jax.Array`s from this host's slice of every batch array (`input_pipeline` yields the slices; see
  `global_batch_shapes`). One process: the local batch is the global batch.
  """
  shapes = global_batch_shapes(host_local_batch)
  shardings = batch_shardings(shapes, mesh)
  return jax.make_array_from_process_local_data(
      shardings, host_local_batch, jax.tree.map(lambda s: s.shape, shapes))


def stacked_sharding(batch_sharding: NamedSharding) -> NamedSharding:
  """The sharding of `steps` batches stacked on a new leading axis: that axis unsplit, each batch as before."""
  return NamedSharding(batch_sharding.mesh, P(None, *batch_sharding.spec))


def make_global_stacked_batch(host_local_stack: Any, mesh: Mesh) -> Any:
  """`make_global_batch` for several steps' batches stacked on a leading axis, `[steps, B/n, ...]` on each host
  (the loop's several steps per dispatch, `step_builder.TrainStep.multi_step`)."""
  shapes = global_batch_shapes(jax.tree.map(lambda x: x[0], host_local_stack))
  shardings = jax.tree.map(stacked_sharding, batch_shardings(shapes, mesh))
  return jax.make_array_from_process_local_data(
      shardings, host_local_stack, jax.tree.map(lambda x, s: (x.shape[0],) + s.shape, host_local_stack, shapes))
