"""Test session set-up: 8 fake CPU devices, so sharding tests run on any machine, and cheap compilation.

Must run before anything initialises a JAX backend; single-device tests are unaffected (un-sharded arrays live on
device 0). Subprocess tests (main end to end) choose their own device count through XLA_FLAGS.

The suite's programs are tiny, so compiling them is most of its time. Two settings cut it without changing what
any test computes: XLA's cheapest LLVM optimisation level (`--xla_backend_optimization_level=0`, appended to the
XLA_FLAGS of this process and of the subprocesses that inherit its environment), and one persistent compilation
cache for the session, shared by the pytest-xdist workers, so a program that several tests build (the same step
of the same tiny model) is compiled once.
"""
import os
import shutil
import tempfile

import pytest

FAST_COMPILE_FLAG = '--xla_backend_optimization_level=0'
if FAST_COMPILE_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(filter(None, [os.environ.get('XLA_FLAGS'), FAST_COMPILE_FLAG]))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_num_cpu_devices', 8)

CACHE_KEY = 'mpl_xla_cache_dir'


def pytest_configure(config):
  """The controller (or a run without xdist) makes the session's cache folder; xdist workers get it as input."""
  worker_input = getattr(config, 'workerinput', None)
  if worker_input is None:
    config.stash_xla_cache = tempfile.mkdtemp(prefix='mpl-tests-xla-cache-')
    cache = config.stash_xla_cache
  else:
    cache = worker_input[CACHE_KEY]
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """pytest-xdist's hook, run by the controller for each worker before it starts."""
  node.workerinput[CACHE_KEY] = node.config.stash_xla_cache


def pytest_unconfigure(config):
  if getattr(config, 'workerinput', None) is None:
    shutil.rmtree(config.stash_xla_cache, ignore_errors=True)
