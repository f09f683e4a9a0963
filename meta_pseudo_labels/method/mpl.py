"""The Meta Pseudo Labels update (Pham et al., CVPR 2021, Sec. 2-3 and App. A) and its baselines, as pure steps.

Every step is `(state, batch, rng, *, hparams) -> (state, metrics)`: no Python side effects, jittable with
`donate_argnums=0` (hparams are frozen dataclasses, hence hashable and static under jit). The rng of step t is
`fold_in(rng, t)`, so a resumed run draws the same dropout masks and pseudo labels as an uninterrupted one.

`mpl_step` is MPL_SPEC.md's "One MPL step": (1) one teacher forward on [x_l; x_w; x_s], (2) the teacher's own
loss, (3) pseudo labels, (4) the student's update on them, (5) the teacher's feedback and its single backward
pass, (6) the student's EMA. Steps 1-2 and the backward of 5 are the teacher's pass, one function per kind of
teacher (`TEACHER_PASSES`, chosen by `mpl.teacher`): 'network', the teacher network on the images, or 'reduced',
Reduced MPL's T_R on the large teacher's stored distributions for x_s (App. E; models/reduced_teacher.py), which
has no image forward and no loss of its own. Everything else is shared.
Steps 3-5 depend on the feedback mode, one function per mode (`FEEDBACK`), each returning the same `Feedback`:
  exact        L_mpl(theta_T) = CE(y_l, S(x_l; theta_S - eta_S grad_S CE_eps(softmax(T(x_s)), S(x_s)))),
               differentiated straight through the student's SGD step (second order; soft pseudo labels).
  hard_dot     h = <grad CE(y_l, S(x_l; theta_S')), theta_S - theta_S'>,  L_mpl = sg(h - b) CE(y_hat, T(x_s)).
  hard_taylor  h = CE(y_l, S(x_l; theta_S)) - CE(y_l, S(x_l; theta_S')),  same L_mpl.
  none         L_mpl = 0: a UDA teacher distilled into the student (reduced: T's fixed targets distilled, the control).

Pseudo labels (`pseudo_labels`, the student's targets in every mode but exact):
  sampled      y_hat ~ Categorical(softmax(T(x_s))): the paper's (Sec. 2, "Practical approximation"). Then
               h * grad CE(y_hat, T(x_s)) is a score-function estimate of grad_T E_y_hat[CE_l(theta_S'(y_hat))]
               (App. A), unbiased for hard_taylor up to the 1/|x_s| of the batch-mean CE.
  argmax       y_hat = argmax T(x_s): the released code's; the feedback then only sharpens or flattens the
               teacher's current choice (an ablation, not the paper's method).
  soft         softmax(T(x_s)), with `none` feedback (a soft-label distillation control).

Cost, in `hard_taylor` mode, exactly: one teacher forward + backward on [x_l; x_w; x_s], one student forward +
backward on x_s and two student forwards on x_l. The teacher's forward is taken with `jax.vjp` before the feedback
is known; the gradients of its own loss and of L_mpl w.r.t. its logits are added, and its one backward pass runs
on that sum.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from meta_pseudo_labels import errors
from meta_pseudo_labels.method import losses

FEEDBACK_MODES = ('exact', 'hard_dot', 'hard_taylor', 'none')
TEACHERS = ('network', 'reduced')
PSEUDO_LABELS = ('sampled', 'argmax', 'soft')
HARD_PSEUDO_LABELS = ('sampled', 'argmax')
RENAMED_PSEUDO_LABELS = {'hard': 'argmax'}   # old value -> its name now (refused with a one-line error)


def check_pseudo_labels(value):
  """One-line ConfigError for an unknown or renamed `mpl.pseudo_labels` (shared with config_validation)."""
  if value in RENAMED_PSEUDO_LABELS:
    raise errors.ConfigError(
        f"mpl.pseudo_labels: {value!r} was renamed {RENAMED_PSEUDO_LABELS[value]!r} (the released code's argmax "
        "labels); the paper samples them: set mpl.pseudo_labels='sampled' (default) or 'argmax'")
  if value not in PSEUDO_LABELS:
    raise errors.ConfigError(f'mpl.pseudo_labels: unknown {value!r}; choose one of {list(PSEUDO_LABELS)}')


def _check_smoothing_and_ema(label_smoothing, ema_decay):
  """The ranges both step's hyper-parameters share (MplHparams, SupervisedHparams)."""
  if not 0.0 <= label_smoothing < 1.0:
    raise errors.ConfigError(f'label_smoothing: must be in [0, 1), got {label_smoothing}')
  if not 0.0 <= ema_decay < 1.0:
    raise errors.ConfigError(f'ema_decay: must be in [0, 1), got {ema_decay}')


@dataclasses.dataclass(frozen=True)
class UdaHparams:
  """The teacher's UDA term (Xie et al. 2020; MPL App. C). weight 0 turns it off."""
  weight: float = 0.0
  temperature: float = 1.0
  threshold: float = 0.0
  ramp_steps: int = 0

  @classmethod
  def from_config(cls, uda_config, enabled=True):
    return cls(weight=float(uda_config.weight) if enabled else 0.0, temperature=float(uda_config.temperature),
               threshold=float(uda_config.threshold), ramp_steps=int(uda_config.ramp_steps))

  def __post_init__(self):
    if self.weight < 0:
      raise errors.ConfigError(f'uda.weight: must be >= 0, got {self.weight}')
    if self.temperature <= 0:
      raise errors.ConfigError(f'uda.temperature: must be > 0, got {self.temperature}')
    if not 0.0 <= self.threshold <= 1.0:
      raise errors.ConfigError(f'uda.threshold: must be in [0, 1], got {self.threshold}')
    if self.ramp_steps < 0:
      raise errors.ConfigError(f'uda.ramp_steps: must be >= 0, got {self.ramp_steps}')


@dataclasses.dataclass(frozen=True)
class MplHparams:
  """Static hyper-parameters of `mpl_step` (hashable: a jit static argument)."""
  feedback: str = 'hard_taylor'
  h_sign: float = 1.0            # +1: h = CE_old - CE_new (correct, MPL_SPEC.md); -1: released code's flipped sign
  baseline_rate: float = 0.0     # alpha of the moving-average baseline b <- b + alpha (h - b); 0 disables
  pseudo_labels: str = 'sampled' # the student's targets (module docstring); 'exact' always uses soft ones
  label_smoothing: float = 0.0
  uda: UdaHparams = UdaHparams()
  ema_decay: float = 0.0
  teacher: str = 'network'       # 'network': the teacher on images; 'reduced': T_R on stored targets (App. E)

  @classmethod
  def from_config(cls, config):
    """From the experiment config (attribute access: a ConfigDict or any namespace)."""
    return cls(feedback=config.mpl.feedback, h_sign=float(config.mpl.h_sign),
               baseline_rate=float(config.mpl.baseline_rate), pseudo_labels=config.mpl.pseudo_labels,
               label_smoothing=float(config.label_smoothing), uda=UdaHparams.from_config(config.uda),
               ema_decay=float(config.ema_decay), teacher=getattr(config.mpl, 'teacher', 'network'))

  def __post_init__(self):
    if self.teacher not in TEACHERS:
      raise errors.ConfigError(f'mpl.teacher: unknown {self.teacher!r}; choose one of {list(TEACHERS)}')
    if self.teacher == 'reduced' and self.uda.weight:
      raise errors.ConfigError('uda.weight: the reduced teacher reads stored targets, not image views, so it has no '
                               'UDA loss; set uda.weight=0 or mpl.teacher=network')
    if self.feedback not in FEEDBACK_MODES:
      raise errors.ConfigError(f'mpl.feedback: unknown mode {self.feedback!r}; choose one of '
                               f'{list(FEEDBACK_MODES)}')
    check_pseudo_labels(self.pseudo_labels)
    if self.feedback in ('hard_dot', 'hard_taylor') and self.pseudo_labels not in HARD_PSEUDO_LABELS:
      raise errors.ConfigError(
          f"mpl.pseudo_labels: feedback {self.feedback!r} needs hard pseudo labels (with soft ones its loss "
          "CE(sg(softmax(z)), z) has zero gradient); set pseudo_labels='sampled' or feedback='exact'")
    if self.h_sign not in (1.0, -1.0):
      raise errors.ConfigError(f'mpl.h_sign: must be +1 or -1, got {self.h_sign}')
    if not 0.0 <= self.baseline_rate <= 1.0:
      raise errors.ConfigError(f'mpl.baseline_rate: must be in [0, 1], got {self.baseline_rate}')
    _check_smoothing_and_ema(self.label_smoothing, self.ema_decay)

  @property
  def soft_pseudo_labels(self):
    return self.feedback == 'exact' or self.pseudo_labels == 'soft'


@dataclasses.dataclass(frozen=True)
class SupervisedHparams:
  """Static hyper-parameters of `supervised_step`: the supervised baseline, the UDA teacher, finetuning."""
  label_smoothing: float = 0.0
  uda: UdaHparams = UdaHparams()   # weight 0: labeled batch only
  ema_decay: float = 0.0

  @classmethod
  def from_config(cls, config):
    """The 'supervised' or 'uda' method of the config (UDA on only for method 'uda')."""
    return cls(label_smoothing=float(config.label_smoothing),
               uda=UdaHparams.from_config(config.uda, enabled=config.method == 'uda'),
               ema_decay=float(config.ema_decay))

  @classmethod
  def for_finetune(cls, config):
    """The student's finetuning on labeled data alone after MPL (Sec. 3.2): no UDA."""
    return dataclasses.replace(cls.from_config(config), uda=UdaHparams())

  def __post_init__(self):
    _check_smoothing_and_ema(self.label_smoothing, self.ema_decay)


# ---- the step's inputs ------------------------------------------------------------------------------------------


class StepKeys(NamedTuple):
  """The random streams of one step, all split from fold_in(rng, step)."""
  teacher: jax.Array        # dropout of the teacher's forward
  student: jax.Array        # dropout of the student's update on x_s
  feedback: jax.Array       # dropout of the student's forwards on x_l (both sides of h: the same mask)
  pseudo_labels: jax.Array  # the draw y_hat ~ T(x_s)


def step_keys(rng, step):
  return StepKeys(*jax.random.split(jax.random.fold_in(rng, step), len(StepKeys._fields)))


class MplBatch(NamedTuple):
  """A labeled batch (x_l, y_l) and two views of an unlabeled one (x_w weak, x_s strong).

  Reduced MPL's batches carry no weak view and add the large teacher's stored targets for x_s (a dict of
  `reduced_teacher.TARGET_KEYS`, joined by example id in trained/teacher_targets.py).
  """
  x_labeled: jax.Array
  y_labeled: jax.Array
  x_weak: jax.Array | None
  x_strong: jax.Array
  targets_strong: dict | None = None

  @classmethod
  def from_dict(cls, batch):
    return cls(batch['labeled_image'], batch['labeled_label'], batch.get('unlabeled_weak'),
               batch['unlabeled_strong'], batch.get('unlabeled_targets'))


# ---- building blocks: `network` is a train_state.NetworkState (anything with apply_fn, params, batch_stats) ----


def apply_train(apply_fn, params, batch_stats, x, dropout_rng):
  """Train-mode forward: BatchNorm normalises with the statistics of `x`; returns (logits, new batch_stats)."""
  logits, updates = apply_fn({'params': params, 'batch_stats': batch_stats}, x, train=True,
                             rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
  return logits, updates.get('batch_stats', batch_stats)


def labeled_loss(network, params, x_labeled, y_labeled, dropout_rng):
  """CE(y_l, S(x_l; params)), the student's labeled loss that the feedback h measures.

  Train-mode BatchNorm on the x_l batch alone with its statistics update discarded, and a dropout mask fixed by
  `dropout_rng`: both sides of h use this same function with the same key, so h is exactly 0 when the student
  does not move (unlike released code, whose 'old' side normalised over [x_s; x_l], MPL_SPEC.md).
  """
  logits, _ = apply_train(network.apply_fn, params, network.batch_stats, x_labeled, dropout_rng)
  return losses.cross_entropy(logits, y_labeled)


def hard_taylor_h(network, new_params, x_labeled, y_labeled, dropout_rng):
  """h = CE_l(old) - CE_l(new) (first-order Taylor form of the MPL feedback, App. A); returns (h, metrics)."""
  before = labeled_loss(network, network.params, x_labeled, y_labeled, dropout_rng)
  after = labeled_loss(network, new_params, x_labeled, y_labeled, dropout_rng)
  return before - after, {'student/labeled_loss_before': before, 'student/labeled_loss_after': after}


def hard_dot_h(network, new_params, x_labeled, y_labeled, dropout_rng):
  """h = <grad CE_l(theta_S'), theta_S - theta_S'>; returns (h, metrics).

  For plain SGD theta_S - theta_S' = eta_S * g_u and this is the paper's eta_S <g_l(theta_S'), g_u> (App. A);
  with momentum, weight decay or clipping it is the same first-order estimate of CE_l(old) - CE_l(new) along the
  update the student really took.
  """
  after, grads = jax.value_and_grad(functools.partial(labeled_loss, network))(new_params, x_labeled, y_labeled,
                                                                              dropout_rng)
  step = jax.tree.map(jnp.subtract, network.params, new_params)
  h = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(step)))
  return h, {'student/labeled_loss_after': after}


class StudentGradient(NamedTuple):
  loss: jax.Array
  grads: Any
  batch_stats: Any


def student_gradient(network, x_strong, targets, label_smoothing, dropout_rng):
  """Value and gradient of the student's loss CE_eps(targets, S(x_s)) (one forward + backward, train mode)."""
  def loss_fn(params):
    logits, new_batch_stats = apply_train(network.apply_fn, params, network.batch_stats, x_strong, dropout_rng)
    return losses.cross_entropy(logits, targets, label_smoothing), new_batch_stats
  (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(network.params)
  return StudentGradient(loss, grads, new_batch_stats)


def exact_mpl_loss(student, teacher_logits_strong, batch, learning_rate, label_smoothing, keys):
  """L_mpl as a function of the teacher's logits on x_s, differentiable to second order (MPL_SPEC 'exact').

  theta_S'(z) = theta_S - eta_S * grad CE_eps(softmax(z), S(x_s; theta_S)); L_mpl = CE(y_l, S(x_l; theta_S')).
  The lookahead is plain SGD at the current eta_S. Returns (L_mpl, StudentGradient): the inner gradient is
  exactly the gradient of the student's real update, returned stopped so the step does not recompute it.
  """
  inner = student_gradient(student, batch.x_strong, jax.nn.softmax(teacher_logits_strong, axis=-1),
                           label_smoothing, keys.student)
  lookahead = jax.tree.map(lambda p, g: p - learning_rate * g, student.params, inner.grads)
  loss = labeled_loss(student, lookahead, batch.x_labeled, batch.y_labeled, keys.feedback)
  return loss, jax.tree.map(jax.lax.stop_gradient, inner)


def draw_pseudo_labels(logits_strong, kind, rng):
  """The student's targets on x_s from the teacher's (stopped) logits: see the module docstring."""
  if kind == 'sampled':
    return jax.random.categorical(rng, logits_strong, axis=-1)
  if kind == 'argmax':
    return jnp.argmax(logits_strong, axis=-1)
  return jax.nn.softmax(logits_strong, axis=-1)


def teacher_own_loss(logits_labeled, y_labeled, logits_weak, logits_strong, step, label_smoothing, uda):
  """L_sup + w(t) L_uda of the teacher (Sec. 3.2, App. C); returns (loss, metrics). UDA off when weight is 0."""
  loss_sup = losses.cross_entropy(logits_labeled, y_labeled, label_smoothing)
  metrics = {'loss_sup': loss_sup}
  if not uda.weight:
    return loss_sup, metrics
  loss_uda, mask_rate = losses.uda_loss(logits_weak, logits_strong, uda.temperature, uda.threshold)
  weight = losses.uda_weight(step, uda.weight, uda.ramp_steps)
  metrics.update(loss_uda=loss_uda, uda_weight=weight, uda_mask_rate=mask_rate)
  return loss_sup + weight * loss_uda, metrics


def ema_update(ema, variables, step, decay):
  """EMA with decay min(d, (t+1)/(t+10)), so early averages are not dominated by the initialisation."""
  t = jnp.asarray(step, jnp.float32)
  rate = jnp.minimum(decay, (t + 1.0) / (t + 10.0))
  return jax.tree.map(lambda e, v: (rate * e + (1.0 - rate) * v).astype(e.dtype), ema, variables)


def _float32_metrics(metrics):
  return {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}


def _offsets(sizes):
  """Split points of a concatenation of parts with these leading sizes."""
  offsets, total = [], 0
  for size in sizes[:-1]:
    total += size
    offsets.append(total)
  return offsets


# ---- the feedback modes: steps 3-5 of an MPL step -----------------------------------------------------------------


class FeedbackInputs(NamedTuple):
  """What a feedback mode sees: the student before its update and the teacher's logits on x_s."""
  student: Any                  # train_state.NetworkState
  teacher_logits_strong: jax.Array
  batch: MplBatch
  keys: StepKeys
  step: jax.Array
  baseline: jax.Array           # moving average of h over the previous steps
  hparams: MplHparams


class Feedback(NamedTuple):
  """What every feedback mode returns."""
  new_student: Any              # the student after its real update on the pseudo labels
  student_gradient: StudentGradient
  loss_mpl: jax.Array
  logits_grad: jax.Array        # d L_mpl / d T(x_s): the feedback's share of the teacher's backward pass
  baseline: jax.Array
  metrics: dict


def exact_feedback(inputs: FeedbackInputs) -> Feedback:
  """Soft pseudo labels; L_mpl through the student's lookahead step, whose inner gradient is also the gradient of
  the student's real update (one student backward serves both)."""
  student, hparams = inputs.student, inputs.hparams
  eta = student.learning_rate_fn(inputs.step)
  (loss_mpl, student_grad), logits_grad = jax.value_and_grad(exact_mpl_loss, argnums=1, has_aux=True)(
      student, inputs.teacher_logits_strong, inputs.batch, eta, hparams.label_smoothing, inputs.keys)
  new_student = student.apply_gradients(student_grad.grads, student_grad.batch_stats, inputs.step)
  return Feedback(new_student, student_grad, loss_mpl, logits_grad, inputs.baseline,
                  {'student/labeled_loss_after': loss_mpl})


def pseudo_label_feedback(inputs: FeedbackInputs, *, h_fn=None) -> Feedback:
  """Pseudo labels, the student's step on them, then h = `h_fn` (None: no feedback) and L_mpl = sg(h - b) CE(y_hat,
  T(x_s)) (Sec. 2, App. A). The advantage uses the baseline of the previous steps, independent of this y_hat."""
  student, batch, keys, hparams = inputs.student, inputs.batch, inputs.keys, inputs.hparams
  logits_strong = jax.lax.stop_gradient(inputs.teacher_logits_strong)
  pseudo_labels = draw_pseudo_labels(logits_strong, hparams.pseudo_labels, keys.pseudo_labels)
  student_grad = student_gradient(student, batch.x_strong, pseudo_labels, hparams.label_smoothing, keys.student)
  new_student = student.apply_gradients(student_grad.grads, student_grad.batch_stats, inputs.step)
  if h_fn is None:
    zero = jnp.zeros((), jnp.float32)
    return Feedback(new_student, student_grad, zero, jnp.zeros_like(logits_strong), inputs.baseline, {})
  h, metrics = h_fn(student, new_student.params, batch.x_labeled, batch.y_labeled, keys.feedback)
  advantage = hparams.h_sign * (h - inputs.baseline)
  baseline = inputs.baseline + hparams.baseline_rate * (h - inputs.baseline)
  loss_mpl, logits_grad = jax.value_and_grad(losses.mpl_feedback_loss)(inputs.teacher_logits_strong,
                                                                       pseudo_labels, advantage)
  return Feedback(new_student, student_grad, loss_mpl, logits_grad, baseline, {'mpl/h': h, **metrics})


FEEDBACK = {
    'exact': exact_feedback,
    'hard_dot': functools.partial(pseudo_label_feedback, h_fn=hard_dot_h),
    'hard_taylor': functools.partial(pseudo_label_feedback, h_fn=hard_taylor_h),
    'none': pseudo_label_feedback,
}


# ---- steps --------------------------------------------------------------------------------------------------


class TeacherPass(NamedTuple):
  """The teacher's side of one MPL step: its forward, its own loss, and its backward pass waiting for the feedback."""
  logits_strong: jax.Array      # the teacher's logits on x_s: what the pseudo labels and the feedback read
  own_loss: jax.Array           # L_sup + w(t) L_uda (0 for the reduced teacher)
  own_metrics: dict
  own_logits_grad_norm: jax.Array   # |d own_loss / d logits|: what the feedback is measured against
  backward: Any                 # d L_mpl / d logits_strong -> the gradient of own loss + L_mpl w.r.t. the params
  batch_stats: Any              # the statistics of the forward pass


def network_teacher_pass(teacher, batch: MplBatch, keys: StepKeys, step, hparams: MplHparams) -> TeacherPass:
  """The teacher network: one forward on [x_l; x_w; x_s] (its vjp kept for one backward pass), its own loss
  L_sup + w(t) L_uda and that loss's gradient w.r.t. the logits."""
  sizes = (batch.x_labeled.shape[0], batch.x_weak.shape[0], batch.x_strong.shape[0])

  def forward(params):
    return apply_train(teacher.apply_fn, params, teacher.batch_stats,
                       jnp.concatenate([batch.x_labeled, batch.x_weak, batch.x_strong]), keys.teacher)
  logits, vjp, batch_stats = jax.vjp(forward, teacher.params, has_aux=True)

  def own_loss_fn(logits):
    labeled, weak, strong = jnp.split(logits, _offsets(sizes))
    return teacher_own_loss(labeled, batch.y_labeled, weak, strong, step, hparams.label_smoothing, hparams.uda)
  (own_loss, own_metrics), own_logits_grad = jax.value_and_grad(own_loss_fn, has_aux=True)(logits)

  strong_start = sizes[0] + sizes[1]
  def backward(strong_logits_grad):
    (grads,) = vjp(own_logits_grad.at[strong_start:].add(strong_logits_grad))
    return grads
  return TeacherPass(logits[strong_start:], own_loss, own_metrics, optax.global_norm(own_logits_grad), backward,
                     batch_stats)


def reduced_teacher_pass(teacher, batch: MplBatch, keys: StepKeys, step, hparams: MplHparams) -> TeacherPass:
  """Reduced MPL's T_R (App. E; models/reduced_teacher.py) on the large teacher's stored targets for x_s: no image
  forward, no UDA (there are no views), no supervised loss of its own (ours: App. E trains T_R by the feedback; its
  residual form starts it at T's distribution). Its update is the feedback's gradient alone."""
  del step, hparams
  def forward(params):
    return apply_train(teacher.apply_fn, params, teacher.batch_stats, batch.targets_strong, keys.teacher)
  logits, vjp, batch_stats = jax.vjp(forward, teacher.params, has_aux=True)
  backward = lambda strong_logits_grad: vjp(strong_logits_grad)[0]
  return TeacherPass(logits, jnp.zeros((), jnp.float32), {}, jnp.zeros((), jnp.float32), backward, batch_stats)


TEACHER_PASSES = {'network': network_teacher_pass, 'reduced': reduced_teacher_pass}


def mpl_step(state, batch, rng, *, hparams: MplHparams):
  """One MPL step: teacher and student update each other once (MPL_SPEC.md 'One MPL step'); the teacher is the
  network or Reduced MPL's T_R, by `hparams.teacher` (`TEACHER_PASSES`)."""
  teacher, student, step = state.teacher, state.student, state.step
  keys = step_keys(rng, step)
  batch = MplBatch.from_dict(batch)

  # 1-2. The teacher's forward and its own loss; its backward waits for the feedback.
  teacher_pass = TEACHER_PASSES[hparams.teacher](teacher, batch, keys, step, hparams)

  # 3-5. Pseudo labels, the student's update on them, and the student's feedback to the teacher.
  feedback = FEEDBACK[hparams.feedback](FeedbackInputs(student, teacher_pass.logits_strong, batch, keys, step,
                                                       state.mpl_baseline, hparams))

  # 5. The teacher's single backward pass, on the sum of both logit gradients, and its update.
  teacher_grads = teacher_pass.backward(feedback.logits_grad)
  new_teacher = teacher.apply_gradients(teacher_grads, teacher_pass.batch_stats, step)
  # 6. EMA of the student.
  student_ema = ema_update(state.student_ema, feedback.new_student.variables, step, hparams.ema_decay)

  metrics = {f'teacher/{name}': value for name, value in teacher_pass.own_metrics.items()}
  metrics.update(feedback.metrics)
  metrics.update({
      'teacher/loss': teacher_pass.own_loss + feedback.loss_mpl,
      'teacher/loss_mpl': feedback.loss_mpl,
      'teacher/learning_rate': teacher.learning_rate_fn(step),
      'teacher/grad_norm': optax.global_norm(teacher_grads),
      # The two parts of the teacher's gradient at its logits: how large the student's feedback is against the
      # teacher's own loss (a feedback orders of magnitude smaller cannot move the teacher).
      'teacher/own_logits_grad_norm': teacher_pass.own_logits_grad_norm,
      'mpl/feedback_logits_grad_norm': optax.global_norm(feedback.logits_grad),
      'student/loss': feedback.student_gradient.loss,
      'student/learning_rate': student.learning_rate_fn(step),
      'student/grad_norm': optax.global_norm(feedback.student_gradient.grads),
      'mpl/baseline': feedback.baseline,
  })
  new_state = state.replace(step=step + 1, teacher=new_teacher, student=feedback.new_student,
                            student_ema=student_ema,
                            mpl_baseline=feedback.baseline.astype(state.mpl_baseline.dtype))
  return new_state, _float32_metrics(metrics)


def supervised_step(state, batch, rng, *, hparams: SupervisedHparams):
  """One step of a network trained alone: L_sup, plus w(t) L_uda on the unlabeled views when uda.weight > 0.

  The supervised baseline, the UDA teacher (one forward on [x_l; x_w; x_s], like the MPL teacher) and the
  student's finetuning (labeled keys only) are all this step.
  """
  network, step = state.network, state.step
  dropout_rng = jax.random.fold_in(rng, step)
  x_labeled, y_labeled = batch['labeled_image'], batch['labeled_label']
  parts = [x_labeled]
  if hparams.uda.weight:
    parts += [batch['unlabeled_weak'], batch['unlabeled_strong']]
  sizes = tuple(part.shape[0] for part in parts)

  def loss_fn(params):
    logits, batch_stats = apply_train(network.apply_fn, params, network.batch_stats, jnp.concatenate(parts),
                                      dropout_rng)
    logits_labeled, *logits_unlabeled = jnp.split(logits, _offsets(sizes))
    logits_weak, logits_strong = logits_unlabeled or (None, None)
    loss, metrics = teacher_own_loss(logits_labeled, y_labeled, logits_weak, logits_strong, step,
                                     hparams.label_smoothing, hparams.uda)
    return loss, (metrics, batch_stats)

  (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(network.params)
  new_network = network.apply_gradients(grads, batch_stats, step)
  ema = state.ema
  if ema is not None:
    ema = ema_update(ema, new_network.variables, step, hparams.ema_decay)
  metrics.update(loss=loss, learning_rate=network.learning_rate_fn(step), grad_norm=optax.global_norm(grads))
  return (state.replace(step=step + 1, network=new_network, ema=ema),
          _float32_metrics({f'train/{name}': value for name, value in metrics.items()}))


# After MPL the student is finetuned on labeled data alone (Sec. 3.2): a supervised step without UDA
# (hparams from `SupervisedHparams.for_finetune`), on batches with the labeled keys only.
finetune_step = supervised_step

