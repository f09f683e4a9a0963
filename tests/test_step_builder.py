"""Several steps per dispatch (`TrainStep.multi_step`, a loop over stacked batches): how a run's steps are grouped
into dispatches at a given k changes nothing, bitwise; against one step per call (`TrainStep.step`) the state and
the accumulated metrics agree to float32 rounding (XLA:CPU fuses a loop body differently from a lone step).
On a BatchNorm + dropout net, MPL with UDA, the divergence guard on, the batches split over the test's 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_pseudo_labels.execution import sharding
from meta_pseudo_labels.execution import step_builder
from meta_pseudo_labels.method import mpl
import mpl_test_models as tm

STEPS = 4
PER_DISPATCH = 4


def _train_step(state, batch, skip_nonfinite):
  mesh = sharding.create_mesh(type('Mesh', (), dict(data=1, fsdp=-1, spatial=1))())
  hparams = mpl.MplHparams(feedback='hard_taylor', pseudo_labels='sampled', label_smoothing=0.1,
                           uda=mpl.UdaHparams(weight=1.0, temperature=0.7, threshold=0.6, ramp_steps=2))
  step_fn = lambda s, b, r: mpl.mpl_step(s, b, r, hparams=hparams)   # pylint: disable=unnecessary-lambda-assignment
  shardings = sharding.state_shardings(jax.eval_shape(lambda: state), mesh, 0)
  return step_builder.build_train_step(step_fn, state, shardings, batch, mesh, skip_nonfinite=skip_nonfinite)


@pytest.mark.parametrize('skip_nonfinite', [False, True])
def test_steps_per_dispatch_group_steps_without_changing_them(skip_nonfinite):
  batches = [tm.make_batch(jax.random.key(i), tm.MODELS['convnet'][1], labeled=8) for i in range(STEPS)]
  rng = jax.random.key(7)
  initial = tm.make_mpl_state('convnet')
  train_step = _train_step(initial, batches[0], skip_nonfinite)

  def run(groups):
    """The steps in dispatches of `groups` steps each (0: one `step` call per step)."""
    state, accumulator = jax.tree.map(jnp.copy, initial), train_step.new_accumulator()   # donated: a fresh copy
    done = 0
    for size in groups:
      if not size:
        state, accumulator = train_step.step(state, accumulator, batches[done], rng)
        done += 1
        continue
      rows = batches[done:done + size] + batches[done + size - 1:done + size] * (PER_DISPATCH - size)
      stacked = jax.tree.map(lambda *x: jnp.stack(x), *rows)
      state, accumulator = train_step.multi_step(state, accumulator, stacked, jnp.int32(size), rng)
      done += size
    assert done == STEPS
    return jax.device_get((state, accumulator))

  all_at_once = run([4])
  assert int(all_at_once[0].step) == STEPS and int(all_at_once[1]['finite_steps']) == STEPS
  for groups in ([2, 2], [1, 3], [1, 1, 1, 1]):   # a dispatch cut short by a sync point, a resume mid-way
    for a, b in zip(jax.tree.leaves(all_at_once), jax.tree.leaves(run(groups))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(groups))
  for a, b in zip(jax.tree.leaves(all_at_once), jax.tree.leaves(run([0] * STEPS))):
    if np.issubdtype(np.asarray(a).dtype, np.floating):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(a, b)


def test_a_run_preempted_between_sync_points_resumes_to_the_same_result(tmp_path, monkeypatch):
  """The loop at 3 steps per dispatch with syncs every 5 steps (dispatches end at 3, 5, 6, 9, 10): a SIGTERM during
  step 5 is acted on at the end of the next dispatch, step 6, no sync point; the resumed run groups steps 7..10 as
  the uninterrupted one does, so the two end bitwise alike (TwoMoon, MPL, in this process)."""
  from configs import two_moons   # pylint: disable=g-import-not-at-top  # TensorFlow: the loop's test only
  from meta_pseudo_labels import errors   # pylint: disable=g-import-not-at-top
  from meta_pseudo_labels.run import train   # pylint: disable=g-import-not-at-top
  config = two_moons.get_config()
  config.experiment, config.num_train_steps, config.finetune.num_steps = 'train', 10, 0
  config.log_every_steps = config.checkpoint_every_steps = 5
  config.eval_every_steps, config.steps_per_dispatch = 10, 3
  config.batch_size = config.dataset.num_labeled = 8   # split over the test's 8 CPU devices (conftest)

  uninterrupted = train.train_and_evaluate(config, tmp_path / 'uninterrupted')
  monkeypatch.setenv(train.FAULT_ENV, 'term@mpl:5')
  with pytest.raises(errors.Preempted, match='step 6'):
    train.train_and_evaluate(config, tmp_path / 'resumed')
  monkeypatch.delenv(train.FAULT_ENV)
  resumed = train.train_and_evaluate(config, tmp_path / 'resumed')
  assert resumed['final'] == uninterrupted['final']
