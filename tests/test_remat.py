"""Rematerialisation (`model.remat`, models/remat.py): the same MPL step, less memory.

For WRN-10-1 MPL steps in every feedback mode and EfficientNet-B0's in hard_taylor and exact (the second-order pass
through the student), each policy gives the loss, metrics, gradients and new state of 'none' (float32: bitwise for
WRN, within RTOL relative for EfficientNet-B0, whose recomputed blocks XLA:CPU fuses differently); and each lowers
the step's compiled temporaries (XLA's memory analysis on CPU) by the factors in MEMORY_FACTORS. The gradients are
read from the optimizer state: with momentum and no weight decay or clipping, the first step's momentum trace is
the gradient itself. Every block and the ResNet and EfficientNet stems are checkpointed, and ResNet-18's plain
gradient through them is bitwise that of 'none'.
"""

import functools
import os
import types

import jax
import numpy as np
import pytest

from configs import cifar10_4k
from meta_pseudo_labels import errors
from meta_pseudo_labels import models
from meta_pseudo_labels.method import mpl
from meta_pseudo_labels.method import train_state
from meta_pseudo_labels.run import config_validation
import mpl_test_models as tm

FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
# XLA:CPU's concurrency-optimised scheduler runs a rematerialised forward as early as its inputs allow (during the
# forward pass), which keeps the recomputed activations alive and hides what `model.remat` saves from the memory
# analysis; the memory-minimising scheduler (what XLA:TPU and XLA:GPU do) does not. It is a process-wide XLA flag
# (as a per-executable compiler option it did not change the schedule), so the memory factors are checked only in a
# process started with it, not in the default suite (whose other tests keep XLA:CPU's default):
#   XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false MPL_TEST_FULL_REMAT=1 pytest tests/test_remat.py
MEMORY_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'
MEASURES_MEMORY = MEMORY_SCHEDULER_FLAG in os.environ.get('XLA_FLAGS', '')
SGD = tm.optimizer_config(learning_rate=0.1, momentum=0.9)   # trace after one step = the gradient
CASES = {'wrn10_1': (8, 8, 3), 'efficientnet-b0': (16, 16, 3)}
LABELED = 4
POLICIES = [p for p in models.REMAT_POLICIES if p != 'none']
# Smallest factor (temporaries with 'none' / with the policy) over the modes, measured on the 2-core VM (the
# figures are in docs/SCALING.md), rounded down. The workloads are tiny, so weights and their gradients are a
# large share of the temporaries and the factors are far below a pod workload's.
BITWISE = {'wrn10_1'}   # models whose remat steps equal 'none' bitwise on XLA:CPU (the others within RTOL)
RTOL = 1e-5
MEMORY_FACTORS = {('wrn10_1', 'block'): 1.1, ('wrn10_1', 'dots'): 1.3,
                  ('efficientnet-b0', 'block'): 1.0, ('efficientnet-b0', 'dots'): 1.0}   # B0: not yet measured


def model(name, policy):
  config = types.SimpleNamespace(name=name, dropout_rate=0.2, bn_momentum=0.99, drop_connect_rate=0.2,
                                 dtype='float32', remat=policy)
  return models.create_model(config, 10)


def mpl_step(name, policy, feedback):
  """(compiled step, state, batch) of the MPL step of registry model `name` under `policy`, from seed 0."""
  net, shape = model(name, policy), CASES[name]
  state = jax.jit(lambda r: train_state.create_mpl_state(r, net, net, shape, **tm.mpl_optimizers(SGD, SGD)),
                  compiler_options=FAST_COMPILE)(jax.random.key(0))
  batch = tm.make_batch(jax.random.key(1), shape, labeled=LABELED, mu=1, num_classes=10)
  hparams = mpl.MplHparams(feedback=feedback, label_smoothing=0.1, uda=mpl.UdaHparams(8.0, 0.7, 0.6, 5),
                           ema_decay=0.99, baseline_rate=0.1)
  step = jax.jit(functools.partial(mpl.mpl_step, hparams=hparams), compiler_options=FAST_COMPILE)
  return step.lower(state, batch, jax.random.key(2)).compile(), state, batch


@functools.cache
def step_result(name, policy, feedback):
  """(new state, metrics) of one step, and the step's compiled temporaries in bytes (XLA's memory analysis)."""
  compiled, state, batch = mpl_step(name, policy, feedback)
  outputs = jax.tree.map(np.asarray, compiled(state, batch, jax.random.key(2)))
  return outputs, compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('name', CASES)
def test_policies_keep_the_variables(name):
  shapes = lambda policy: jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(
      lambda: model(name, policy).init({'params': jax.random.key(0)}, np.zeros((1, *CASES[name])), train=False)))
  assert all(shapes(policy) == shapes('none') for policy in POLICIES)   # checkpoints restore across policies


# Default suite: WRN-10-1's second-order (exact) step, whose backward runs through the checkpointed student twice
# (first-order gradients through checkpointed blocks and stems: the ResNet test below). MPL_TEST_FULL_REMAT=1 adds
# WRN's other three modes and EfficientNet-B0's hard_taylor and exact steps (some 10x WRN's compile time each; the
# other two modes differ from hard_taylor only in the teacher's feedback term).
FULL = os.environ.get('MPL_TEST_FULL_REMAT') == '1'
MODES = {'wrn10_1': mpl.FEEDBACK_MODES if FULL else ('exact',)}
if FULL:
  MODES['efficientnet-b0'] = ('hard_taylor', 'exact')


@pytest.mark.parametrize('policy', POLICIES)
@pytest.mark.parametrize('name, feedback', [(name, mode) for name, modes in MODES.items() for mode in modes])
def test_remat_step_equals_the_plain_step(name, feedback, policy):
  ((new_state, metrics), temps), ((plain_state, plain_metrics), plain_temps) = (
      step_result(name, policy, feedback), step_result(name, 'none', feedback))
  assert metrics.keys() == plain_metrics.keys() and np.isfinite(plain_metrics['teacher/loss'])
  gradients = lambda s: (s.teacher.opt_state, s.student.opt_state)
  assert any(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(gradients(plain_state)))
  pairs = [(metrics[key], plain_metrics[key]) for key in sorted(metrics)]
  pairs += list(zip(jax.tree.leaves(new_state), jax.tree.leaves(plain_state)))
  if name in BITWISE:
    # The recomputed forward runs the same ops on the same values (dropout and drop-connect masks included: the
    # block's rngs are lifted into the checkpoint), and XLA:CPU fuses them alike: bitwise.
    assert all(np.array_equal(leaf, plain) for leaf, plain in pairs)
  else:
    # EfficientNet's recomputed blocks are fused differently (BatchNorm and squeeze-and-excitation means summed in
    # another order): teacher/grad_norm 7151.257 (block) / 7151.2554 (dots) against 7151.2754, 2.6e-6 and 2.8e-6
    # relative, on the 2-core VM. Leaves are compared by norm, relative to the plain leaf's.
    for leaf, plain in pairs:
      leaf, plain = np.asarray(leaf, np.float64), np.asarray(plain, np.float64)
      assert np.linalg.norm(leaf - plain) <= RTOL * max(np.linalg.norm(plain), 1e-30)
  # Less memory: XLA:CPU's compiled temporaries, under the memory-minimising scheduler (see MEASURES_MEMORY).
  print(f'{name} {feedback} {policy}: temporaries {plain_temps} -> {temps} B, {plain_temps / temps:.2f}x less')
  if MEASURES_MEMORY:
    assert plain_temps >= MEMORY_FACTORS[name, policy] * temps, (plain_temps, temps)


# Checkpointed units of a model's gradient: its blocks, plus the stem where the stem is more than one convolution.
CHECKPOINTED_UNITS = {'wrn10_1': 3, 'resnet18': 8 + 1, 'efficientnet-b0': 16 + 1}


def squared_logits(name, policy, x):
  """(loss of the parameters: a train-mode forward's squared logits and new BatchNorm statistics, parameters)."""
  net = model(name, policy)
  variables = net.init({'params': jax.random.key(0)}, x, train=False)

  def loss(params):
    logits, new_stats = net.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': jax.random.key(3)})
    return (logits ** 2).sum(), new_stats

  return loss, variables['params']


@pytest.mark.parametrize('name', CHECKPOINTED_UNITS)
def test_every_block_and_the_stem_are_checkpointed(name):
  for policy in POLICIES:
    loss, params = squared_logits(name, policy, np.ones((2, 8, 8, 3), np.float32))
    assert str(jax.make_jaxpr(jax.grad(loss, has_aux=True))(params)).count('remat') == CHECKPOINTED_UNITS[name]


def test_resnet_stem_and_blocks_recompute_the_same_gradient_bitwise():
  """ResNet's checkpointed stem (convolution, BatchNorm, ReLU, max-pool) and blocks: the gradient of 'none'."""
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))

  def gradient(policy):
    loss, params = squared_logits('resnet18', policy, x)
    return jax.jit(jax.grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(params)

  plain = jax.tree.leaves(gradient('none'))
  for policy in POLICIES:
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(gradient(policy)), plain)), policy


def test_unknown_policy_is_a_one_line_error():
  with pytest.raises(errors.ConfigError, match=r"model.remat: unknown rematerialisation policy 'all'; choose one "
                                               r"of \['none', 'block', 'dots'\]"):
    model('wrn10_1', 'all')
  config = cifar10_4k.get_config()
  config.model.remat = 'blocks'
  with pytest.raises(errors.ConfigError, match=r"model.remat: unknown rematerialisation policy 'blocks'; choose "
                                               r"one of \['none'"):   # the same rule as create_model's, one place
    config_validation.validate(config, 1)
  config = cifar10_4k.get_config()
  config.student_model.remat = 'block'
  with pytest.raises(errors.ConfigError, match='student_model.remat: .* applies only with student_model.name set'):
    config_validation.validate(config, 1)
  config.student_model.name = 'wrn28_2'
  config_validation.validate(config, 1)
