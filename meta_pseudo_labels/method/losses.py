"""Loss terms of Meta Pseudo Labels (Pham et al., CVPR 2021, arXiv 2003.10580): pure functions of logits.

Everything here is a function of arrays only (no flax modules), so the same terms serve the MPL step, the
supervised / UDA baselines and evaluation, and can be differentiated to any order.
"""

import jax
import jax.numpy as jnp


def _check_labels(logits, labels):
  """Integer labels must have the shape of the logits without the class axis: labels [N, 1] against logits [N, C]
  would broadcast into an [N, N] loss without a word (shapes are static: this runs once, at trace time)."""
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'labels must be integer class indices, got dtype {labels.dtype} (shape {labels.shape})')
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f'labels of shape {labels.shape} do not match logits of shape {logits.shape}: integer labels '
                     f'need shape {logits.shape[:-1]}')


def _as_distribution(targets, logits):
  """Integer labels [N] become one-hot rows; probability rows [N, C] pass through (shapes checked)."""
  if jnp.issubdtype(targets.dtype, jnp.integer):
    _check_labels(logits, targets)
    return jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
  if targets.shape != logits.shape:
    raise ValueError(f'targets of shape {targets.shape} do not match logits of shape {logits.shape}: probability '
                     f'targets need the shape of the logits, integer labels shape {logits.shape[:-1]}')
  return targets.astype(logits.dtype)


def softmax_cross_entropy(logits, targets, label_smoothing=0.0):
  """Per-example cross-entropy [N] between `targets` (labels [N] or probabilities [N, C]) and `logits` [N, C].

  Label smoothing mixes the target with the uniform distribution: (1 - eps) * target + eps / C (the paper's
  CE_eps, App. C); it is linear in the target, so soft targets stay differentiable through it.
  """
  num_classes = logits.shape[-1]
  distribution = _as_distribution(targets, logits)
  if label_smoothing:
    distribution = (1.0 - label_smoothing) * distribution + label_smoothing / num_classes
  return -jnp.sum(distribution * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def cross_entropy(logits, targets, label_smoothing=0.0, weights=None):
  """Mean over the batch of `softmax_cross_entropy`; `weights` [N] multiply each example (mean over all N)."""
  per_example = softmax_cross_entropy(logits, targets, label_smoothing)
  if weights is not None:
    if weights.shape != per_example.shape:
      raise ValueError(f'weights of shape {weights.shape} do not match the {per_example.shape[0]} examples: need '
                       f'shape {per_example.shape}')
    per_example = per_example * weights
  return jnp.mean(per_example)


def uda_loss(logits_weak, logits_strong, temperature, threshold):
  """UDA consistency loss (Xie et al. 2020, used by the MPL teacher, Sec. 3.2 / App. C).

  q = sg(softmax(logits_weak / tau)); m = 1[max q >= threshold]; loss = mean(m * CE(q, logits_strong)).
  Returns (loss, mask_rate), mask_rate being the fraction of unlabeled examples that pass the threshold.
  """
  targets = jax.lax.stop_gradient(jax.nn.softmax(logits_weak / temperature, axis=-1))
  mask = (jnp.max(targets, axis=-1) >= threshold).astype(logits_strong.dtype)
  return cross_entropy(logits_strong, targets, weights=mask), jnp.mean(mask)


def uda_weight(step, weight, ramp_steps):
  """w(t) = weight * min(1, (t + 1) / ramp_steps): the UDA loss weight ramps up linearly (App. C)."""
  if ramp_steps <= 0:
    return jnp.asarray(weight, jnp.float32)
  ramp = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / ramp_steps)
  return weight * ramp


def mpl_feedback_loss(teacher_logits_strong, pseudo_labels, advantage):
  """The teacher's hard-label MPL loss sg(advantage) * CE(y_hat, T(x_s)) (Sec. 2, App. A).

  `pseudo_labels` are the integer labels y_hat the student was trained on, `advantage` = h_sign * (h - b).
  Gradient descent on it raises p_T(y_hat | x_s) when advantage > 0: the student's labeled loss dropped after
  learning y_hat. The target is a hard label on purpose: with the soft target sg(softmax(z)) this loss would be
  CE(sg(softmax(z)), z), whose gradient softmax(z) - softmax(z) is identically 0 (the official release's defect).
  """
  return jax.lax.stop_gradient(advantage) * cross_entropy(teacher_logits_strong, pseudo_labels)


def top_k_correct(logits, labels, k):
  """Per-example 1.0 where `labels` [N] is among the top-min(k, C) logits [N, C], else 0.0 (float32 [N])."""
  _check_labels(logits, labels)
  k = min(k, logits.shape[-1])
  _, top_indices = jax.lax.top_k(logits, k)
  return jnp.any(top_indices == labels[:, None], axis=-1).astype(jnp.float32)
