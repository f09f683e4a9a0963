"""The teacher's feedback is the gradient it claims to be (MPL_SPEC.md, "Properties the tests must prove").

Everything runs in float64 inside `jax.enable_x64(True)` (a context, so x64 does not leak into other test files),
on a small MLP and on a small conv net with BatchNorm and dropout. Central finite differences use fixed dropout
keys, so every function differentiated here is deterministic and smooth.

Speed: each model's functions are jitted once (`Setup`, cached per model) and shared by every test; the
finite-difference arithmetic on parameter trees runs in NumPy, so nothing is compiled op by op.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_pseudo_labels.method import losses
from meta_pseudo_labels.method import mpl
from meta_pseudo_labels.method import train_state
import mpl_test_models as tm

MODEL_NAMES = tuple(tm.MODELS)
FD_STEP = 1e-5
LABEL_SMOOTHING = 0.1
# XLA's backend (LLVM) optimisations only cost compile time on these tiny functions; the float64 results are the
# same.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0,
                                                   'xla_llvm_disable_expensive_passes': True})


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


# ---- parameter-tree arithmetic on the host (float64 NumPy) ---------------------------------------------------


def to_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def tree_dot(a, b):
  return float(sum(np.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def tree_norm(tree):
  return np.sqrt(tree_dot(tree, tree))


def axpy(alpha, x, y):
  return jax.tree.map(lambda xi, yi: alpha * np.asarray(xi) + np.asarray(yi), x, y)


def random_direction(seed, tree):
  """A random unit-norm direction in parameter space."""
  rng = np.random.default_rng(seed)
  direction = jax.tree.map(lambda x: rng.normal(size=np.shape(x)), tree)
  return jax.tree.map(lambda x: x / tree_norm(direction), direction)


def central_difference(fn, params, direction, step=FD_STEP):
  return (float(fn(axpy(step, direction, params))) - float(fn(axpy(-step, direction, params)))) / (2 * step)


def assert_matches_finite_differences(fn, params, grads, seed, num_directions=3, rtol=1e-4):
  """<grads, v> equals the central difference of `fn` (jitted) along v, for the gradient direction and random
  ones."""
  params, grads = to_numpy(params), to_numpy(grads)
  directions = [jax.tree.map(lambda g: g / tree_norm(grads), grads)]
  directions += [random_direction(seed + i, params) for i in range(num_directions - 1)]
  for direction in directions:
    analytic = tree_dot(grads, direction)
    numeric = central_difference(fn, params, direction)
    assert abs(numeric - analytic) <= rtol * abs(analytic), (numeric, analytic)


def student_network(model, params, batch_stats):
  """The student as the feedback helpers see it: a NetworkState without an optimizer."""
  return train_state.NetworkState(params=params, batch_stats=batch_stats, opt_state=None, apply_fn=model.apply,
                                  tx=None, learning_rate_fn=None)


class Setup:
  """Float64 teacher, student, batch, fixed dropout keys and the jitted functions of one tiny model."""

  def __init__(self, name, seed=0):
    self.model, input_shape = tm.MODELS[name]
    keys = jax.random.split(jax.random.key(seed), 4)
    init = jit(functools.partial(train_state.init_variables, model=self.model, input_shape=input_shape))
    self.teacher = tm.to_float64(init(keys[0]))
    self.student = tm.to_float64(init(keys[1]))
    self.batch = tm.to_float64(tm.make_batch(keys[2], input_shape))
    self.keys = mpl.step_keys(keys[3], 0)
    self.teacher_rng, self.student_rng, self.feedback_rng = self.keys.teacher, self.keys.student, self.keys.feedback
    apply = self.model.apply
    x_labeled, y_labeled = self.batch['labeled_image'], self.batch['labeled_label']
    self.mpl_batch = mpl.MplBatch(x_labeled, y_labeled, self.batch['unlabeled_weak'], self.batch['unlabeled_strong'])

    def student_at(params):
      return student_network(self.model, params, self.student['batch_stats'])

    def teacher_logits_strong(teacher_params):
      logits, _ = mpl.apply_train(apply, teacher_params, self.teacher['batch_stats'],
                                  self.batch['unlabeled_strong'], self.teacher_rng)
      return logits

    def exact_mpl_loss(teacher_params, learning_rate):
      loss, _ = mpl.exact_mpl_loss(student_at(self.student['params']), teacher_logits_strong(teacher_params),
                                   self.mpl_batch, learning_rate, LABEL_SMOOTHING, self.keys)
      return loss

    def student_sgd_step(learning_rate, pseudo_labels):
      """theta_S' = theta_S - eta * grad CE(y_hat, S(x_s)) (plain SGD): (new params, g_u)."""
      student = mpl.student_gradient(student_at(self.student['params']), self.batch['unlabeled_strong'],
                                     pseudo_labels, 0.0, self.student_rng)
      new_params = jax.tree.map(lambda p, g: p - learning_rate * g, self.student['params'], student.grads)
      return new_params, student.grads

    def labeled_loss(params, x_labeled, y_labeled):
      return mpl.labeled_loss(student_at(params), params, x_labeled, y_labeled, self.feedback_rng)

    def feedback(new_params, x_labeled, y_labeled):
      """(hard_taylor h, hard_dot h) of the student's move to `new_params`, measured on (x_labeled, y_labeled)."""
      args = (student_at(self.student['params']), new_params, x_labeled, y_labeled, self.feedback_rng)
      return mpl.hard_taylor_h(*args)[0], mpl.hard_dot_h(*args)[0]

    def hard_mpl_grads(teacher_params, pseudo_labels, h):
      return jax.grad(lambda p: losses.mpl_feedback_loss(teacher_logits_strong(p), pseudo_labels, h))(
          teacher_params)

    def log_p_pseudo(teacher_params, pseudo_labels):
      log_probs = jax.nn.log_softmax(teacher_logits_strong(teacher_params))
      return jnp.mean(jnp.take_along_axis(log_probs, pseudo_labels[:, None], axis=-1))

    self.teacher_logits_strong = jit(teacher_logits_strong)
    # One compilation serves the meta-gradient and, through its value, the finite differences.
    self.exact_value_and_grad = jit(jax.value_and_grad(exact_mpl_loss))
    self.student_sgd_step_fn = jit(student_sgd_step)
    self.labeled_value_and_grad = jit(jax.value_and_grad(labeled_loss))
    self._feedback = jit(feedback)
    self.hard_mpl_grads = jit(hard_mpl_grads)
    self.log_p_pseudo = jit(log_p_pseudo)

  def exact_loss_fn(self, learning_rate):
    return lambda teacher_params: self.exact_value_and_grad(teacher_params, learning_rate)[0]

  def hard_pseudo_labels(self):
    return jnp.argmax(self.teacher_logits_strong(self.teacher['params']), axis=-1)

  def student_sgd_step(self, learning_rate, pseudo_labels=None):
    pseudo_labels = self.hard_pseudo_labels() if pseudo_labels is None else pseudo_labels
    return self.student_sgd_step_fn(learning_rate, pseudo_labels)

  def labeled_loss(self, params):
    return self.labeled_value_and_grad(params, self.batch['labeled_image'], self.batch['labeled_label'])[0]

  def feedback(self, new_params, labeled_image=None, labeled_label=None):
    """Returns (h_taylor, h_dot) as Python floats."""
    h_taylor, h_dot = self._feedback(new_params,
                                     self.batch['labeled_image'] if labeled_image is None else labeled_image,
                                     self.batch['labeled_label'] if labeled_label is None else labeled_label)
    return float(h_taylor), float(h_dot)


@functools.cache
def setup_of(name):
  with jax.enable_x64(True):
    return Setup(name)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_exact_meta_gradient_matches_central_differences(name):
  setup = setup_of(name)
  _, grads = setup.exact_value_and_grad(setup.teacher['params'], 1.0)
  assert tree_norm(to_numpy(grads)) > 1e-6  # the teacher hears the student
  assert_matches_finite_differences(setup.exact_loss_fn(1.0), setup.teacher['params'], grads, seed=10)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_hard_dot_is_the_directional_derivative_it_stands_for(name):
  setup = setup_of(name)
  eta = 0.5
  new_params, student_grads = setup.student_sgd_step(eta)
  _, h = setup.feedback(new_params)
  # d/de CE_l(theta_S' + e (theta_S - theta_S')) at e = 0, by central differences.
  step = jax.tree.map(np.subtract, to_numpy(setup.student['params']), to_numpy(new_params))
  numeric = central_difference(setup.labeled_loss, to_numpy(new_params), step)
  assert abs(h) > 1e-8
  np.testing.assert_allclose(h, numeric, rtol=1e-6)
  # For plain SGD it is the paper's eta * <g_l(theta_S'), g_u> (App. A).
  _, labeled_grads = setup.labeled_value_and_grad(new_params, setup.batch['labeled_image'],
                                                  setup.batch['labeled_label'])
  np.testing.assert_allclose(h, eta * tree_dot(to_numpy(labeled_grads), to_numpy(student_grads)), rtol=1e-10)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_hard_taylor_converges_to_hard_dot_quadratically_in_eta(name):
  setup = setup_of(name)
  errors = []
  for eta in (1e-1, 1e-2, 1e-3):
    new_params, _ = setup.student_sgd_step(eta)
    h_taylor, h_dot = setup.feedback(new_params)
    errors.append(abs(h_taylor - h_dot))
  # CE(old) - CE(new) = <g(new), old - new> + 1/2 d^T H d + ...: the gap falls like eta^2.
  assert errors[0] > errors[1] > errors[2] > 0, errors
  for larger, smaller in zip(errors, errors[1:]):
    assert 30 < larger / smaller < 300, errors


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_feedback_is_exactly_zero_when_the_student_does_not_move(name):
  setup = setup_of(name)
  pseudo_labels = setup.hard_pseudo_labels()
  new_params, _ = setup.student_sgd_step(0.0)
  h_taylor, h_dot = setup.feedback(new_params)
  assert h_taylor == 0.0 and h_dot == 0.0
  hard_grad_norm = lambda h: tree_norm(to_numpy(setup.hard_mpl_grads(setup.teacher['params'], pseudo_labels, h)))
  exact_grad_norm = lambda eta: tree_norm(to_numpy(setup.exact_value_and_grad(setup.teacher['params'], eta)[1]))
  assert hard_grad_norm(h_taylor) == 0.0 and hard_grad_norm(h_dot) == 0.0
  assert exact_grad_norm(0.0) == 0.0
  # ... and non-zero as soon as the student moves.
  moved, _ = setup.student_sgd_step(0.1)
  h_taylor, h_dot = setup.feedback(moved)
  assert abs(h_taylor) > 1e-8 and abs(h_dot) > 1e-8
  assert hard_grad_norm(h_taylor) > 1e-8 and hard_grad_norm(h_dot) > 1e-8
  assert exact_grad_norm(0.1) > 1e-8


@pytest.mark.parametrize('name', MODEL_NAMES)
@pytest.mark.parametrize('helps', [True, False])
def test_one_teacher_step_follows_the_sign_of_h(name, helps):
  """h > 0 (learning y_hat lowered the student's labeled loss) raises p_T(y_hat | x_s); h < 0 lowers it."""
  setup = setup_of(name)
  pseudo_labels = setup.hard_pseudo_labels()
  x_strong = setup.batch['unlabeled_strong']
  # The labeled batch is x_s itself, labeled y_hat (learning y_hat helps) or another class (it hurts).
  labels = pseudo_labels if helps else (pseudo_labels + 1) % tm.NUM_CLASSES
  new_params, _ = setup.student_sgd_step(0.5, pseudo_labels)
  h, _ = setup.feedback(new_params, x_strong, labels)
  assert (h > 0) == helps, h
  grads = setup.hard_mpl_grads(setup.teacher['params'], pseudo_labels, h)
  stepped = axpy(-0.1, to_numpy(grads), to_numpy(setup.teacher['params']))
  change = float(setup.log_p_pseudo(stepped, pseudo_labels)) - float(
      setup.log_p_pseudo(setup.teacher['params'], pseudo_labels))
  assert (change > 0) == helps, change


def test_the_released_feedback_has_zero_gradient_and_ours_does_not():
  """CE(sg(softmax(z)), z) (the official release) gives grad softmax - softmax = 0; our hard-label term does not."""
  logits = jax.random.normal(jax.random.key(0), (6, tm.NUM_CLASSES), jnp.float64)
  released = jit(jax.grad(lambda z: losses.cross_entropy(z, jax.lax.stop_gradient(jax.nn.softmax(z)))))(logits)
  np.testing.assert_allclose(released, 0.0, atol=1e-15)
  ours = jit(jax.grad(lambda z: losses.mpl_feedback_loss(z, jnp.argmax(z, -1), jnp.float64(0.3))))(logits)
  assert float(jnp.abs(ours).max()) > 1e-3
  with pytest.raises(Exception, match='zero gradient'):
    mpl.MplHparams(feedback='hard_taylor', pseudo_labels='soft')


HPARAMS = dict(label_smoothing=LABEL_SMOOTHING, uda=mpl.UdaHparams(weight=2.0, temperature=0.7, threshold=0.3,
                                                                    ramp_steps=4))


@pytest.mark.parametrize('feedback', ['exact', 'hard_taylor'])
def test_mpl_step_teacher_update_is_the_gradient_of_the_teacher_objective(feedback):
  """The step's one-forward/one-backward teacher update equals -lr * grad of L_sup + w L_uda + L_mpl.

  On the conv net (BatchNorm and dropout in the teacher's forward on [x_l; x_w; x_s]); the objective is written
  out here unfused, and checked against autodiff and central differences.
  """
  teacher_lr = 0.3
  optimizers = tm.mpl_optimizers(teacher_optimizer=tm.optimizer_config(learning_rate=teacher_lr),
                                 student_optimizer=tm.optimizer_config(learning_rate=0.5, momentum=0.9,
                                                                       nesterov=True, weight_decay=1e-3))
  model, input_shape = tm.MODELS['convnet']
  state = tm.to_float64(jit(lambda: tm.make_mpl_state('convnet', optimizers))())
  batch = tm.to_float64(tm.make_batch(jax.random.key(5), input_shape))
  rng = jax.random.key(7)
  hparams = mpl.MplHparams(feedback=feedback, **HPARAMS)
  old_teacher = state.teacher.params
  new_state, metrics = jit(functools.partial(mpl.mpl_step, hparams=hparams))(state, batch, rng)
  # The schedule's learning rate is a float32 scalar: float32(0.3) is not 0.3 (relative gap 4e-8).
  teacher_lr = float(state.teacher.learning_rate_fn(0))
  step_grads = jax.tree.map(lambda old, new: (old - new) / teacher_lr, old_teacher, new_state.teacher.params)

  keys = mpl.step_keys(rng, 0)
  teacher_rng = keys.teacher
  sizes = [batch[k].shape[0] for k in ('labeled_image', 'unlabeled_weak', 'unlabeled_strong')]
  x_all = jnp.concatenate([batch['labeled_image'], batch['unlabeled_weak'], batch['unlabeled_strong']])
  split = lambda logits: jnp.split(logits, [sizes[0], sizes[0] + sizes[1]])
  eta = state.student.learning_rate_fn(0)
  uda_weight = hparams.uda.weight * min(1.0, 1 / hparams.uda.ramp_steps)
  h = metrics['mpl/h'].astype(jnp.float64) if feedback == 'hard_taylor' else None

  def teacher_logits(teacher_params):
    return split(mpl.apply_train(model.apply, teacher_params, state.teacher.batch_stats, x_all, teacher_rng)[0])

  # What the step stops, fixed at the old teacher (finite differences do not see stop_gradient): the UDA targets
  # and mask from the weak view, and the hard pseudo labels.
  _, weak, strong = jit(teacher_logits)(old_teacher)
  uda_targets = jax.nn.softmax(weak / hparams.uda.temperature)
  uda_mask = (uda_targets.max(-1) >= hparams.uda.threshold).astype(jnp.float64)
  pseudo_labels = mpl.draw_pseudo_labels(strong, hparams.pseudo_labels, keys.pseudo_labels)

  @jit
  @jax.value_and_grad
  def objective(teacher_params, mpl_weight):
    labeled, _, strong = teacher_logits(teacher_params)
    own = (losses.cross_entropy(labeled, batch['labeled_label'], LABEL_SMOOTHING)
           + uda_weight * losses.cross_entropy(strong, uda_targets, weights=uda_mask))
    if feedback == 'exact':
      loss_mpl, _ = mpl.exact_mpl_loss(state.student, strong, mpl.MplBatch.from_dict(batch), eta,
                                       LABEL_SMOOTHING, keys)
    else:
      loss_mpl = losses.mpl_feedback_loss(strong, pseudo_labels, h)
    return own + mpl_weight * loss_mpl

  value, grads = objective(old_teacher, 1.0)
  np.testing.assert_allclose(float(metrics['teacher/loss']), float(value), rtol=1e-5)
  # metrics are float32; hard_taylor's h enters as that float32 copy, which moves the gradient by ~1e-8 relative.
  rtol = 1e-5 if feedback == 'hard_taylor' else 1e-8
  difference = jax.tree.map(np.subtract, to_numpy(step_grads), to_numpy(grads))
  assert tree_norm(difference) <= rtol * tree_norm(to_numpy(grads)), (tree_norm(difference), tree_norm(grads))
  assert_matches_finite_differences(lambda p: objective(p, 1.0)[0], old_teacher, step_grads, seed=20,
                                    rtol=1e-4 if feedback == 'hard_taylor' else 1e-6)
  # The feedback term really moves the teacher: without it the update differs.
  _, own_grads = objective(old_teacher, 0.0)
  assert tree_norm(jax.tree.map(np.subtract, to_numpy(own_grads), to_numpy(step_grads))) > 1e-6


# ---- sampled pseudo labels: the hard-label estimator is a score-function gradient (App. A) ---------------------


def test_sampled_pseudo_labels_follow_the_teacher_distribution():
  """y_hat ~ Categorical(softmax(T(x_s))): class frequencies over many draws match the teacher's probabilities."""
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 1.0, 0.5]], jnp.float64)
  draws = jit(jax.vmap(lambda key: mpl.draw_pseudo_labels(logits, 'sampled', key)))(
      jax.random.split(jax.random.key(0), 40_000))
  frequencies = np.stack([np.mean(np.asarray(draws) == c, axis=0) for c in range(3)], axis=-1)
  probabilities = np.asarray(jax.nn.softmax(logits))
  standard_error = np.sqrt(probabilities * (1 - probabilities) / draws.shape[0])
  assert np.all(np.abs(frequencies - probabilities) <= 4 * standard_error), (frequencies, probabilities)
  np.testing.assert_array_equal(mpl.draw_pseudo_labels(logits, 'argmax', None), [0, 0, 1])


ENUMERATED_POINTS = 3   # unlabeled points; 2 classes: 2^3 = 8 label vectors y_hat, every one enumerated


def test_sampled_hard_taylor_gradient_is_unbiased_for_the_enumerated_objective():
  """E_y_hat[h grad CE(y_hat, T(x_s))] = (1/n) grad E_y_hat~T[CE_l(theta_S'(y_hat))], n = |x_s| (batch mean).

  The mean over many draws of the teacher's MPL gradient that the step's own feedback function returns
  (`mpl.pseudo_label_feedback` with hard_taylor h, the student really updated by its optimizer) equals jax.grad of
  the objective written out over every y_hat, within 3 standard errors along the gradient and random directions;
  the argmax estimator, the same for every draw, misses it by many standard errors.
  """
  model = tm.TinyMLP(num_classes=2)
  keys = jax.random.split(jax.random.key(11), 5)
  init = jit(functools.partial(train_state.init_variables, model=model, input_shape=(6,)))
  teacher = tm.to_float64(init(keys[0]))
  student_variables = tm.to_float64(init(keys[1]))
  batch = tm.to_float64(tm.make_batch(keys[2], (6,), labeled=4, mu=1, num_classes=2))
  batch = mpl.MplBatch.from_dict(batch)._replace(x_strong=batch['unlabeled_strong'][:ENUMERATED_POINTS])
  step_keys = mpl.step_keys(keys[3], 0)
  eta = 0.5
  tx, learning_rate_fn = train_state.optimizers.create_optimizer(tm.optimizer_config(learning_rate=eta), 10)
  student = train_state.NetworkState(params=student_variables['params'],
                                     batch_stats=student_variables['batch_stats'],
                                     opt_state=tx.init(student_variables['params']), apply_fn=model.apply, tx=tx,
                                     learning_rate_fn=learning_rate_fn)
  hparams = mpl.MplHparams(feedback='hard_taylor', pseudo_labels='sampled', label_smoothing=LABEL_SMOOTHING)

  def logits_strong(teacher_params):
    return mpl.apply_train(model.apply, teacher_params, teacher['batch_stats'], batch.x_strong,
                           step_keys.teacher)[0]

  def estimator(labels_key, kind):
    """The teacher's MPL gradient of one step whose pseudo labels are drawn with `labels_key`."""
    logits, vjp = jax.vjp(logits_strong, teacher['params'])
    inputs = mpl.FeedbackInputs(student, logits, batch, step_keys._replace(pseudo_labels=labels_key),
                                jnp.zeros((), jnp.int32), jnp.zeros(()), dataclasses.replace(hparams,
                                                                                             pseudo_labels=kind))
    return vjp(mpl.pseudo_label_feedback(inputs, h_fn=mpl.hard_taylor_h).logits_grad)[0]

  def enumerated_objective(teacher_params):
    """sum over y_hat of P_T(y_hat) CE_l(theta_S'(y_hat)); theta_S'(y_hat) depends on theta_T only via y_hat."""
    log_probs = jax.nn.log_softmax(logits_strong(teacher_params))
    total = 0.0
    for labels in itertools.product(range(2), repeat=ENUMERATED_POINTS):
      labels = jnp.array(labels)
      update = mpl.student_gradient(student, batch.x_strong, labels, LABEL_SMOOTHING, step_keys.student)
      moved = student.apply_gradients(update.grads, update.batch_stats, 0)
      loss = mpl.labeled_loss(student, moved.params, batch.x_labeled, batch.y_labeled, step_keys.feedback)
      total += jnp.exp(jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))) * loss
    return total

  expected = to_numpy(jit(jax.grad(enumerated_objective))(teacher['params']))
  expected = jax.tree.map(lambda g: g / ENUMERATED_POINTS, expected)
  num_draws = 20_000
  draws = to_numpy(jit(jax.vmap(lambda key: estimator(key, 'sampled')))(
      jax.random.split(jax.random.key(12), num_draws)))
  argmax = to_numpy(jit(lambda: estimator(jax.random.key(0), 'argmax'))())

  directions = [jax.tree.map(lambda g: g / tree_norm(expected), expected)]
  directions += [random_direction(30 + i, expected) for i in range(2)]
  for direction in directions:
    projections = sum(np.tensordot(d, v, axes=v.ndim) for d, v in zip(jax.tree.leaves(draws),
                                                                        jax.tree.leaves(direction)))
    mean, standard_error = projections.mean(), projections.std(ddof=1) / np.sqrt(num_draws)
    assert abs(mean - tree_dot(expected, direction)) <= 3 * standard_error, (mean, tree_dot(expected, direction),
                                                                              standard_error)
  # Along the true gradient the argmax estimator is off by far more than the sampled one's error bars.
  along = directions[0]
  projections = sum(np.tensordot(d, v, axes=v.ndim) for d, v in zip(jax.tree.leaves(draws),
                                                                      jax.tree.leaves(along)))
  standard_error = projections.std(ddof=1) / np.sqrt(num_draws)
  assert abs(tree_dot(argmax, along) - tree_dot(expected, along)) > 10 * standard_error
