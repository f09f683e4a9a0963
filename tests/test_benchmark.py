"""The benchmark harness measures what it says, and the benchmark runs end to end in a tiny configuration.

Speeds are never asserted (the machine is shared): only that every field is present, positive and finite, and that
the measurements mean what they claim (FLOPs of a known matmul, donation seen in the memory analysis).
"""
import math

import jax
import jax.numpy as jnp
import pytest

from meta_pseudo_labels import benchmark


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
