"""The TwoMoon network of the paper's Sec. 3.1: an MLP with 2 hidden layers of 8 sigmoid units."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from meta_pseudo_labels.models import layers


def symmetric_uniform(limit: float) -> layers.Initializer:
  """U(-limit, limit) initialiser; the paper initialises the TwoMoon weights from U(-0.1, 0.1) (Sec. 3.1)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-limit, maxval=limit)

  return init


class MLP(layers.Classifier):
  """Sigmoid MLP on flat inputs [N, D] (extra trailing dims are flattened).

  The paper fixes the weights' initialisation, U(-0.1, 0.1), and says nothing of biases: we start the biases at
  zero. No BatchNorm and no dropout (none in the paper), so `variables['batch_stats']` is `{}` and the model
  ignores `model.dropout_rate`.
  """
  num_classes: int
  hidden_sizes: tuple[int, ...] = (8, 8)
  init_limit: float = 0.1
  dtype: Optional[layers.Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train  # Same computation in training and evaluation.
    x = x.reshape(x.shape[0], -1)
    dense = lambda features: nn.Dense(features, dtype=self.dtype, kernel_init=symmetric_uniform(self.init_limit),
                                      bias_init=nn.initializers.zeros_init())
    for features in self.hidden_sizes:
      x = nn.sigmoid(dense(features)(x))
    return layers.float_logits(dense(self.num_classes)(x))
