"""ResNet v1.5 (He et al., 2016; stride on the 3x3 convolution of the bottleneck) with the ImageNet stem.

Meta Pseudo Labels uses ResNet-50 for ImageNet-10% (App. C) with dropout 0.1 before the classifier. ResNet-50 has
25.56M parameters for 1000 classes. The last BatchNorm of every residual branch starts with scale 0, so each block
starts as the identity (Goyal et al., 2017), which the large-batch ImageNet recipes rely on.
"""

import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from meta_pseudo_labels.models import layers
from meta_pseudo_labels.models import remat

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')  # He et al. (2015)


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (ResNet-18/34)."""
  filters: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), strides=self.strides)(x), train=train))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y, train=train)
    return nn.relu(projection_shortcut(self, x, y.shape[-1], train) + y)


class BottleneckBlock(nn.Module):
  """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN plus shortcut, then ReLU (ResNet-50/101)."""
  filters: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x), train=train))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), strides=self.strides)(y), train=train))
    y = self.conv(self.filters * self.expansion, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y, train=train)
    return nn.relu(projection_shortcut(self, x, y.shape[-1], train) + y)


def symmetric_conv(features: int, kernel_size: tuple[int, int], strides: int = 1, *, dtype=None, name=None):
  """Bias-free convolution padded by (k - 1) / 2 on each side: the ImageNet ResNet geometry at any input parity."""
  return nn.Conv(features, kernel_size, strides=strides, padding=[((k - 1) // 2,) * 2 for k in kernel_size],
                 use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


def projection_shortcut(block: nn.Module, x: jax.Array, filters: int, train: bool) -> jax.Array:
  """Identity, or a strided 1x1 convolution + BN when the block changes the shape (option B of He et al.).

  Called inside `block`'s compact `__call__`, so the layers it creates belong to `block`.
  """
  if x.shape[-1] == filters and block.strides == 1:
    return x
  x = block.conv(filters, (1, 1), strides=block.strides, name='projection')(x)
  return block.norm(name='projection_norm')(x, train=train)


class ResNet(layers.Classifier):
  """ResNet v1.5 on NHWC images; returns float32 logits [N, num_classes]."""
  num_classes: int
  stage_sizes: Sequence[int]
  block: type[nn.Module]
  dropout_rate: float = 0.0
  bn_momentum: float = 0.99
  bn_group_size: int = 0
  dtype: Optional[layers.Dtype] = None
  remat: str = 'none'  # remat.POLICIES: checkpointing of the stem and every residual block

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    block_cls = remat.checkpointed(self.block, self.remat)
    conv = functools.partial(symmetric_conv, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, momentum=self.bn_momentum, epsilon=1e-5,
                             group_size=self.bn_group_size, dtype=self.dtype)

    def stem(module, x, train):
      del module   # the parent of the layers below (remat.checkpointed_layers)
      x = conv(64, (7, 7), strides=2, name='stem')(x)
      x = nn.relu(norm(name='stem_norm')(x, train=train))
      return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    x = remat.checkpointed_layers(stem, self.remat)(self, x, train)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = block_cls(64 * 2**stage, strides=2 if block == 0 and stage > 0 else 1, conv=conv, norm=norm,
                      name=f'stage{stage + 1}_block{block + 1}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                      name='classifier')(x)
    return layers.float_logits(logits)
