"""Test session set-up: 8 fake CPU devices, so sharding tests run on any machine.

Must run before anything initialises a JAX backend; single-device tests are unaffected (un-sharded arrays live on
device 0). Subprocess tests (main end to end) choose their own device count through XLA_FLAGS.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_num_cpu_devices', 8)
