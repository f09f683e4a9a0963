"""The jitted, donated train steps of mpl.py: every mode runs, wait steps give h == 0, cost has no redundant pass.

Float32, on the tiny models of mpl_test_models.py (the float64 gradient proofs are in test_mpl_gradients.py),
plus every registry model through the jitted step (see "every registry model" below; the larger ones are
`slow`). Every step is compiled once per mode for the whole file, with XLA's backend optimisations off.
"""

import functools
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meta_pseudo_labels import errors
from meta_pseudo_labels import models
from meta_pseudo_labels.method import mpl
from meta_pseudo_labels.method import train_state
from meta_pseudo_labels.run import evaluation
import mpl_test_models as tm

UDA = mpl.UdaHparams(weight=8.0, temperature=0.7, threshold=0.6, ramp_steps=5)
# Student waits one step (lr 0), then learns: step 0 must give h == 0 exactly, step 1 must not.
WAITING_OPTIMIZERS = tm.mpl_optimizers(
    teacher_optimizer=tm.optimizer_config(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    student_optimizer=tm.optimizer_config(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                          wait_steps=1, grad_clip_norm=5.0))


def hparams(feedback, **overrides):
  fields = dict(feedback=feedback, label_smoothing=0.1, uda=UDA, ema_decay=0.99, baseline_rate=0.1)
  return mpl.MplHparams(**{**fields, **overrides})


# Tiny models: XLA's backend (LLVM) optimisations only cost compile time here (numerics are unchanged).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@functools.cache
def initial_state(name):
  """Host copy of the MPL state of a tiny test model (one jitted init; the device copy of a step is donated)."""
  return jax.tree.map(np.asarray, jit(lambda: tm.make_mpl_state(name, WAITING_OPTIMIZERS))())


@functools.cache
def compiled_mpl_step(feedback):
  """The conv net's mpl_step, jitted with the state donated, compiled once per mode for the whole file."""
  state = jax.device_put(initial_state('convnet'))
  batch = tm.make_batch(jax.random.key(1), tm.MODELS['convnet'][1])
  step = jit(functools.partial(mpl.mpl_step, hparams=hparams(feedback)), donate_argnums=0)
  return step.lower(state, batch, jax.random.key(2)).compile()


@functools.cache
def two_steps(feedback):
  """States and metrics of two jitted, donated steps of the conv net from the same start, batch and rng."""
  start = initial_state('convnet')
  state = jax.device_put(start)
  batch = tm.make_batch(jax.random.key(1), tm.MODELS['convnet'][1])
  step = compiled_mpl_step(feedback)
  state_1, metrics_0 = step(state, batch, jax.random.key(2))
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))  # donated: the old state's buffers are reused
  state_1_host = jax.tree.map(np.asarray, state_1)
  state_2, metrics_1 = step(state_1, batch, jax.random.key(2))
  return start, state_1_host, jax.tree.map(np.asarray, state_2), metrics_0, metrics_1


EXPECTED_METRICS = {'teacher/loss', 'teacher/loss_sup', 'teacher/loss_uda', 'teacher/uda_weight',
                    'teacher/uda_mask_rate', 'teacher/loss_mpl', 'teacher/learning_rate', 'teacher/grad_norm',
                    'student/loss', 'student/learning_rate', 'student/grad_norm', 'mpl/baseline',
                    'teacher/own_logits_grad_norm', 'mpl/feedback_logits_grad_norm'}
EXPECTED_FEEDBACK_METRICS = {'exact': {'student/labeled_loss_after'},
                             'hard_dot': {'mpl/h', 'student/labeled_loss_after'},
                             'hard_taylor': {'mpl/h', 'student/labeled_loss_before', 'student/labeled_loss_after'},
                             'none': set()}


@pytest.mark.parametrize('feedback', mpl.FEEDBACK_MODES)
def test_every_mode_runs_jitted_and_donated(feedback):
  start, state_1, state_2, metrics_0, metrics_1 = two_steps(feedback)
  assert int(state_1.step) == 1 and int(state_2.step) == 2
  for metrics in (metrics_0, metrics_1):
    assert all(v.dtype == jnp.float32 and v.shape == () and np.isfinite(v) for v in metrics.values()), metrics
  expected = EXPECTED_METRICS | EXPECTED_FEEDBACK_METRICS[feedback]
  assert expected <= set(metrics_0), expected - set(metrics_0)
  assert float(metrics_0['student/learning_rate']) == 0.0 and float(metrics_1['student/learning_rate']) > 0
  np.testing.assert_allclose(metrics_0['teacher/learning_rate'], 0.1)
  np.testing.assert_allclose(metrics_0['teacher/uda_weight'], 8.0 / 5)
  np.testing.assert_allclose(metrics_1['teacher/uda_weight'], 8.0 * 2 / 5)
  assert 0.0 <= float(metrics_0['teacher/uda_mask_rate']) <= 1.0
  np.testing.assert_allclose(metrics_0['teacher/loss'], metrics_0['teacher/loss_sup'] + metrics_0['teacher/uda_weight']
                             * metrics_0['teacher/loss_uda'] + metrics_0['teacher/loss_mpl'], rtol=1e-5)
  moved = lambda a, b: float(optax.global_norm(jax.tree.map(np.subtract, a, b))) > 0
  assert moved(start.teacher.params, state_1.teacher.params)
  assert moved(start.teacher.batch_stats, state_1.teacher.batch_stats)
  assert moved(state_1.student.params, state_2.student.params)
  assert moved(start.student.batch_stats, state_1.student.batch_stats)
  # EMA with rate min(0.99, (t+1)/(t+10)) of the old average: 1/10 at t = 0, 2/11 at t = 1.
  for t, (ema_before, state_after) in enumerate([(start.student_ema, state_1), (state_1.student_ema, state_2)]):
    rate = min(0.99, (t + 1) / (t + 10))
    expected_ema = jax.tree.map(lambda old, new: rate * old + (1 - rate) * new, ema_before,
                                state_after.student.variables)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), state_after.student_ema,
                 expected_ema)


@pytest.mark.parametrize('feedback', ['hard_taylor', 'hard_dot', 'exact'])
def test_no_feedback_while_the_student_waits(feedback):
  """During the student's wait steps (lr 0) h is exactly 0 and the teacher gets no MPL gradient."""
  start, state_1, _, metrics_0, metrics_1 = two_steps(feedback)
  jax.tree.map(np.testing.assert_array_equal, start.student.params, state_1.student.params)
  if feedback != 'exact':
    assert float(metrics_0['mpl/h']) == 0.0 and float(metrics_0['teacher/loss_mpl']) == 0.0
    assert float(metrics_0['mpl/baseline']) == 0.0
    assert float(metrics_1['mpl/h']) != 0.0
    # Baseline b <- b + 0.1 (h - b), from b = 0 after the waiting step.
    np.testing.assert_allclose(metrics_1['mpl/baseline'], 0.1 * metrics_1['mpl/h'], rtol=1e-5)
  _, none_state_1, none_state_2, _, _ = two_steps('none')
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), state_1.teacher.params,
               none_state_1.teacher.params)
  _, _, state_2, _, _ = two_steps(feedback)
  difference = jax.tree.map(np.subtract, state_2.teacher.params, none_state_2.teacher.params)
  assert float(optax.global_norm(difference)) > 1e-6  # the feedback reaches the teacher once the student moves


def test_step_is_a_pure_function_of_state_batch_and_rng():
  batch = tm.make_batch(jax.random.key(1), tm.MODELS['convnet'][1])
  step = compiled_mpl_step('hard_taylor')
  run = lambda rng: step(jax.device_put(initial_state('convnet')), batch, rng)[1]
  first, again, other = run(jax.random.key(2)), run(jax.random.key(2)), run(jax.random.key(3))
  assert all(float(first[k]) == float(again[k]) for k in first)
  assert float(first['teacher/loss']) != float(other['teacher/loss'])  # dropout keys come from the rng


def test_step_keys_fold_in_the_step():
  """Dropout and pseudo-label keys of step t are split from fold_in(rng, t): a resumed run draws the masks and the
  pseudo labels of an uninterrupted one."""
  rng = jax.random.key(3)
  keys = [jax.random.key_data(key) for key in mpl.step_keys(rng, 5)]
  expected = jax.random.key_data(jax.random.split(jax.random.fold_in(rng, 5), 4))
  np.testing.assert_array_equal(np.stack(keys), expected)
  assert not np.array_equal(np.stack(keys), jax.random.key_data(jax.random.split(jax.random.fold_in(rng, 6), 4)))
  assert len({tuple(np.ravel(k)) for k in keys}) == 4   # four independent streams


def test_sampled_pseudo_labels_differ_from_argmax_and_are_reproducible():
  """The default 'sampled' labels are a draw (not argmax) from the step's own key: the same rng gives the same
  labels, and the student's step on them differs from one on argmax labels."""
  batch = tm.make_batch(jax.random.key(1), tm.MODELS['convnet'][1])
  run = lambda kind, rng: jit(functools.partial(mpl.mpl_step, hparams=hparams('hard_taylor', pseudo_labels=kind)))(
      jax.device_put(initial_state('convnet')), batch, rng)[1]
  sampled, again, argmax = run('sampled', jax.random.key(2)), run('sampled', jax.random.key(2)), run(
      'argmax', jax.random.key(2))
  assert float(sampled['student/loss']) == float(again['student/loss'])
  assert float(sampled['student/loss']) != float(argmax['student/loss'])


def test_hparams_from_config_and_one_line_errors():
  config = types.SimpleNamespace(
      mpl=types.SimpleNamespace(feedback='exact', h_sign=1.0, baseline_rate=0.0, pseudo_labels='sampled'),
      label_smoothing=0.15, uda=types.SimpleNamespace(weight=8.0, temperature=0.7, threshold=0.6, ramp_steps=5000),
      ema_decay=0.995, method='uda')
  h = mpl.MplHparams.from_config(config)
  assert h.soft_pseudo_labels and h.uda.weight == 8.0 and hash(h) == hash(mpl.MplHparams.from_config(config))
  assert mpl.SupervisedHparams.from_config(config).uda.weight == 8.0
  assert mpl.SupervisedHparams.for_finetune(config).uda.weight == 0.0
  config.method = 'supervised'
  assert mpl.SupervisedHparams.from_config(config).uda.weight == 0.0
  for overrides, field in [(dict(feedback='taylor'), 'mpl.feedback'), (dict(h_sign=0.5), 'mpl.h_sign'),
                           (dict(pseudo_labels='max'), 'mpl.pseudo_labels'),
                           (dict(feedback='hard_dot', pseudo_labels='soft'), 'mpl.pseudo_labels')]:
    with pytest.raises(errors.ConfigError, match=field):
      mpl.MplHparams(**overrides)
  # The old name of the released code's labels is refused with the new one.
  with pytest.raises(errors.ConfigError, match=r"'hard' was renamed 'argmax'.*'sampled'"):
    mpl.MplHparams(pseudo_labels='hard')


def test_create_mpl_state_is_pure_and_traceable():
  model, input_shape = tm.MODELS['convnet']
  create = functools.partial(train_state.create_mpl_state, teacher_model=model, student_model=model,
                             input_shape=input_shape, **WAITING_OPTIMIZERS)
  abstract = jax.eval_shape(create, jax.random.key(0))
  concrete = jit(create)(jax.random.key(0))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                                concrete)
  assert concrete.step.dtype == jnp.int32 and concrete.mpl_baseline.dtype == jnp.float32
  jax.tree.map(np.testing.assert_array_equal, concrete.student_ema['params'], concrete.student.params)
  mlp_state = jax.eval_shape(lambda: tm.make_mpl_state('mlp'))
  assert mlp_state.student.batch_stats == {} and mlp_state.student_ema['batch_stats'] == {}


@pytest.mark.parametrize('use_uda', [False, True])
def test_supervised_and_finetune_steps_learn_a_fixed_batch(use_uda):
  model, input_shape = tm.MODELS['convnet']
  state = jit(lambda rng: train_state.create_supervised_state(
      rng, model, tm.optimizer_config(learning_rate=0.3), input_shape, total_steps=10, keep_ema=not use_uda))(
          jax.random.key(0))
  batch = tm.make_batch(jax.random.key(1), input_shape)
  if not use_uda:  # the finetune / supervised batch has the labeled keys only
    batch = {k: batch[k] for k in ('labeled_image', 'labeled_label')}
  step_hparams = mpl.SupervisedHparams(label_smoothing=0.1, uda=UDA if use_uda else mpl.UdaHparams(),
                                       ema_decay=0.9)
  step = jit(functools.partial(mpl.finetune_step if not use_uda else mpl.supervised_step, hparams=step_hparams),
             donate_argnums=0)
  losses_seen = []
  for _ in range(6):
    state, metrics = step(state, batch, jax.random.key(2))
    losses_seen.append(float(metrics['train/loss_sup']))
  assert int(state.step) == 6 and losses_seen[-1] < losses_seen[0]
  assert ('train/loss_uda' in metrics) == use_uda and (state.ema is None) == use_uda


def test_eval_step_sums_over_the_mask():
  model, input_shape = tm.MODELS['mlp']
  variables = jit(functools.partial(train_state.init_variables, model=model, input_shape=input_shape))(
      jax.random.key(0))
  images = np.random.default_rng(1).normal(size=(5, *input_shape)).astype(np.float32)
  labels = jnp.array([0, 1, 2, 0, 1])
  mask = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])
  sums, logits = jit(lambda variables, batch: (evaluation.eval_step(model.apply, variables, batch),
                                               model.apply(variables, batch['image'], train=False)))(
                                                   variables, {'image': images, 'label': labels, 'mask': mask})
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  np.testing.assert_allclose(sums['top1_correct'], np.sum((logits.argmax(-1) == labels)[:4]))
  assert float(sums['top5_correct']) == 4.0 and float(sums['count']) == 4.0   # 3 classes: top-5 = top-3
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  np.testing.assert_allclose(sums['loss_sum'], -log_probs[np.arange(4), labels[:4]].sum(), rtol=1e-5)


def compiled_flops(fn, *args):
  return jit(fn).lower(*args).compile().cost_analysis()['flops']


def mpl_step_flop_ratio(model, input_shape, labeled, mu, feedback='hard_taylor'):
  """FLOPs of the jitted mpl_step / (teacher fwd+bwd on [x_l; x_w; x_s] + student fwd+bwd on x_s + 2 student
  forwards on x_l), each part compiled standalone with the same model and batch (XLA cost analysis)."""
  optimizers = tm.mpl_optimizers(
      teacher_optimizer=tm.optimizer_config(momentum=0.9, nesterov=True, weight_decay=5e-4),
      student_optimizer=tm.optimizer_config(momentum=0.9, nesterov=True, weight_decay=5e-4, grad_clip_norm=5.0))
  state = jax.eval_shape(lambda: train_state.create_mpl_state(jax.random.key(0), model, model, input_shape,
                                                              **optimizers))
  batch = jax.eval_shape(lambda: tm.make_batch(jax.random.key(1), input_shape, labeled=labeled, mu=mu))
  rng = jax.random.key(0)

  def forward(network, x):
    return mpl.apply_train(network.apply_fn, network.params, network.batch_stats, x, rng)

  def forward_backward(network, x):
    loss = lambda p: jnp.sum(mpl.apply_train(network.apply_fn, p, network.batch_stats, x, rng)[0])
    return jax.grad(loss)(network.params)

  x_all = jax.ShapeDtypeStruct((labeled * (1 + 2 * mu), *input_shape), jnp.float32)
  x_strong, x_labeled = batch['unlabeled_strong'], batch['labeled_image']
  floor = (compiled_flops(forward_backward, state.teacher, x_all)
           + compiled_flops(forward_backward, state.student, x_strong)
           + 2 * compiled_flops(forward, state.student, x_labeled))
  step = compiled_flops(functools.partial(mpl.mpl_step, hparams=hparams(feedback)), state, batch, rng)
  return step / floor


def test_hard_taylor_step_costs_no_more_than_its_floor():
  """No redundant pass: one teacher forward+backward, one student forward+backward, two labeled forwards."""
  ratio = mpl_step_flop_ratio(tm.TinyConvNet(), (16, 16, 3), labeled=4, mu=3)
  assert 0.95 < ratio < 1.05, ratio


# ---- every registry model -----------------------------------------------------------------------------------
# Every feedback mode runs for real on the tiny conv net above and on the registry MLP; the conv nets of the
# registry are run where XLA compiles them in seconds, and every one of them is traced through the jitted 'exact'
# step with jax.eval_shape (forward, second-order backward, optimizers, EMA; nothing compiled), which checks that
# the step differentiates it and returns a state of the same structure, shapes and dtypes. 'exact' is the mode to
# trace: the other modes call the model only through the same functions (`apply_train` under `value_and_grad`),
# which 'exact' differentiates to second order. Measured on the 2-core VM (process CPU seconds, pytest -m slow):
# compiling and running every mode of ResNet-50 and EfficientNet-B0 costs 82 s and 148 s, tracing the L2 27 s.
REGISTRY_RUN = {'mlp': mpl.FEEDBACK_MODES}                                       # default suite
# WRN-28-2 (CIFAR-10's and SVHN's network) in the paper's mode and the second-order one; the other two modes differ
# from hard_taylor only in the teacher's feedback term and run on the MLP above.
REGISTRY_RUN_SLOW = {'wrn28_2': ('hard_taylor', 'exact'), 'resnet50': ('hard_taylor',),
                     'efficientnet-b0': ('hard_taylor',)}
# EfficientNet-B1..B7 are B0's blocks at other width, depth and resolution coefficients (their parameter trees and
# counts: test_models.py); the default suite traces B0 and the L2 at the two ends, the full run every one.
SCALED_ONLY = tuple(f'efficientnet-b{i}' for i in range(1, 8))
REGISTRY_TRACED = tuple(name for name in models.MODELS if name != 'mlp')
# Compiling and running every mode of every registry model is far past the suite's budget: on the 2-core VM, one
# process, all but the L2 took 43 min (64 tests, peak RSS 17 GiB); the L2's steps need 15-19 GiB of memory for the
# step alone (XLA's memory analysis: 3.0 P of state + 5.6-7.8 P of temporaries, P = 1.77 GiB of parameters; XLA:CPU
# turns every depthwise kernel gradient into a dense k x k x C x C convolution) and 3-6 min each to compile, more
# than that 24 GiB VM holds. The default suite runs the models above and traces the rest; MPL_TEST_FULL_REGISTRY=1
# runs them all.
FULL_REGISTRY = os.environ.get('MPL_TEST_FULL_REGISTRY') == '1'
# 32x32 images, 8 labeled and 8 unlabeled examples: train-mode BatchNorm normalises a channel over batch x height
# x width values, and over only 2 (2 examples of 16x16 at stride 32) it amplifies the backward pass at every such
# layer. At initialisation the student gradient norm of EfficientNet-B3 is 2e13 on 2 examples of 16x16 and 2.4e3
# on 8 of 32x32 (B7: 1.1e4), and the former overflowed the 'exact' step's second-order backward (NaN teacher
# gradient). A property of tiny BatchNorm batches, not of the step: real runs normalise over 64+ examples.
REGISTRY_INPUT = (32, 32, 3)
REGISTRY_LABELED = 8


def test_registry_is_covered():
  assert set(REGISTRY_RUN) | set(REGISTRY_TRACED) == set(models.MODELS)
  assert set(SCALED_ONLY) < set(models.MODELS)
  assert set(REGISTRY_RUN_SLOW) <= set(REGISTRY_TRACED)


def registry_model(name):
  model_config = types.SimpleNamespace(name=name, dropout_rate=0.2, bn_momentum=0.99, drop_connect_rate=0.1,
                                       dtype='float32')
  return models.create_model(model_config, 10), (2,) if name == 'mlp' else REGISTRY_INPUT


def registry_create_fn(name):
  model, input_shape = registry_model(name)
  return lambda rng: train_state.create_mpl_state(rng, model, model, input_shape, **tm.mpl_optimizers())


def registry_batch(name):
  return tm.make_batch(jax.random.key(1), registry_model(name)[1], labeled=REGISTRY_LABELED, mu=1, num_classes=10)


@functools.cache
def registry_init(name):
  """The model's own initialisers, jitted once per model; each call makes a fresh state on the device."""
  return jit(registry_create_fn(name))


@functools.cache
def registry_filled_state(name):
  """Host MPL state of registry model `name` (10 classes), filled in NumPy: kernels ~ N(0, 1/fan_in), BatchNorm
  scales and variances 1, everything else 0.

  Stands in for the model's own initialisers (traced by test_models.py), whose compiled random number generation
  costs as much CPU as the MPL step it feeds (13 s for EfficientNet-B0). Not for ResNets: their initialisation
  zeroes the last BatchNorm scale of every residual block, without which the gradients of 2 examples of 16x16
  overflow float32 after 16 bottleneck blocks; nor for the full matrix (MPL_TEST_FULL_REGISTRY=1), where the
  EfficientNets' student gradients from this fill reach 1e12-1e16 on 2 examples of 16x16 and overflow hard_dot's h.
  """
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    if len(leaf.shape) >= 2:
      return (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(leaf.dtype)
    one = jax.tree_util.keystr(path[-1:]) in ("['scale']", "['var']")
    return np.full(leaf.shape, 1.0 if one else 0.0, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(registry_create_fn(name), jax.random.key(0)))


def registry_mpl_state(name):
  """A fresh device MPL state of registry model `name`; no host copy of it is kept (the L2's is 5.3 GiB)."""
  if name.startswith('resnet') or FULL_REGISTRY:
    return registry_init(name)(jax.random.key(0))
  return jax.device_put(registry_filled_state(name))


def leaf_sums(tree):
  """Per-leaf float64 sums, a fingerprint of a parameter tree that costs no copy of it (the L2's is 1.8 GiB)."""
  return [np.sum(np.asarray(leaf), dtype=np.float64) for leaf in jax.tree.leaves(tree)]


def run_registry_step(name, feedback):
  state = registry_mpl_state(name)
  teacher_before = leaf_sums(state.teacher.params)  # taken before the step donates `state`
  batch, rng = registry_batch(name), jax.random.key(2)
  step = jit(functools.partial(mpl.mpl_step, hparams=hparams(feedback)), donate_argnums=0)
  new_state, metrics = step(state, batch, rng)
  assert int(new_state.step) == 1
  assert (EXPECTED_METRICS | EXPECTED_FEEDBACK_METRICS[feedback]) <= set(metrics)
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert leaf_sums(new_state.teacher.params) != teacher_before


@pytest.mark.parametrize('name, feedback', [(n, f) for n, modes in REGISTRY_RUN.items() for f in modes])
def test_registry_model_runs_a_jitted_mpl_step(name, feedback):
  run_registry_step(name, feedback)


@pytest.mark.slow
@pytest.mark.parametrize('name, feedback', [(n, f) for n, modes in REGISTRY_RUN_SLOW.items() for f in modes])
def test_larger_registry_model_runs_a_jitted_mpl_step(name, feedback):
  run_registry_step(name, feedback)


@pytest.mark.skipif(not FULL_REGISTRY, reason='the full registry x mode matrix runs with MPL_TEST_FULL_REGISTRY=1')
@pytest.mark.parametrize('name, feedback', [(n, f) for n in models.MODELS for f in mpl.FEEDBACK_MODES])
def test_every_registry_model_runs_a_jitted_mpl_step_in_every_mode(name, feedback):
  run_registry_step(name, feedback)


@pytest.mark.slow
@pytest.mark.parametrize('name', REGISTRY_TRACED)
def test_registry_model_traces_through_the_jitted_exact_step(name):
  if name in SCALED_ONLY and not FULL_REGISTRY:
    pytest.skip('B1..B7 trace with MPL_TEST_FULL_REGISTRY=1 (B0 and the L2 in the default suite)')
  state = jax.eval_shape(registry_create_fn(name), jax.random.key(0))
  step = jit(functools.partial(mpl.mpl_step, hparams=hparams('exact')), donate_argnums=0)
  new_state, metrics = jax.eval_shape(step, state, registry_batch(name), jax.random.key(2))
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  assert shapes(new_state) == shapes(state)
  assert EXPECTED_METRICS | EXPECTED_FEEDBACK_METRICS['exact'] <= set(metrics)
  assert all(m.shape == () and m.dtype == jnp.float32 for m in metrics.values())
