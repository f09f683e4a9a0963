"""The MPL workload of a config, and what XLA says one compiled step of it costs.

The workload is what a config asks the devices to do: the teacher and student networks (Pham et al., Sec. 2: two
networks, the student the teacher's architecture unless `config.student_model` names another), the shape of one
example, and the MPL batch (B labeled examples, two views of mu B unlabeled ones). `train`, the experiments,
`benchmark` and `compile_check` all build it here. The cost helpers read XLA's own analyses of a compiled
executable: FLOPs from its cost analysis, bytes from its memory analysis.

Like the rest of the core this module imports neither TensorFlow nor ml_collections: a config is read by attribute.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from meta_pseudo_labels import models
from meta_pseudo_labels.models import reduced_teacher


def student_model_config(config):
  """The student's model config: `config.student_model` when it names a model, else the teacher's `config.model`."""
  return config.student_model if getattr(config.student_model, 'name', '') else config.model


def model_pair(config):
  """(teacher, student) Flax modules of `config.model` / `student_model_config(config)`, for the config's classes and
  BatchNorm grouping."""
  create = functools.partial(models.create_model, num_classes=config.dataset.num_classes,
                             bn_group_size=config.batch_norm_group_size)
  return create(config.model), create(student_model_config(config))


def input_shape(config) -> tuple[int, ...]:
  """Shape of one example, from the config alone: [2] points for TwoMoon, else square RGB images of
  `dataset.image_size` (the input pipeline's `input_shape` also knows the width of vectors read from a .npz)."""
  if config.dataset.source == 'two_moons':
    return (2,)
  return (config.dataset.image_size, config.dataset.image_size, 3)


def is_reduced(config) -> bool:
  """Reduced MPL (App. E): the teacher is T_R on stored targets (`mpl.teacher='reduced'`)."""
  return config.method == 'mpl' and getattr(config.mpl, 'teacher', 'network') == 'reduced'


def synthetic_batch(config, seed: int = 0) -> dict[str, jax.Array]:
  """A global MPL batch of the config's shapes (what `input_pipeline` yields summed over hosts), random values:
  B labeled examples and two views of mu B unlabeled ones; for Reduced MPL the strong view and the stored targets
  of the large teacher (`reduced.top_k` classes per example; the batch `teacher_targets.joined_batches` makes)."""
  labeled, unlabeled = config.batch_size, config.batch_size * config.uda_ratio
  shape = input_shape(config)
  keys = jax.random.split(jax.random.key(seed), 5)
  batch = {
      'labeled_image': jax.random.normal(keys[0], (labeled, *shape), jnp.float32),
      'labeled_label': jax.random.randint(keys[1], (labeled,), 0, config.dataset.num_classes, jnp.int32),
      'unlabeled_weak': jax.random.normal(keys[2], (unlabeled, *shape), jnp.float32),
      'unlabeled_strong': jax.random.normal(keys[3], (unlabeled, *shape), jnp.float32),
  }
  if is_reduced(config):
    del batch['unlabeled_weak']
    logits = jax.random.normal(keys[4], (unlabeled, config.dataset.num_classes), jnp.float32)
    batch['unlabeled_targets'] = reduced_teacher.top_k_targets(logits, config.reduced.top_k)
  return batch


def abstract_batch(config) -> dict[str, jax.ShapeDtypeStruct]:
  """`synthetic_batch`'s shapes and dtypes, nothing allocated (for lowering a step)."""
  return jax.eval_shape(lambda: synthetic_batch(config))


# ---- what a compiled step costs -----------------------------------------------------------------------------


def tree_bytes(tree) -> int:
  """Bytes of all the arrays (or `jax.ShapeDtypeStruct`s) of a pytree."""
  return int(sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


def shard_bytes(tree, shardings) -> int:
  """Bytes one device holds of a pytree laid out by `shardings` (its largest shard per array)."""
  return int(sum(math.prod(s.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                 for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


def parameter_count(params) -> int:
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def xla_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable from XLA's cost analysis (a dict, or a list of one per program).

  For an SPMD program these are the FLOPs of one device's program."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    return float(sum(part.get('flops', 0.0) for part in analysis))
  return float(analysis.get('flops', 0.0)) if analysis else 0.0


def memory_stats(compiled) -> dict[str, int]:
  """Per-device bytes of one call of a compiled executable: its peak and the parts it is made of.

  peak = max(arguments + outputs - aliased + temporaries + generated code, the backend's reported peak).

  The sum is every buffer the runtime holds during the call: the arguments; the outputs, less those written into
  a donated argument's buffer (`aliased`); the temporaries, which XLA's buffer assignment has already packed by
  liveness into one block of `temp_size` allocated for the whole call; and the program itself, which an
  accelerator loads into device memory next to the data (`compile_check` counts it against a TPU's HBM). The
  backend's own `peak_memory_in_bytes` is taken where it says more, and never where it says less: XLA:CPU's leaves
  the temporaries out (jax 0.10.2: 31 MiB reported for an MPL step with 2.6 GiB of temporaries), so a smaller
  reported figure is a gap in the report, not a saving. The result bounds the step's memory from above, which is
  the side a "does it fit" question must err on.
  """
  stats = compiled.memory_analysis()
  part = lambda name: int(getattr(stats, name, 0) or 0)
  parts = dict(argument_bytes=part('argument_size_in_bytes'), output_bytes=part('output_size_in_bytes'),
               alias_bytes=part('alias_size_in_bytes'), temp_bytes=part('temp_size_in_bytes'),
               generated_code_bytes=part('generated_code_size_in_bytes'))
  live = (parts['argument_bytes'] + parts['output_bytes'] - parts['alias_bytes'] + parts['temp_bytes']
          + parts['generated_code_bytes'])
  reported = part('peak_memory_in_bytes')
  return dict(peak_bytes=max(live, reported), reported_peak_bytes=reported, **parts)
