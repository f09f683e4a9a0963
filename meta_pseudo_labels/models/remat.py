"""Rematerialisation (gradient checkpointing) of residual blocks: the `model.remat` policies.

Activations, not parameters, are what fill accelerator memory in the paper's large runs (docs/SCALING.md): the
backward pass of a network keeps every intermediate of the forward pass alive until it is used. Wrapping a block
in `jax.checkpoint` (`flax.linen.remat`) keeps only what the policy saves and recomputes the rest inside the
block's backward pass (Chen et al. 2016, "Training deep nets with sublinear memory cost"; Griewank & Walther 2000).
Values, parameter paths and random streams are those of the plain block: only memory and FLOPs change.

Policies (`config.model.remat`, `config.student_model.remat`):
- 'none': no checkpointing; XLA keeps what the backward pass needs.
- 'block': a block saves nothing but its input (`nothing_saveable`); its forward is run again in its backward
  pass. The least memory, about one extra forward of every block (~+1/3 of a forward + backward's FLOPs).
- 'dots': a block saves the outputs of its convolutions and matmuls (`dots_saveable`) and recomputes the cheap
  elementwise work after them (BatchNorm, activations, squeeze-and-excitation gating, drop-connect): no
  convolution is run twice.

Which blocks: the residual blocks of WideResNet and ResNet, the MBConv blocks of EfficientNet, and the stems of
ResNet (7x7 convolution, BatchNorm, ReLU, max-pool) and EfficientNet (3x3 convolution, BatchNorm, swish), whose
outputs at half the input resolution are the largest activations of the network (ImageNet-10% on a v4-32:
three 3.06 GiB stem tensors per chip, docs/SCALING.md). WideResNet's stem is one convolution, its head and every
classifier are small: they run once without checkpointing. The TwoMoon MLP has no blocks (two dense layers), so
its remat field is accepted and has no effect.
"""

from typing import Callable, Optional

import flax.linen as nn
import jax

POLICIES: dict[str, Optional[Callable[..., bool]]] = {
    'none': None,
    'block': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_saveable,
}


def checkpointed(block: type[nn.Module], policy: str) -> type[nn.Module]:
  """`block`, or its `nn.remat` under `POLICIES[policy]`; the block is called as `block(...)(x, train)`.

  `train` is a Python bool that decides the block's structure (BatchNorm statistics, dropout), so it is a static
  argument of the checkpoint (argument 2, `self` counted) and must be passed positionally.
  """
  if policy == 'none':
    return block
  return nn.remat(block, policy=POLICIES[policy], static_argnums=(2,))


def checkpointed_layers(layers: Callable[[nn.Module, jax.Array, bool], jax.Array],
                        policy: str) -> Callable[[nn.Module, jax.Array, bool], jax.Array]:
  """`layers`, or its `nn.remat` under `POLICIES[policy]`; called as `layers(module, x, train)` in a compact method.

  For layers that are not a block of their own (a stem): the lifted checkpoint makes `module` the parent of the
  layers `layers` creates, so their parameter paths are the module's own, as without checkpointing. `train` is
  static, as in `checkpointed`.
  """
  if policy == 'none':
    return layers
  return nn.remat(layers, policy=POLICIES[policy], static_argnums=(2,))
