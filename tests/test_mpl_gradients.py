"""The teacher's feedback is the gradient it claims to be (MPL_SPEC.md, "Properties the tests must prove").

Everything runs in float64 inside `jax.enable_x64(True)` (a context, so x64 does not leak into other test files),
on a small MLP and on a small conv net with BatchNorm and dropout. Central finite differences use fixed dropout
keys, so every function differentiated here is deterministic and smooth.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meta_pseudo_labels import losses
from meta_pseudo_labels import mpl
from meta_pseudo_labels import train_state
import mpl_test_models as tm

MODEL_NAMES = tuple(tm.MODELS)
FD_STEP = 1e-5
LABEL_SMOOTHING = 0.1


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def tree_dot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def axpy(alpha, x, y):
  return jax.tree.map(lambda xi, yi: alpha * xi + yi, x, y)


def random_direction(rng, tree):
  """A random unit-norm direction in parameter space."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(rng, len(leaves))
  direction = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
  norm = jnp.sqrt(tree_dot(direction, direction))
  return jax.tree.map(lambda x: x / norm, direction)


def central_difference(fn, params, direction, step=FD_STEP):
  return (fn(axpy(step, direction, params)) - fn(axpy(-step, direction, params))) / (2 * step)


def assert_matches_finite_differences(fn, params, grads, seed, num_directions=3, rtol=1e-4):
  """<grads, v> equals the central difference of `fn` along v, for the gradient direction and random ones."""
  directions = [jax.tree.map(lambda g: g / jnp.sqrt(tree_dot(grads, grads)), grads)]
  directions += [random_direction(jax.random.key(seed + i), params) for i in range(num_directions - 1)]
  for direction in directions:
    analytic = float(tree_dot(grads, direction))
    numeric = float(central_difference(fn, params, direction))
    assert abs(numeric - analytic) <= rtol * abs(analytic), (numeric, analytic)
  return directions


class Setup:
  """Float64 teacher, student, batch and fixed dropout keys for one tiny model."""

  def __init__(self, name, seed=0):
    self.model, input_shape = tm.MODELS[name]
    keys = jax.random.split(jax.random.key(seed), 4)
    self.teacher = tm.to_float64(train_state.init_variables(keys[0], self.model, input_shape))
    self.student = tm.to_float64(train_state.init_variables(keys[1], self.model, input_shape))
    self.batch = tm.to_float64(tm.make_batch(keys[2], input_shape))
    self.teacher_rng, self.student_rng, self.feedback_rng = mpl.step_rngs(keys[3], 0)

  @property
  def apply(self):
    return self.model.apply

  def teacher_logits_strong(self, teacher_params):
    logits, _ = mpl.apply_train(self.apply, teacher_params, self.teacher['batch_stats'],
                                self.batch['unlabeled_strong'], self.teacher_rng)
    return logits

  def exact_mpl_loss(self, teacher_params, learning_rate):
    loss, _ = mpl.exact_mpl_loss(self.apply, self.student['params'], self.student['batch_stats'],
                                 self.teacher_logits_strong(teacher_params), self.batch['unlabeled_strong'],
                                 self.batch['labeled_image'], self.batch['labeled_label'], learning_rate,
                                 LABEL_SMOOTHING, self.student_rng, self.feedback_rng)
    return loss

  def hard_pseudo_labels(self):
    return jnp.argmax(self.teacher_logits_strong(self.teacher['params']), axis=-1)

  def student_sgd_step(self, learning_rate, pseudo_labels=None):
    """theta_S' = theta_S - eta * grad CE(y_hat, S(x_s)) (plain SGD): (new params, g_u)."""
    pseudo_labels = self.hard_pseudo_labels() if pseudo_labels is None else pseudo_labels
    student = mpl.student_gradient(self.apply, self.student['params'], self.student['batch_stats'],
                                   self.batch['unlabeled_strong'], pseudo_labels, 0.0, self.student_rng)
    return axpy(-learning_rate, student.grads, self.student['params']), student.grads

  def feedback_args(self, new_params, labeled_image=None, labeled_label=None):
    return (self.apply, self.student['params'], new_params, self.student['batch_stats'],
            self.batch['labeled_image'] if labeled_image is None else labeled_image,
            self.batch['labeled_label'] if labeled_label is None else labeled_label, self.feedback_rng)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_exact_meta_gradient_matches_central_differences(name):
  setup = Setup(name)
  loss_fn = jax.jit(functools.partial(setup.exact_mpl_loss, learning_rate=1.0))
  grads = jax.jit(jax.grad(loss_fn))(setup.teacher['params'])
  assert float(optax.global_norm(grads)) > 1e-6  # the teacher hears the student
  assert_matches_finite_differences(loss_fn, setup.teacher['params'], grads, seed=10)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_hard_dot_is_the_directional_derivative_it_stands_for(name):
  setup = Setup(name)
  eta = 0.5
  new_params, student_grads = setup.student_sgd_step(eta)
  h, _ = mpl.hard_dot_h(*setup.feedback_args(new_params))
  # d/de CE_l(theta_S' + e (theta_S - theta_S')) at e = 0, by central differences.
  step = jax.tree.map(jnp.subtract, setup.student['params'], new_params)
  labeled = lambda p: mpl.labeled_loss(setup.apply, p, setup.student['batch_stats'], setup.batch['labeled_image'],
                                       setup.batch['labeled_label'], setup.feedback_rng)
  numeric = (labeled(axpy(FD_STEP, step, new_params)) - labeled(axpy(-FD_STEP, step, new_params))) / (2 * FD_STEP)
  assert abs(float(h)) > 1e-8
  np.testing.assert_allclose(float(h), float(numeric), rtol=1e-6)
  # For plain SGD it is the paper's eta * <g_l(theta_S'), g_u> (App. A).
  labeled_grads = jax.grad(labeled)(new_params)
  np.testing.assert_allclose(float(h), eta * float(tree_dot(labeled_grads, student_grads)), rtol=1e-10)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_hard_taylor_converges_to_hard_dot_quadratically_in_eta(name):
  setup = Setup(name)
  errors = []
  for eta in (1e-1, 1e-2, 1e-3):
    new_params, _ = setup.student_sgd_step(eta)
    h_taylor, _, _ = mpl.hard_taylor_h(*setup.feedback_args(new_params))
    h_dot, _ = mpl.hard_dot_h(*setup.feedback_args(new_params))
    errors.append(abs(float(h_taylor - h_dot)))
  # CE(old) - CE(new) = <g(new), old - new> + 1/2 d^T H d + ...: the gap falls like eta^2.
  assert errors[0] > errors[1] > errors[2] > 0, errors
  for larger, smaller in zip(errors, errors[1:]):
    assert 30 < larger / smaller < 300, errors


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_feedback_is_exactly_zero_when_the_student_does_not_move(name):
  setup = Setup(name)
  new_params, _ = setup.student_sgd_step(0.0)
  h_taylor, _, _ = mpl.hard_taylor_h(*setup.feedback_args(new_params))
  h_dot, _ = mpl.hard_dot_h(*setup.feedback_args(new_params))
  assert float(h_taylor) == 0.0 and float(h_dot) == 0.0
  pseudo_labels = setup.hard_pseudo_labels()
  hard_mpl_grads = lambda h: jax.grad(lambda p: losses.mpl_feedback_loss(setup.teacher_logits_strong(p),
                                                                          pseudo_labels, h))(setup.teacher['params'])
  assert float(optax.global_norm(hard_mpl_grads(h_taylor))) == 0.0
  assert float(optax.global_norm(jax.grad(setup.exact_mpl_loss)(setup.teacher['params'], 0.0))) == 0.0
  # ... and non-zero as soon as the student moves.
  moved, _ = setup.student_sgd_step(0.1)
  h_moved, _, _ = mpl.hard_taylor_h(*setup.feedback_args(moved))
  assert abs(float(h_moved)) > 1e-8
  assert float(optax.global_norm(hard_mpl_grads(h_moved))) > 1e-8
  assert float(optax.global_norm(jax.grad(setup.exact_mpl_loss)(setup.teacher['params'], 0.1))) > 1e-8


@pytest.mark.parametrize('name', MODEL_NAMES)
@pytest.mark.parametrize('helps', [True, False])
def test_one_teacher_step_follows_the_sign_of_h(name, helps):
  """h > 0 (learning y_hat lowered the student's labeled loss) raises p_T(y_hat | x_s); h < 0 lowers it."""
  setup = Setup(name)
  pseudo_labels = setup.hard_pseudo_labels()
  x_strong = setup.batch['unlabeled_strong']
  # The labeled batch is x_s itself, labeled y_hat (learning y_hat helps) or another class (it hurts).
  labels = pseudo_labels if helps else (pseudo_labels + 1) % tm.NUM_CLASSES
  new_params, _ = setup.student_sgd_step(0.5, pseudo_labels)
  h, _, _ = mpl.hard_taylor_h(*setup.feedback_args(new_params, x_strong, labels))
  assert (float(h) > 0) == helps, float(h)

  def log_p_pseudo(teacher_params):
    log_probs = jax.nn.log_softmax(setup.teacher_logits_strong(teacher_params))
    return jnp.mean(jnp.take_along_axis(log_probs, pseudo_labels[:, None], axis=-1))

  grads = jax.grad(lambda p: losses.mpl_feedback_loss(setup.teacher_logits_strong(p), pseudo_labels, h))(
      setup.teacher['params'])
  stepped = axpy(-0.1, grads, setup.teacher['params'])
  change = float(log_p_pseudo(stepped) - log_p_pseudo(setup.teacher['params']))
  assert (change > 0) == helps, change


def test_the_released_feedback_has_zero_gradient_and_ours_does_not():
  """CE(sg(softmax(z)), z) (the official release) gives grad softmax - softmax = 0; our hard-label term does not."""
  logits = jax.random.normal(jax.random.key(0), (6, tm.NUM_CLASSES), jnp.float64)
  released = jax.grad(lambda z: losses.cross_entropy(z, jax.lax.stop_gradient(jax.nn.softmax(z))))(logits)
  np.testing.assert_allclose(released, 0.0, atol=1e-15)
  ours = jax.grad(lambda z: losses.mpl_feedback_loss(z, jnp.argmax(z, -1), jnp.float64(0.3)))(logits)
  assert float(jnp.abs(ours).max()) > 1e-3
  with pytest.raises(Exception, match='zero gradient'):
    mpl.MplHparams(feedback='hard_taylor', pseudo_labels='soft')


def float64_mpl_state(name, teacher_lr=0.3):
  config = tm.mpl_config(teacher_optimizer=tm.optimizer_config(learning_rate=teacher_lr),
                         student_optimizer=tm.optimizer_config(learning_rate=0.5, momentum=0.9, nesterov=True,
                                                               weight_decay=1e-3))
  return tm.to_float64(tm.make_mpl_state(name, config)), teacher_lr


HPARAMS = dict(label_smoothing=LABEL_SMOOTHING, uda=mpl.UdaHparams(weight=2.0, temperature=0.7, threshold=0.3,
                                                                    ramp_steps=4))


@pytest.mark.parametrize('feedback', ['exact', 'hard_taylor'])
@pytest.mark.parametrize('name', MODEL_NAMES)
def test_mpl_step_teacher_update_is_the_gradient_of_the_teacher_objective(name, feedback):
  """The step's one-forward/one-backward teacher update equals -lr * grad of L_sup + w L_uda + L_mpl (by FD)."""
  state, teacher_lr = float64_mpl_state(name)
  model, input_shape = tm.MODELS[name]
  batch = tm.to_float64(tm.make_batch(jax.random.key(5), input_shape))
  rng = jax.random.key(7)
  hparams = mpl.MplHparams(feedback=feedback, **HPARAMS)
  old_teacher = state.teacher.params
  new_state, metrics = jax.jit(functools.partial(mpl.mpl_step, hparams=hparams))(state, batch, rng)
  step_grads = jax.tree.map(lambda old, new: (old - new) / teacher_lr, old_teacher, new_state.teacher.params)

  teacher_rng, student_rng, feedback_rng = mpl.step_rngs(rng, 0)
  sizes = [batch[k].shape[0] for k in ('labeled_image', 'unlabeled_weak', 'unlabeled_strong')]
  x_all = jnp.concatenate([batch['labeled_image'], batch['unlabeled_weak'], batch['unlabeled_strong']])
  split = lambda logits: jnp.split(logits, [sizes[0], sizes[0] + sizes[1]])
  _, weak0, strong0 = split(mpl.apply_train(model.apply, old_teacher, state.teacher.batch_stats, x_all,
                                            teacher_rng)[0])
  # What the step stops: the UDA targets and mask from the weak view, and the hard pseudo labels.
  uda_targets = jax.nn.softmax(weak0 / hparams.uda.temperature)
  uda_mask = (uda_targets.max(-1) >= hparams.uda.threshold).astype(jnp.float64)
  uda_weight = hparams.uda.weight * min(1.0, 1 / hparams.uda.ramp_steps)
  pseudo_labels = jnp.argmax(strong0, axis=-1)
  eta = state.student.learning_rate_fn(0)

  def objective(teacher_params):
    logits, _ = mpl.apply_train(model.apply, teacher_params, state.teacher.batch_stats, x_all, teacher_rng)
    labeled, _, strong = split(logits)
    own = (losses.cross_entropy(labeled, batch['labeled_label'], LABEL_SMOOTHING)
           + uda_weight * losses.cross_entropy(strong, uda_targets, weights=uda_mask))
    if feedback == 'exact':
      loss_mpl, _ = mpl.exact_mpl_loss(model.apply, state.student.params, state.student.batch_stats, strong,
                                       batch['unlabeled_strong'], batch['labeled_image'], batch['labeled_label'],
                                       eta, LABEL_SMOOTHING, student_rng, feedback_rng)
    else:
      loss_mpl = losses.mpl_feedback_loss(strong, pseudo_labels, metrics['mpl/h'].astype(jnp.float64))
    return own + loss_mpl

  objective = jax.jit(objective)
  # metrics are float32; the step's own h is float64, so compare the objective loosely and the gradient tightly
  # (hard_taylor: h enters as a constant, the float32 copy of it changes the gradient by ~1e-8 relative).
  rtol = 1e-4 if feedback == 'hard_taylor' else 1e-6
  assert_matches_finite_differences(objective, old_teacher, step_grads, seed=20, rtol=rtol)
  if feedback == 'hard_taylor':
    assert abs(float(metrics['mpl/h'])) > 1e-8
    # The feedback term really moved the teacher: 'none' gives a different update.
    none_state, _ = jax.jit(functools.partial(mpl.mpl_step, hparams=mpl.MplHparams(feedback='none', **HPARAMS)))(
        state, batch, rng)
    difference = jax.tree.map(jnp.subtract, none_state.teacher.params, new_state.teacher.params)
    assert float(optax.global_norm(difference)) > 1e-8
