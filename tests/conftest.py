"""Test session set-up: 8 fake CPU devices, so sharding tests run on any machine.

Must run before anything initialises a JAX backend; single-device tests are unaffected (un-sharded arrays live on
device 0). Subprocess tests (main end to end) choose their own device count through XLA_FLAGS.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# XLA:CPU's concurrency-optimised scheduler runs a rematerialised forward as early as its inputs allow (during the
# forward pass), which keeps the recomputed activations alive and hides what `model.remat` saves from the memory
# analysis tests/test_remat.py reads; the memory-minimising scheduler (what XLA:TPU and XLA:GPU do) does not.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_cpu_enable_concurrency_optimized_scheduler=false').strip()

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_num_cpu_devices', 8)
