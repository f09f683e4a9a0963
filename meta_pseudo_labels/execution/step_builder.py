"""The jitted training step: a pure step plus the divergence guard and on-device metric sums, sharded and donated.

`train` runs this step, `compile_check` lowers the very same one for a TPU topology it does not have (the MaxText
pattern: the ahead-of-time check compiles the trainer's own step, not a copy of it). Both get it from
`build_train_step`, so what is checked is what runs.

What one call of the built step does, on the devices, with no host transfer:
- runs `step_fn(state, batch, rng) -> (state, metrics)` (an `mpl.py` step);
- the divergence guard: one flag per `guard_terms` (every metric, then all floating-point arrays of the new state)
  says whether it is finite. With `skip_nonfinite` (`config.on_nonfinite='skip'`) a step with any non-finite term
  keeps every value of the old state and only advances the step counter, so the data moves on past the batch;
  otherwise the new state is kept and the loop stops at its next sync (`on_nonfinite='stop'`, see `train.py`);
- adds the finite steps' metrics to the accumulator's sums and counts finite and non-finite steps, recording the
  first non-finite step and its terms, so the host fetches one small tree per sync point instead of every step's
  metrics.
The state and the accumulator are donated: both are updated in place.

`multi_step` runs several such steps in one call (a loop over batches stacked on a leading axis): one dispatch and
one batch transfer for `steps_per_dispatch` steps, which for small models (TwoMoon's MLP) is most of a step's
wall time. The loop's body is `guarded_step` itself and each step still draws its randomness from
`fold_in(rng, state.step)` (`mpl.py`), so k steps in one call compute what k calls do; XLA:CPU compiles a loop
body with its own fusions, so the two agree to float32 rounding, not bitwise (tests/test_step_builder.py). A run
at a given k is still bitwise reproducible and resumable: which steps share a dispatch depends on the step
numbers only (`train.py`).

On CPU, every executable built here runs its convolutions in XLA's own kernels instead of YNNPACK's
(`compiler_options`; the benchmark compiles with the same options).

Measured on the project's 2-core CPU VM (docs/PERFORMANCE.md, 'CPU speed'): jaxlib 0.10.2 hands every 2-D
float32 convolution with more than 16 channels to YNNPACK, whose kernel for the *filter gradient* (the convolution
of the input with the output gradient, a 32x32 or 16x16 window producing a 3x3 output) runs at 9-19 GFLOP per
CPU-second, a fifth of its forward convolutions. XLA's own (Eigen) convolution kernels run the same filter
gradients 1.6-5x faster and the forward and input-gradient convolutions about as fast, so on CPU the WRN-28-2 MPL
step takes about 0.73x the CPU time with every convolution left to XLA. The option only moves convolutions between
kernel libraries: the HLO, the FLOPs and the results (to float32 rounding) are the same.

Written as a code formulation instead (im2col / shifted slices + one matmul for the filter gradient, or the 2-D
convolution as a 3-D one of unit depth, which YNNPACK does not take), the same convolutions measured slower than
either library's kernels, so the formulation is a per-executable compiler option, not a model change. The option
applies only where the computation runs on CPU; on GPU and TPU `compiler_options` is empty.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from meta_pseudo_labels.execution import sharding

ON_NONFINITE = ('stop', 'skip')        # config.on_nonfinite: what the guard does with a non-finite step
UPDATED_STATE_TERM = 'updated state'   # the guard's name for "the step's new parameters/statistics"

# LibraryFusionType values YNNPACK may take; dots only (without INDIVIDUAL_CONVOLUTION and the default's
# elementwise/reduce fusions around them): see the table in docs/PERFORMANCE.md.
YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
CONVOLUTIONS_IN_XLA = {YNN_FUSION_TYPE: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


@functools.cache
def _supported() -> bool:
  """Whether this jaxlib's XLA:CPU knows the option (it is experimental; a jaxlib without it keeps its default)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CONVOLUTIONS_IN_XLA, backend='cpu').lower(1.0).compile()
  except Exception:  # pylint: disable=broad-except  # an unknown option is INVALID_ARGUMENT, raised as several types
    return False
  return True


def compiler_options(platform: str | None = None) -> dict[str, str]:
  """The options for an executable running on `platform` ('cpu', 'gpu', 'tpu'; None: jax's default backend)."""
  platform = platform or jax.default_backend()
  if platform != 'cpu' or not _supported():
    return {}
  return dict(CONVOLUTIONS_IN_XLA)


def compiler_options_for_mesh(mesh) -> dict[str, str]:
  """The options for an executable on `mesh`'s devices (the device of the computation, not the default one)."""
  return compiler_options(mesh.devices.flat[0].platform)


def guard_terms(metric_names):
  """The quantities the divergence guard checks, in the order of its flags: every metric, then the new state."""
  return sorted(metric_names) + [UPDATED_STATE_TERM]


def _finite_flags(metrics, new_state):
  """One flag per guard term: metrics (losses, gradient norms) and, so that no checkpoint holds an overflowed
  state whose step still had finite losses, all floating-point arrays of the new state."""
  float_leaves = [x for x in jax.tree.leaves(new_state) if jnp.issubdtype(x.dtype, jnp.floating)]
  state_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in float_leaves]))
  return jnp.stack([jnp.isfinite(metrics[name]) for name in sorted(metrics)] + [state_finite])


def guarded_step(step_fn, skip_nonfinite, state, accumulator, batch, rng):
  """`step_fn` plus the divergence guard and metric accumulation (see the module docstring).

  `accumulator`: {'sums': metric sums over finite steps, 'finite_steps', 'nonfinite_steps', 'first_bad_step' (-1:
  none; else the loop's 1-based number of that step, the number a checkpoint after it would carry),
  'first_bad_terms' (one bool per `guard_terms`, at that step)}.
  """
  new_state, metrics = step_fn(state, batch, rng)
  names = sorted(metrics)
  finite_terms = _finite_flags(metrics, new_state)
  finite = jnp.all(finite_terms)
  if skip_nonfinite:
    # Keep every value of the old state; only the step counter advances, so the data moves on past the batch.
    kept = state.replace(step=new_state.step)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
  first = (accumulator['first_bad_step'] < 0) & ~finite
  accumulator = {
      'sums': {name: accumulator['sums'][name] + jnp.where(finite, metrics[name], 0.0) for name in names},
      'finite_steps': accumulator['finite_steps'] + finite.astype(jnp.int32),
      'nonfinite_steps': accumulator['nonfinite_steps'] + (~finite).astype(jnp.int32),
      'first_bad_step': jnp.where(first, state.step + 1, accumulator['first_bad_step']),
      'first_bad_terms': jnp.where(first, ~finite_terms, accumulator['first_bad_terms']),
  }
  return new_state, accumulator


def guarded_steps(step_fn, skip_nonfinite, state, accumulator, stacked_batch, num_steps, rng):
  """`guarded_step` over the first `num_steps` batches of `stacked_batch` (arrays `[k, ...]`) in turn.

  A loop with a run-time trip count: one executable runs 1..k steps (the rows past `num_steps` are ignored), so a
  dispatch cut short by a sync point compiles nothing new.
  """
  def body(index, carry):
    batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), stacked_batch)
    return guarded_step(step_fn, skip_nonfinite, *carry, batch, rng)
  return jax.lax.fori_loop(0, num_steps, body, (state, accumulator))


def empty_accumulator(metric_names):
  return {
      'sums': {name: jnp.zeros((), jnp.float32) for name in metric_names},
      'finite_steps': jnp.zeros((), jnp.int32),
      'nonfinite_steps': jnp.zeros((), jnp.int32),
      'first_bad_step': jnp.full((), -1, jnp.int32),
      'first_bad_terms': jnp.zeros((len(metric_names) + 1,), bool),
  }


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """The built step and what its callers need around it."""
  step: Callable[[Any, Any, Any, Any], Any]   # jitted (state, accumulator, batch, rng) -> (state, accumulator)
  multi_step: Callable[..., Any]  # jitted (state, accumulator, stacked batch, num_steps, rng): `guarded_steps`
  new_accumulator: Callable[[], Any]          # jitted () -> a zeroed accumulator, replicated on the mesh
  metric_names: list[str]                     # sorted names of the step's metrics (the accumulator's sums)
  state_shardings: Any
  accumulator_shardings: Any
  batch_shardings: Any
  rng_sharding: Any

  def lower(self, state, batch, rng):
    """The step lowered for abstract (or concrete) arguments of these shardings: nothing runs or is allocated."""
    accumulator = jax.eval_shape(self.new_accumulator)
    return self.step.lower(sharding.with_shardings(state, self.state_shardings),
                           sharding.with_shardings(accumulator, self.accumulator_shardings),
                           sharding.with_shardings(batch, self.batch_shardings),
                           sharding.with_shardings(rng, self.rng_sharding))


def build_train_step(step_fn, state, state_shardings, batch, mesh, *, skip_nonfinite) -> TrainStep:
  """`guarded_step(step_fn)` jitted with the state sharded by `state_shardings`, the global `batch` by
  `sharding.batch_shardings` (batch over data x fsdp, width over spatial), the accumulator and the rng replicated,
  the state and accumulator donated, and on a CPU mesh XLA's own convolution kernels
  (`compiler_options`).

  `state` and `batch` may be abstract (`jax.eval_shape`, `jax.ShapeDtypeStruct`) or concrete: only their shapes
  and dtypes are read, to find the step's metrics.
  """
  replicated = sharding.replicated(mesh)
  batch_shardings = sharding.batch_shardings(batch, mesh)
  _, metrics = jax.eval_shape(step_fn, state, batch, jax.random.key(0))
  metric_names = sorted(metrics)
  accumulator_shardings = jax.tree.map(lambda _: replicated,
                                       jax.eval_shape(functools.partial(empty_accumulator, metric_names)))
  step = jax.jit(functools.partial(guarded_step, step_fn, skip_nonfinite),
                 in_shardings=(state_shardings, accumulator_shardings, batch_shardings, replicated),
                 out_shardings=(state_shardings, accumulator_shardings),
                 donate_argnums=(0, 1), compiler_options=compiler_options_for_mesh(mesh))
  multi_step = jax.jit(functools.partial(guarded_steps, step_fn, skip_nonfinite),
                       in_shardings=(state_shardings, accumulator_shardings,
                                     jax.tree.map(sharding.stacked_sharding, batch_shardings), replicated, replicated),
                       out_shardings=(state_shardings, accumulator_shardings),
                       donate_argnums=(0, 1), compiler_options=compiler_options_for_mesh(mesh))
  new_accumulator = jax.jit(functools.partial(empty_accumulator, metric_names), out_shardings=accumulator_shardings)
  return TrainStep(step=step, multi_step=multi_step, new_accumulator=new_accumulator, metric_names=metric_names,
                   state_shardings=state_shardings, accumulator_shardings=accumulator_shardings,
                   batch_shardings=batch_shardings, rng_sharding=replicated)
