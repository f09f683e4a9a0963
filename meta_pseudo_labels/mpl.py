"""The Meta Pseudo Labels update (Pham et al., CVPR 2021, Sec. 2-3 and App. A) and its baselines, as pure steps.

Every step is `(state, batch, rng, *, hparams) -> (state, metrics)`: no Python side effects, jittable with
`donate_argnums=0` (hparams are frozen dataclasses, hence hashable and static under jit). The rng of step t is
`fold_in(rng, t)`, so a resumed run draws the same dropout masks as an uninterrupted one.

The MPL step (see MPL_SPEC.md) costs, in `hard_taylor` mode, exactly: one teacher forward + backward on
[x_l; x_w; x_s], one student forward + backward on x_s and two student forwards on x_l. The teacher's forward is
taken with `jax.vjp` before the feedback h is known, and its single backward pass runs once h is.

Feedback modes:
  exact        L_mpl(theta_T) = CE(y_l, S(x_l; theta_S - eta_S grad_S CE_eps(softmax(T(x_s)), S(x_s)))),
               differentiated straight through the student's SGD step (second order).
  hard_dot     h = <grad CE(y_l, S(x_l; theta_S')), theta_S - theta_S'>,  L_mpl = sg(h - b) CE(y_hat, T(x_s)).
  hard_taylor  h = CE(y_l, S(x_l; theta_S)) - CE(y_l, S(x_l; theta_S')),  same L_mpl.
  none         L_mpl = 0: a UDA teacher distilled into the student.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from meta_pseudo_labels import errors
from meta_pseudo_labels import losses

FEEDBACK_MODES = ('exact', 'hard_dot', 'hard_taylor', 'none')
PSEUDO_LABELS = ('hard', 'soft')


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
    if self.weight < 0 or self.temperature <= 0 or self.ramp_steps < 0:
      raise errors.ConfigError(f'uda: need weight >= 0, temperature > 0, ramp_steps >= 0; got {self}')


@dataclasses.dataclass(frozen=True)
class MplHparams:
  """Static hyper-parameters of `mpl_step` (hashable: a jit static argument)."""
  feedback: str = 'hard_taylor'
  h_sign: float = 1.0            # +1: h = CE_old - CE_new (correct, MPL_SPEC.md); -1: released code's flipped sign
  baseline_rate: float = 0.0     # alpha of the moving-average baseline b <- b + alpha (h - b); 0 disables
  pseudo_labels: str = 'hard'    # the student's targets; 'exact' always uses soft ones
  label_smoothing: float = 0.0
  uda: UdaHparams = UdaHparams()
  ema_decay: float = 0.0

  @classmethod
  def from_config(cls, config):
    """From the experiment config (attribute access: a ConfigDict or any namespace)."""
    return cls(feedback=config.mpl.feedback, h_sign=float(config.mpl.h_sign),
               baseline_rate=float(config.mpl.baseline_rate), pseudo_labels=config.mpl.pseudo_labels,
               label_smoothing=float(config.label_smoothing), uda=UdaHparams.from_config(config.uda),
               ema_decay=float(config.ema_decay))

  def __post_init__(self):
    if self.feedback not in FEEDBACK_MODES:
      raise errors.ConfigError(f'mpl.feedback: unknown mode {self.feedback!r}; choose one of '
                               f'{list(FEEDBACK_MODES)}')
    if self.pseudo_labels not in PSEUDO_LABELS:
      raise errors.ConfigError(f'mpl.pseudo_labels: unknown {self.pseudo_labels!r}; choose one of '
                               f'{list(PSEUDO_LABELS)}')
    if self.feedback in ('hard_dot', 'hard_taylor') and self.pseudo_labels != 'hard':
      raise errors.ConfigError(
          f"mpl.pseudo_labels: feedback {self.feedback!r} needs 'hard' pseudo labels (with soft ones its loss "
          "CE(sg(softmax(z)), z) has zero gradient); set pseudo_labels='hard' or feedback='exact'")
    if self.h_sign not in (1.0, -1.0):
      raise errors.ConfigError(f'mpl.h_sign: must be +1 or -1, got {self.h_sign}')
    if not 0.0 <= self.baseline_rate <= 1.0:
      raise errors.ConfigError(f'mpl.baseline_rate: must be in [0, 1], got {self.baseline_rate}')
    if not 0.0 <= self.label_smoothing < 1.0:
      raise errors.ConfigError(f'label_smoothing: must be in [0, 1), got {self.label_smoothing}')
    if not 0.0 <= self.ema_decay < 1.0:
      raise errors.ConfigError(f'ema_decay: must be in [0, 1), got {self.ema_decay}')

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
    if not 0.0 <= self.label_smoothing < 1.0:
      raise errors.ConfigError(f'label_smoothing: must be in [0, 1), got {self.label_smoothing}')
    if not 0.0 <= self.ema_decay < 1.0:
      raise errors.ConfigError(f'ema_decay: must be in [0, 1), got {self.ema_decay}')


# ---- building blocks ----------------------------------------------------------------------------------------


def step_rngs(rng, step):
  """(teacher, student, feedback) dropout keys of step `step`: teacher forward, student update, x_l forwards."""
  return tuple(jax.random.split(jax.random.fold_in(rng, step), 3))


def apply_train(apply_fn, params, batch_stats, x, dropout_rng):
  """Train-mode forward: BatchNorm normalises with the statistics of `x`; returns (logits, new batch_stats)."""
  logits, updates = apply_fn({'params': params, 'batch_stats': batch_stats}, x, train=True,
                             rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
  return logits, updates.get('batch_stats', batch_stats)


def labeled_loss(apply_fn, params, batch_stats, x_labeled, y_labeled, dropout_rng):
  """CE(y_l, S(x_l; params)), the student's labeled loss that the feedback h measures.

  Train-mode BatchNorm on the x_l batch alone with its statistics update discarded, and a dropout mask fixed by
  `dropout_rng`: both sides of h use this same function with the same key, so h is exactly 0 when the student
  does not move (unlike released code, whose 'old' side normalised over [x_s; x_l], MPL_SPEC.md).
  """
  logits, _ = apply_train(apply_fn, params, batch_stats, x_labeled, dropout_rng)
  return losses.cross_entropy(logits, y_labeled)


def hard_taylor_h(apply_fn, old_params, new_params, batch_stats, x_labeled, y_labeled, dropout_rng):
  """h = CE_l(old) - CE_l(new) (first-order Taylor form of the MPL feedback, App. A); returns (h, old, new)."""
  before = labeled_loss(apply_fn, old_params, batch_stats, x_labeled, y_labeled, dropout_rng)
  after = labeled_loss(apply_fn, new_params, batch_stats, x_labeled, y_labeled, dropout_rng)
  return before - after, before, after


def hard_dot_h(apply_fn, old_params, new_params, batch_stats, x_labeled, y_labeled, dropout_rng):
  """h = <grad CE_l(theta_S'), theta_S - theta_S'>; returns (h, CE_l(theta_S')).

  For plain SGD theta_S - theta_S' = eta_S * g_u and this is the paper's eta_S <g_l(theta_S'), g_u> (App. A);
  with momentum, weight decay or clipping it is the same first-order estimate of CE_l(old) - CE_l(new) along the
  update the student really took.
  """
  after, grads = jax.value_and_grad(labeled_loss, argnums=1)(apply_fn, new_params, batch_stats, x_labeled,
                                                             y_labeled, dropout_rng)
  step = jax.tree.map(jnp.subtract, old_params, new_params)
  h = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(step)))
  return h, after


class StudentGradient(NamedTuple):
  loss: jax.Array
  grads: dict
  batch_stats: dict


def student_gradient(apply_fn, params, batch_stats, x_strong, targets, label_smoothing, dropout_rng):
  """Value and gradient of the student's loss CE_eps(targets, S(x_s)) (one forward + backward, train mode)."""
  def loss_fn(p):
    logits, new_batch_stats = apply_train(apply_fn, p, batch_stats, x_strong, dropout_rng)
    return losses.cross_entropy(logits, targets, label_smoothing), new_batch_stats
  (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return StudentGradient(loss, grads, new_batch_stats)


def exact_mpl_loss(apply_fn, params, batch_stats, teacher_logits_strong, x_strong, x_labeled, y_labeled,
                   learning_rate, label_smoothing, student_rng, feedback_rng):
  """L_mpl as a function of the teacher's logits on x_s, differentiable to second order (MPL_SPEC 'exact').

  theta_S'(z) = theta_S - eta_S * grad CE_eps(softmax(z), S(x_s; theta_S)); L_mpl = CE(y_l, S(x_l; theta_S')).
  The lookahead is plain SGD at the current eta_S. Returns (L_mpl, StudentGradient): the inner gradient is
  exactly the gradient of the student's real update, returned stopped so the step does not recompute it.
  """
  def inner(z):
    return student_gradient(apply_fn, params, batch_stats, x_strong, jax.nn.softmax(z, axis=-1),
                            label_smoothing, student_rng)
  student = inner(teacher_logits_strong)
  lookahead = jax.tree.map(lambda p, g: p - learning_rate * g, params, student.grads)
  loss = labeled_loss(apply_fn, lookahead, batch_stats, x_labeled, y_labeled, feedback_rng)
  return loss, jax.tree.map(jax.lax.stop_gradient, student)


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


# ---- steps --------------------------------------------------------------------------------------------------


def mpl_step(state, batch, rng, *, hparams: MplHparams):
  """One MPL step: teacher and student update each other once (MPL_SPEC.md 'One MPL step')."""
  teacher, student, step = state.teacher, state.student, state.step
  teacher_rng, student_rng, feedback_rng = step_rngs(rng, step)
  x_labeled, y_labeled = batch['labeled_image'], batch['labeled_label']
  x_weak, x_strong = batch['unlabeled_weak'], batch['unlabeled_strong']
  sizes = (x_labeled.shape[0], x_weak.shape[0], x_strong.shape[0])

  # 1. One teacher forward; its backward waits for the feedback below.
  def teacher_forward(params):
    return apply_train(teacher.apply_fn, params, teacher.batch_stats,
                       jnp.concatenate([x_labeled, x_weak, x_strong]), teacher_rng)
  teacher_logits, teacher_vjp, teacher_batch_stats = jax.vjp(teacher_forward, teacher.params, has_aux=True)

  def own_loss(logits):
    logits_labeled, logits_weak, logits_strong = jnp.split(logits, _offsets(sizes))
    loss, own_metrics = teacher_own_loss(logits_labeled, y_labeled, logits_weak, logits_strong, step,
                                         hparams.label_smoothing, hparams.uda)
    return loss, own_metrics, logits_strong

  eta = student.learning_rate_fn(step)
  metrics = {}
  baseline = state.mpl_baseline
  if hparams.feedback == 'exact':
    # 2-4. Soft pseudo labels; L_mpl through the student's lookahead step, whose inner gradient is also the
    # gradient of the student's real update.
    def teacher_loss(logits):
      loss, own_metrics, logits_strong = own_loss(logits)
      loss_mpl, student_grad = exact_mpl_loss(student.apply_fn, student.params, student.batch_stats,
                                              logits_strong, x_strong, x_labeled, y_labeled, eta,
                                              hparams.label_smoothing, student_rng, feedback_rng)
      return loss + loss_mpl, (own_metrics, loss_mpl, student_grad)
    (teacher_total, (own_metrics, loss_mpl, student_grad)), logits_grad = jax.value_and_grad(
        teacher_loss, has_aux=True)(teacher_logits)
    new_student = student.apply_gradients(student_grad.grads, student_grad.batch_stats)
    metrics['student/labeled_loss_after'] = loss_mpl
  else:
    # 2. Pseudo labels on x_s, stopped for the student's own update.
    logits_strong = jax.lax.stop_gradient(jnp.split(teacher_logits, _offsets(sizes))[2])
    if hparams.pseudo_labels == 'hard':
      pseudo_labels = jnp.argmax(logits_strong, axis=-1)
    else:
      pseudo_labels = jax.nn.softmax(logits_strong, axis=-1)
    # 3. The student learns the pseudo labels.
    student_grad = student_gradient(student.apply_fn, student.params, student.batch_stats, x_strong,
                                    pseudo_labels, hparams.label_smoothing, student_rng)
    new_student = student.apply_gradients(student_grad.grads, student_grad.batch_stats)
    # 4. The student's feedback h on the labeled batch.
    feedback_args = (student.apply_fn, student.params, new_student.params, student.batch_stats, x_labeled,
                     y_labeled, feedback_rng)
    if hparams.feedback == 'hard_taylor':
      h, before, after = hard_taylor_h(*feedback_args)
      metrics['student/labeled_loss_before'] = before
    elif hparams.feedback == 'hard_dot':
      h, after = hard_dot_h(*feedback_args)
    if hparams.feedback == 'none':
      advantage = jnp.zeros((), jnp.float32)
    else:
      # The advantage uses the baseline of the previous steps, which does not depend on this step's y_hat.
      advantage = hparams.h_sign * (h - baseline)
      baseline = baseline + hparams.baseline_rate * (h - baseline)
      metrics.update({'mpl/h': h, 'student/labeled_loss_after': after})

    def teacher_loss(logits):
      loss, own_metrics, logits_strong = own_loss(logits)
      loss_mpl = losses.mpl_feedback_loss(logits_strong, pseudo_labels, advantage)
      return loss + loss_mpl, (own_metrics, loss_mpl)
    (teacher_total, (own_metrics, loss_mpl)), logits_grad = jax.value_and_grad(
        teacher_loss, has_aux=True)(teacher_logits)

  # 5. The teacher's single backward pass and update.
  (teacher_grads,) = teacher_vjp(logits_grad)
  new_teacher = teacher.apply_gradients(teacher_grads, teacher_batch_stats)
  # 6. EMA of the student.
  student_ema = ema_update(state.student_ema, new_student.variables, step, hparams.ema_decay)

  metrics.update({f'teacher/{name}': value for name, value in own_metrics.items()})
  metrics.update({
      'teacher/loss': teacher_total,
      'teacher/loss_mpl': loss_mpl,
      'teacher/learning_rate': teacher.learning_rate_fn(step),
      'teacher/grad_norm': optax.global_norm(teacher_grads),
      'student/loss': student_grad.loss,
      'student/learning_rate': eta,
      'student/grad_norm': optax.global_norm(student_grad.grads),
      'mpl/baseline': baseline,
  })
  new_state = state.replace(step=step + 1, teacher=new_teacher, student=new_student, student_ema=student_ema,
                            mpl_baseline=baseline.astype(state.mpl_baseline.dtype))
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
  new_network = network.apply_gradients(grads, batch_stats)
  ema = state.ema
  if ema is not None:
    ema = ema_update(ema, new_network.variables, step, hparams.ema_decay)
  metrics.update(loss=loss, learning_rate=network.learning_rate_fn(step), grad_norm=optax.global_norm(grads))
  return (state.replace(step=step + 1, network=new_network, ema=ema),
          _float32_metrics({f'train/{name}': value for name, value in metrics.items()}))


# After MPL the student is finetuned on labeled data alone (Sec. 3.2): a supervised step without UDA
# (hparams from `SupervisedHparams.for_finetune`), on batches with the labeled keys only.
finetune_step = supervised_step

