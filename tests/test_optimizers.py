"""Schedules and optimizer chains of optimizers.py (paper App. C)."""

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meta_pseudo_labels import errors
from meta_pseudo_labels.method import optimizers
from meta_pseudo_labels.method import train_state


def config(**overrides):
  fields = dict(learning_rate=0.5, warmup_steps=10, wait_steps=5, weight_decay=0.0, grad_clip_norm=0.0,
                momentum=0.9, nesterov=True, schedule='cosine')
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


def test_schedule_waits_warms_up_linearly_then_cosine_decays_to_zero():
  lr = optimizers.create_learning_rate_fn(config(), total_steps=115)
  values = {t: float(lr(t)) for t in (0, 4, 5, 6, 14, 15, 65, 115, 200)}
  assert values[0] == values[4] == 0.0                       # the 5 wait steps
  np.testing.assert_allclose([values[5], values[6]], [0.05, 0.1], rtol=1e-6)   # warmup step k: peak * (k + 1) / 10
  np.testing.assert_allclose([values[14], values[15]], [0.5, 0.5], rtol=1e-6)  # peak at the last warmup step
  np.testing.assert_allclose(values[65], 0.25, rtol=1e-5)    # half way down the cosine
  assert abs(values[115]) < 1e-7 and abs(values[200]) < 1e-7
  t = 40
  np.testing.assert_allclose(float(lr(t)), 0.25 * (1 + math.cos(math.pi * (t - 15) / 100)), rtol=1e-5)


@pytest.mark.parametrize('wait, first_values', [(3, [0, 0, 0, 0.25, 0.5, 0.75, 1, 1]), (0, [0.25, 0.5, 0.75, 1, 1])])
def test_warmup_follows_the_release_wait_steps_at_zero_then_peak_times_k_plus_1_over_warmup(wait, first_values):
  """The release's convention (common_utils.get_learning_rate): exactly `wait` steps at lr 0, then warmup step k
  (k = 0, 1, ...) at peak * (k + 1) / warmup, so the peak is reached at the last warmup step."""
  lr = optimizers.create_learning_rate_fn(config(learning_rate=1.0, wait_steps=wait, warmup_steps=4,
                                                 schedule='constant'), 100)
  np.testing.assert_allclose([float(lr(t)) for t in range(len(first_values))], first_values, rtol=1e-6)


def test_constant_schedule_and_no_warmup():
  lr = optimizers.create_learning_rate_fn(config(schedule='constant', warmup_steps=0, wait_steps=0), 100)
  np.testing.assert_allclose([float(lr(t)) for t in (0, 50, 100, 1000)], 0.5)


def step_update(tx, learning_rate_fn, grads, opt_state, params, step):
  """The update of train step `step`, as NetworkState.apply_gradients makes it."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optimizers.scale_by_learning_rate(updates, learning_rate_fn(step)), opt_state


def test_the_update_of_a_step_uses_that_steps_learning_rate_however_many_updates_came_before():
  """Steps 2 and 3 skipped (the divergence guard keeps the old optimizer state): step 4 still applies lr(4)."""
  optimizer = config(momentum=0.0, nesterov=False, wait_steps=1, warmup_steps=4)
  variables = {'params': {'w': jnp.ones(())}, 'batch_stats': {}}
  network = train_state.create_network_state(variables, apply_fn=None, optimizer_config=optimizer, total_steps=20)
  for step in (0, 1, 4, 5):
    moved = network.apply_gradients({'w': jnp.full((), 2.0)}, {}, step)
    np.testing.assert_allclose(float(network.params['w'] - moved.params['w']), 2.0 * float(network.learning_rate_fn(
        step)), rtol=1e-6)
    network = moved
  np.testing.assert_allclose([float(network.learning_rate_fn(t)) for t in (0, 1, 4, 5)], [0, 0.125, 0.5, 0.5])


def test_weight_decay_touches_kernels_only():
  params = {'conv': {'kernel': jnp.ones((3, 3, 2, 4))}, 'dense': {'kernel': jnp.ones((4, 2)),
                                                                  'bias': jnp.ones((2,))},
            'bn': {'scale': jnp.ones((4,)), 'bias': jnp.ones((4,))}}
  tx, lr = optimizers.create_optimizer(config(weight_decay=0.1, wait_steps=0, warmup_steps=0, momentum=0.0,
                                              schedule='constant'), 10)
  updates, _ = step_update(tx, lr, jax.tree.map(jnp.zeros_like, params), tx.init(params), params, 0)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.5 * 0.1)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.5 * 0.1)
  for leaf in (updates['dense']['bias'], updates['bn']['scale'], updates['bn']['bias']):
    np.testing.assert_array_equal(leaf, 0.0)


def test_consecutive_steps_equal_optax_sgd_with_the_schedule_weight_decay_clipping_and_nesterov():
  """Without skipped steps the chain is optax's SGD at the count-based schedule, step for step."""
  optimizer = config(weight_decay=0.1, grad_clip_norm=1.0, wait_steps=2, warmup_steps=3)
  tx, lr = optimizers.create_optimizer(optimizer, 12)
  reference = optax.chain(optax.add_decayed_weights(0.1, mask=optimizers.decay_mask), optax.clip_by_global_norm(1.0),
                          optax.sgd(lr, momentum=0.9, nesterov=True))
  params = {'kernel': jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), 'bias': jnp.ones((3,))}
  state, ref_state = tx.init(params), reference.init(params)
  for step in range(12):
    grads = jax.tree.map(lambda p, s=step: jnp.cos(p * (s + 1)) * 3.0, params)
    updates, state = step_update(tx, lr, grads, state, params, step)
    ref_updates, ref_state = reference.update(grads, ref_state, params)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-8), updates, ref_updates)
    assert step < 2 or float(optax.global_norm(updates)) > 0
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize('overrides, field', [(dict(schedule='linear'), 'schedule'),
                                              (dict(learning_rate=-1.0), 'learning_rate'),
                                              (dict(wait_steps=-3), 'wait_steps')])
def test_bad_values_raise_one_line_config_errors(overrides, field):
  with pytest.raises(errors.ConfigError, match=f'student_optimizer.{field}'):
    optimizers.create_optimizer(config(**overrides), 100, name='student_optimizer')
