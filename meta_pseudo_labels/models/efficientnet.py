"""EfficientNet B0-B7 (Tan & Le, ICML 2019) and L2 (Xie et al., "Self-training with Noisy Student", CVPR 2020).

The B0 network (Tan & Le, Table 1) is a stack of MBConv blocks (inverted bottleneck: 1x1 expansion, depthwise
convolution, squeeze-and-excitation, 1x1 projection) with swish activations. Bigger variants scale it by the
compound coefficients below: every layer's width (rounded to a multiple of 8 by `round_filters`), every stage's
depth (rounded up by `round_repeats`), the training resolution and the classifier's dropout. Residual branches are
dropped per example with a probability growing linearly with the block index (stochastic depth, the
"drop connect" of the EfficientNet release). Meta Pseudo Labels trains EfficientNet-L2 at 512x512 (Sec. 4).

Published sizes (1000 classes): B0 5.3M parameters, B7 66M (Tan & Le, Table 2), L2 480M (Xie et al., Table 2).
"""

import dataclasses
import functools
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from meta_pseudo_labels.models import layers
from meta_pseudo_labels.models import remat

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')


@dataclasses.dataclass(frozen=True)
class Scaling:
  """Compound-scaling coefficients of one variant."""
  width: float
  depth: float
  resolution: int  # the variant's training resolution; informational, the model accepts any input size
  dropout_rate: float


# Tan & Le (2019) for B0-B7; Xie et al. (2020), Table 1, for L2 (width 4.3, depth 5.3, resolution 800).
SCALINGS = {
    'b0': Scaling(1.0, 1.0, 224, 0.2),
    'b1': Scaling(1.0, 1.1, 240, 0.2),
    'b2': Scaling(1.1, 1.2, 260, 0.3),
    'b3': Scaling(1.2, 1.4, 300, 0.3),
    'b4': Scaling(1.4, 1.8, 380, 0.4),
    'b5': Scaling(1.6, 2.2, 456, 0.4),
    'b6': Scaling(1.8, 2.6, 528, 0.5),
    'b7': Scaling(2.0, 3.1, 600, 0.5),
    'l2': Scaling(4.3, 5.3, 800, 0.5),
}


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage of B0 (Tan & Le, Table 1): `repeats` MBConv blocks, the first with `strides`.

  A stage's input width is the previous stage's output (the stem's 32 channels for the first).
  """
  kernel_size: int
  strides: int
  expand_ratio: int
  filters_out: int
  repeats: int
  se_ratio: float = 0.25


B0_STAGES = (
    StageSpec(3, 1, 1, 16, 1),
    StageSpec(3, 2, 6, 24, 2),
    StageSpec(5, 2, 6, 40, 2),
    StageSpec(3, 2, 6, 80, 3),
    StageSpec(5, 1, 6, 112, 3),
    StageSpec(5, 2, 6, 192, 4),
    StageSpec(3, 1, 6, 320, 1),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Scales a channel count by `width`, to the nearest multiple of `divisor`, never more than 10% below."""
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
  """Scales a stage's number of blocks by `depth`, rounding up."""
  return int(math.ceil(depth * repeats))


def drop_connect(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Zeroes whole examples of a residual branch with probability `rate`, scaling survivors by 1 / (1 - rate)."""
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MBConvBlock(nn.Module):
  """Inverted bottleneck with squeeze-and-excitation (Sandler et al. 2018; Hu et al. 2018; Tan & Le 2019)."""
  filters_out: int
  kernel_size: int
  strides: int
  expand_ratio: int
  se_ratio: float
  drop_connect_rate: float
  norm: Callable[..., nn.Module]
  dtype: Optional[layers.Dtype] = None

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    filters_in = inputs.shape[-1]
    expanded = filters_in * self.expand_ratio
    x = inputs
    if self.expand_ratio != 1:
      x = nn.swish(self.norm(name='expand_norm')(conv(expanded, (1, 1), name='expand')(x), train=train))
    x = conv(expanded, (self.kernel_size,) * 2, strides=self.strides, feature_group_count=expanded,
             name='depthwise')(x)
    x = nn.swish(self.norm(name='depthwise_norm')(x, train=train))

    # Squeeze-and-excitation: the bottleneck width is a fraction of the block's *input* channels.
    squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
    squeezed = nn.swish(nn.Conv(max(1, int(filters_in * self.se_ratio)), (1, 1), kernel_init=conv_init,
                                dtype=self.dtype, name='se_reduce')(squeezed))
    x = x * nn.sigmoid(nn.Conv(expanded, (1, 1), kernel_init=conv_init, dtype=self.dtype,
                               name='se_expand')(squeezed))

    x = self.norm(name='project_norm')(conv(self.filters_out, (1, 1), name='project')(x), train=train)
    if self.strides == 1 and filters_in == self.filters_out:
      x = drop_connect(self, x, self.drop_connect_rate, train) + inputs
    return x


class EfficientNet(layers.Classifier):
  """EfficientNet on NHWC images (any resolution); returns float32 logits [N, num_classes]."""
  num_classes: int
  scaling: Scaling
  dropout_rate: float
  drop_connect_rate: float = 0.0
  bn_momentum: float = 0.99
  bn_group_size: int = 0
  dtype: Optional[layers.Dtype] = None
  remat: str = 'none'  # remat.POLICIES: checkpointing of the stem and every MBConv block

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    width, depth = self.scaling.width, self.scaling.depth
    norm = functools.partial(layers.BatchNorm, momentum=self.bn_momentum, epsilon=1e-3,
                             group_size=self.bn_group_size, dtype=self.dtype)

    def stem(module, x, train):
      del module   # the parent of the layers below (remat.checkpointed_layers)
      x = nn.Conv(round_filters(STEM_FILTERS, width), (3, 3), strides=2, use_bias=False, kernel_init=conv_init,
                  dtype=self.dtype, name='stem')(x)
      return nn.swish(norm(name='stem_norm')(x, train=train))

    x = remat.checkpointed_layers(stem, self.remat)(self, x, train)

    block_cls = remat.checkpointed(MBConvBlock, self.remat)
    num_blocks = sum(round_repeats(stage.repeats, depth) for stage in B0_STAGES)
    index = 0
    for stage_index, stage in enumerate(B0_STAGES):
      for repeat in range(round_repeats(stage.repeats, depth)):
        x = block_cls(round_filters(stage.filters_out, width), stage.kernel_size,
                      strides=stage.strides if repeat == 0 else 1, expand_ratio=stage.expand_ratio,
                      se_ratio=stage.se_ratio, drop_connect_rate=self.drop_connect_rate * index / num_blocks,
                      norm=norm, dtype=self.dtype, name=f'stage{stage_index + 1}_block{repeat + 1}')(x, train)
        index += 1

    x = nn.Conv(round_filters(HEAD_FILTERS, width), (1, 1), use_bias=False, kernel_init=conv_init,
                dtype=self.dtype, name='head')(x)
    x = nn.swish(norm(name='head_norm')(x, train=train))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_init, name='classifier')(x)
    return layers.float_logits(logits)
