"""Schedules and optimizer chains of optimizers.py (paper App. C)."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meta_pseudo_labels import errors
from meta_pseudo_labels import optimizers


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


def test_optax_update_count_follows_the_schedule():
  tx, lr = optimizers.create_optimizer(config(momentum=0.0, nesterov=False, wait_steps=2, warmup_steps=2), 20)
  params = {'w': jnp.ones(())}
  state = tx.init(params)
  for step in range(6):
    updates, state = tx.update({'w': jnp.ones(())}, state, params)
    np.testing.assert_allclose(float(updates['w']), -float(lr(step)), rtol=1e-6)


def test_weight_decay_touches_kernels_only():
  params = {'conv': {'kernel': jnp.ones((3, 3, 2, 4))}, 'dense': {'kernel': jnp.ones((4, 2)),
                                                                  'bias': jnp.ones((2,))},
            'bn': {'scale': jnp.ones((4,)), 'bias': jnp.ones((4,))}}
  tx, _ = optimizers.create_optimizer(config(weight_decay=0.1, wait_steps=0, warmup_steps=0, momentum=0.0,
                                             schedule='constant'), 10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.5 * 0.1)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.5 * 0.1)
  for leaf in (updates['dense']['bias'], updates['bn']['scale'], updates['bn']['bias']):
    np.testing.assert_array_equal(leaf, 0.0)


def test_clipping_bounds_the_global_norm_and_nesterov_matches_optax():
  params = {'w': jnp.zeros((4,))}
  grads = {'w': jnp.full((4,), 10.0)}
  tx, _ = optimizers.create_optimizer(config(grad_clip_norm=1.0, wait_steps=0, warmup_steps=0,
                                             schedule='constant'), 10)
  reference = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9, nesterov=True))
  state, ref_state = tx.init(params), reference.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = reference.update(grads, ref_state, params)
    np.testing.assert_allclose(updates['w'], ref_updates['w'], rtol=1e-6)


@pytest.mark.parametrize('overrides, field', [(dict(schedule='linear'), 'schedule'),
                                              (dict(learning_rate=-1.0), 'learning_rate'),
                                              (dict(wait_steps=-3), 'wait_steps')])
def test_bad_values_raise_one_line_config_errors(overrides, field):
  with pytest.raises(errors.ConfigError, match=f'student_optimizer.{field}'):
    optimizers.create_optimizer(config(**overrides), 100, name='student_optimizer')
