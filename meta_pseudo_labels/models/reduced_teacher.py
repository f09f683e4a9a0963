"""The reduced teacher T_R of Reduced Meta Pseudo Labels (Pham et al., CVPR 2021, Sec. 4 and App. E), and the
compact form of the large teacher's distributions it reads.

App. E: a large teacher T is trained to convergence first and run once over the student's unlabeled images; its
predicted distributions are stored. The reduced teacher T_R, a small multi-layer perceptron, takes T's distribution
for an image and outputs the distribution the student learns from; it is trained with the student by the MPL
feedback, so only one large network (the student) is ever in accelerator memory.

Stored targets (`top_k_targets`, per image; what `trained/teacher_targets.py` writes and the MPL batch carries):
  top_log_probs  float16 [k]   log p_T of T's k most probable classes (log-softmax, so no normaliser is needed),
  top_classes    int32   [k]   those classes (stored as uint16 on disk when C <= 65536),
  rest_mass      float16 []    1 - sum of the k probabilities, computed in float32 before rounding.
Bytes per image on disk: 4k + 2 (k = 8: 34 bytes; 130M images: 4.4 GB). `stored_distribution` turns them back into
a dense distribution p_hat: the k stored probabilities, the rest mass spread evenly over the other C - k classes,
every class floored at `MIN_PROBABILITY` (T_R reads log p_hat, which must stay finite), renormalised. Its error
against T's full distribution is bounded by the rest mass (total variation <= rest_mass + float16 rounding, about
1e-3 of the stored mass) and measured in tests/test_reduced_mpl.py.

T_R (`ReducedTeacher`) is residual: logits_R = log p_hat + MLP(log p_hat), the MLP's last layer initialised at zero,
so at initialisation softmax(logits_R) = p_hat exactly and step 0 of Reduced MPL is distillation from the fixed
teacher (App. E: "many actions of T_R are close to the identity map"). The hidden sizes are a config choice.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from meta_pseudo_labels.models import layers

TARGET_KEYS = ('top_log_probs', 'top_classes', 'rest_mass')
MIN_PROBABILITY = 1e-7   # ours: the floor of every class of p_hat (log 1e-7 = -16.1: T_R's inputs stay bounded)


def top_k_targets(logits: jax.Array, k: int) -> dict[str, jax.Array]:
  """T's logits [N, C] -> the stored form (module docstring): k log-probabilities, their classes, the rest mass."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  top_log_probs, top_classes = jax.lax.top_k(log_probs, k)
  rest_mass = jnp.clip(1.0 - jnp.exp(top_log_probs).sum(-1), 0.0, 1.0)
  return {'top_log_probs': top_log_probs.astype(jnp.float16), 'top_classes': top_classes.astype(jnp.int32),
          'rest_mass': rest_mass.astype(jnp.float16)}


def stored_distribution(targets: dict[str, jax.Array], num_classes: int) -> jax.Array:
  """p_hat [N, C] of stored targets (module docstring), in float32 (or float64 where the stored values are)."""
  dtype = jnp.promote_types(targets['top_log_probs'].dtype, jnp.float32)
  top = jnp.exp(targets['top_log_probs'].astype(dtype))
  k = top.shape[-1]
  rest = targets['rest_mass'].astype(dtype) / max(num_classes - k, 1)
  dense = jnp.broadcast_to(rest[:, None], (top.shape[0], num_classes))
  dense = dense.at[jnp.arange(top.shape[0])[:, None], targets['top_classes']].set(top)
  dense = jnp.maximum(dense, MIN_PROBABILITY)
  return dense / dense.sum(-1, keepdims=True)


class ReducedTeacher(nn.Module):
  """T_R: stored targets -> logits; log p_hat plus a ReLU MLP whose last layer starts at zero (module docstring).

  No BatchNorm and no dropout: the train state's `batch_stats` is `{}`. dtype None promotes (float64 tests).
  """
  num_classes: int
  hidden_sizes: tuple[int, ...] = (512, 512)
  dtype: Optional[layers.Dtype] = None

  @nn.compact
  def __call__(self, targets: dict[str, jax.Array], *, train: bool) -> jax.Array:
    del train  # Same computation in training and evaluation.
    log_p = jnp.log(stored_distribution(targets, self.num_classes))
    x = log_p
    for features in self.hidden_sizes:
      x = nn.relu(nn.Dense(features, dtype=self.dtype)(x))
    correction = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros_init(),
                          bias_init=nn.initializers.zeros_init())(x)
    return layers.float_logits(log_p + correction)


def init_variables(rng, model: ReducedTeacher, top_k: int) -> dict:
  """{'params', 'batch_stats': {}} of T_R for targets of `top_k` classes (a batch of one uniform example)."""
  example = {'top_log_probs': jnp.full((1, top_k), -jnp.log(model.num_classes), jnp.float32),
             'top_classes': jnp.arange(top_k, dtype=jnp.int32)[None], 'rest_mass': jnp.zeros((1,), jnp.float32)}
  return {'params': model.init(rng, example, train=False)['params'], 'batch_stats': {}}
