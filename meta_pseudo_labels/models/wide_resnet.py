"""WideResNet (Zagoruyko & Komodakis, 2016) in the form used by the CIFAR/SVHN semi-supervised literature.

WRN-d-k: a 3x3 stem convolution with 16 filters, then 3 stages of (d - 4) / 6 pre-activation residual blocks with
16k, 32k, 64k filters (strides 1, 2, 2), then BN + activation, global average pooling, dropout and a dense
classifier. As in the setup of Oliver et al. (2018), MixMatch, UDA, FixMatch and Meta Pseudo Labels (App. C):
leaky ReLU with slope 0.2, BatchNorm momentum 0.99 by default, dropout on the dense layer (MPL: 0.2), convolutions
without bias. WRN-28-2 has 1.47M parameters for 10 classes.
"""

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from meta_pseudo_labels.models import layers
from meta_pseudo_labels.models import remat

LEAKY_RELU_SLOPE = 0.2
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')  # He et al. (2015)


def activation(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, LEAKY_RELU_SLOPE)


class PreActBlock(nn.Module):
  """BN-act-conv3x3-BN-act-conv3x3 with an identity shortcut, or a 1x1 projection when the shape changes.

  `activate_before_residual` (first block of the network) feeds the BN + activation output to the shortcut as
  well, so the stem's raw convolution output is never added back un-normalised.
  """
  filters: int
  strides: int
  activate_before_residual: bool
  norm: Callable[..., nn.Module]
  dtype: Optional[layers.Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    preactivated = activation(self.norm()(x, train=train))
    shortcut = preactivated if self.activate_before_residual else x
    y = conv(self.filters, (3, 3), strides=self.strides)(preactivated)
    y = activation(self.norm()(y, train=train))
    y = conv(self.filters, (3, 3))(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      shortcut = conv(self.filters, (1, 1), strides=self.strides, name='projection')(shortcut)
    return shortcut + y


class WideResNet(layers.Classifier):
  """WRN-`depth`-`width` on NHWC images; returns float32 logits [N, num_classes]."""
  num_classes: int
  depth: int = 28
  width: int = 2
  dropout_rate: float = 0.2
  bn_momentum: float = 0.99
  bn_group_size: int = 0
  dtype: Optional[layers.Dtype] = None
  remat: str = 'none'  # remat.POLICIES: checkpointing of every PreActBlock

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n + 4, got {self.depth}')
    blocks_per_stage = (self.depth - 4) // 6
    norm = functools.partial(layers.BatchNorm, momentum=self.bn_momentum, group_size=self.bn_group_size,
                             dtype=self.dtype)
    block_cls = remat.checkpointed(PreActBlock, self.remat)
    x = nn.Conv(16, (3, 3), use_bias=False, kernel_init=conv_init, dtype=self.dtype, name='stem')(x)
    for stage, filters in enumerate((16 * self.width, 32 * self.width, 64 * self.width)):
      for block in range(blocks_per_stage):
        first = block == 0
        x = block_cls(filters, strides=2 if first and stage > 0 else 1,
                      activate_before_residual=first and stage == 0, norm=norm, dtype=self.dtype,
                      name=f'stage{stage + 1}_block{block + 1}')(x, train)
    x = activation(norm(name='final_norm')(x, train=train))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                      name='classifier')(x)
    return layers.float_logits(logits)
