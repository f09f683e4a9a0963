"""Reduced Meta Pseudo Labels (App. E): the stored targets' error, T_R at initialisation, its meta-gradient.

The exact meta-gradient of T_R is checked against float64 central finite differences like the full teacher's
(tests/test_mpl_gradients.py), and through the real `mpl_step`: with plain SGD the T_R update is -lr times it.
"""

import functools
import types

import jax
import numpy as np
import pytest

from meta_pseudo_labels.method import mpl
from meta_pseudo_labels.method import train_state
from meta_pseudo_labels.models import reduced_teacher
import mpl_test_models as tm

NUM_CLASSES = tm.NUM_CLASSES
TOP_K = 2
HIDDEN = (8,)


REDUCED = types.SimpleNamespace(top_k=TOP_K, hidden_sizes=HIDDEN)


def reduced_mpl_state(student_lr=0.1, teacher_lr=0.1):
  """The Reduced MPL state of the tiny MLP student and T_R (REDUCED), from key 0."""
  student_model, input_shape = tm.MODELS['mlp']
  optimizers = tm.mpl_optimizers(teacher_optimizer=tm.optimizer_config(learning_rate=teacher_lr),
                                 student_optimizer=tm.optimizer_config(learning_rate=student_lr))
  return train_state.create_reduced_mpl_state(jax.random.key(0), REDUCED, NUM_CLASSES, student_model, input_shape,
                                              **optimizers)


def reduced_batch(seed, input_shape=(6,), labeled=4, mu=2):
  """An MPL batch of Reduced MPL: no weak view; the stored targets of a random teacher for x_s."""
  batch = tm.make_batch(jax.random.key(seed), input_shape, labeled=labeled, mu=mu)
  del batch['unlabeled_weak']
  teacher_logits = 3 * jax.random.normal(jax.random.key(seed + 1), (mu * labeled, NUM_CLASSES))
  batch['unlabeled_targets'] = reduced_teacher.top_k_targets(teacher_logits, TOP_K)
  return batch


def total_variation(p, q):
  return 0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum(-1)


@pytest.mark.parametrize('num_classes,k,scale', [(10, 3, 4.0), (1000, 8, 8.0)])
def test_stored_targets_error_against_the_full_distribution(num_classes, k, scale):
  """TV(p_T, p_hat) is at most the rest mass plus float16 rounding; the stored form costs 4k + 2 bytes per image.

  Measured here (512 images of Gaussian logits, jax 0.10.2 CPU): C=10, k=3, scale 4: mean TV 0.023, max 0.19 (mean
  rest mass 0.041); C=1000, k=8, scale 8: mean TV 0.017, max 0.22 (max KL 0.80), TV - rest mass <= 1.3e-4. The error
  of a real teacher is its own rest mass: the precompute measures and logs it for every chunk.
  """
  logits = scale * jax.random.normal(jax.random.key(0), (512, num_classes))
  stored = reduced_teacher.top_k_targets(logits, k)
  full = jax.nn.softmax(logits, axis=-1)
  dense = reduced_teacher.stored_distribution(stored, num_classes)
  tv = total_variation(full, dense)
  rest = np.asarray(stored['rest_mass'], np.float64)
  assert np.all(tv <= rest + 2e-3 + num_classes * reduced_teacher.MIN_PROBABILITY)
  # Top-1 is kept exactly: the student's argmax labels are T's.
  np.testing.assert_array_equal(np.argmax(dense, -1), np.argmax(full, -1))
  bytes_per_image = k * (2 + 2) + 2   # float16 log-probs + uint16 classes + float16 rest mass
  assert bytes_per_image == 4 * k + 2


def test_reduced_teacher_at_initialisation_is_the_stored_distribution():
  model = reduced_teacher.ReducedTeacher(num_classes=NUM_CLASSES, hidden_sizes=HIDDEN)
  variables = reduced_teacher.init_variables(jax.random.key(0), model, TOP_K)
  targets = reduced_batch(0)['unlabeled_targets']
  logits = model.apply(variables, targets, train=False)
  np.testing.assert_allclose(jax.nn.softmax(logits, -1), reduced_teacher.stored_distribution(targets, NUM_CLASSES),
                             atol=1e-6)


def _perturbed(variables, seed, scale=0.3):
  """T_R away from its initialisation (the zero last layer gives no gradient to the layers below it)."""
  leaves, treedef = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in
                                        zip(leaves, keys)])
  return dict(variables, params=params)


def test_exact_meta_gradient_matches_float64_finite_differences_and_the_step():
  with jax.enable_x64(True):
    state = tm.to_float64(reduced_mpl_state())
    teacher = state.teacher.replace(**_perturbed(state.teacher.variables, 1))
    state = state.replace(teacher=teacher)
    batch = tm.to_float64(reduced_batch(2))
    batch['unlabeled_targets'] = tm.to_float64(batch['unlabeled_targets'])
    hparams = mpl.MplHparams(feedback='exact', pseudo_labels='soft', label_smoothing=0.1, teacher='reduced')
    rng = jax.random.key(3)
    keys = mpl.step_keys(rng, 0)
    mpl_batch = mpl.MplBatch.from_dict(batch)
    eta = float(state.student.learning_rate_fn(0))

    @jax.jit
    def loss(params):
      logits, _ = mpl.apply_train(teacher.apply_fn, params, {}, mpl_batch.targets_strong, keys.teacher)
      return mpl.exact_mpl_loss(state.student, logits, mpl_batch, eta, hparams.label_smoothing, keys)[0]

    grads = jax.grad(loss)(teacher.params)
    rng_np = np.random.default_rng(0)
    for direction in [grads] + [jax.tree.map(lambda x: rng_np.normal(size=x.shape), grads) for _ in range(2)]:
      norm = np.sqrt(sum(np.vdot(d, d) for d in jax.tree.leaves(direction)))
      direction = jax.tree.map(lambda d: d / norm, direction)
      step = 1e-5
      numeric = (loss(jax.tree.map(lambda p, d: p + step * d, teacher.params, direction))
                 - loss(jax.tree.map(lambda p, d: p - step * d, teacher.params, direction))) / (2 * step)
      analytic = sum(np.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
      assert abs(float(numeric) - float(analytic)) <= 1e-6 * abs(float(analytic)), (numeric, analytic)

    # The real step: T_R's plain-SGD update is -lr times that gradient (no own loss: the feedback alone).
    new_state, metrics = jax.jit(functools.partial(mpl.mpl_step, hparams=hparams))(state, batch, rng)
    teacher_lr = float(state.teacher.learning_rate_fn(0))
    for old, new, g in zip(jax.tree.leaves(teacher.params), jax.tree.leaves(new_state.teacher.params),
                           jax.tree.leaves(grads)):
      np.testing.assert_allclose((old - new) / teacher_lr, g, rtol=1e-8, atol=1e-12)
    # The metrics are float32.
    assert float(metrics['teacher/loss_mpl']) == pytest.approx(float(loss(teacher.params)), rel=1e-6)


def _one_step(feedback, pseudo_labels, student_lr=0.1, perturb=True):
  state = reduced_mpl_state(student_lr=student_lr)
  if perturb:
    state = state.replace(teacher=state.teacher.replace(**_perturbed(state.teacher.variables, 1)))
  hparams = mpl.MplHparams(feedback=feedback, pseudo_labels=pseudo_labels, teacher='reduced')
  new_state, metrics = jax.jit(functools.partial(mpl.mpl_step, hparams=hparams))(
      state, reduced_batch(2), jax.random.key(3))
  return state, new_state, metrics


def test_h_is_exactly_zero_when_the_student_does_not_move():
  state, new_state, metrics = _one_step('hard_taylor', 'sampled', student_lr=0.0)
  assert float(metrics['mpl/h']) == 0.0
  for old, new in zip(jax.tree.leaves(state.teacher.params), jax.tree.leaves(new_state.teacher.params)):
    np.testing.assert_array_equal(old, new)
  _, _, moving = _one_step('hard_taylor', 'sampled', student_lr=0.1)
  assert float(moving['mpl/h']) != 0.0


@pytest.mark.parametrize('feedback,pseudo_labels', [('exact', 'soft'), ('hard_dot', 'sampled'),
                                                    ('hard_taylor', 'argmax'), ('none', 'soft'),
                                                    ('none', 'sampled')])
def test_every_feedback_mode_and_pseudo_label_choice_runs_with_the_reduced_teacher(feedback, pseudo_labels):
  state, new_state, metrics = _one_step(feedback, pseudo_labels)
  assert all(np.isfinite(float(value)) for value in metrics.values())
  assert 'teacher/loss_sup' not in metrics   # T_R has no loss of its own
  teacher_moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.teacher.params),
                                                              jax.tree.leaves(new_state.teacher.params)))
  assert teacher_moved == (feedback != 'none')   # 'none': plain distillation from T's fixed targets
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.student.params),
                                                      jax.tree.leaves(new_state.student.params)))


def test_reduced_teacher_with_uda_is_a_one_line_error():
  with pytest.raises(Exception, match='uda.weight'):
    mpl.MplHparams(teacher='reduced', uda=mpl.UdaHparams(weight=1.0))
