"""Layers shared by the model zoo: grouped BatchNorm and the classifier base class.

Compute dtype convention (all models): a module's `dtype` is the dtype its activations are computed in; `None`
means "promote the inputs and the parameters", which is float32 in normal runs and float64 when a gradient check
casts the parameters to float64. Parameters are always created in float32; logits are returned in float32 (or
float64 under such a check), never in bfloat16.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from meta_pseudo_labels import errors

Dtype = Any
Initializer = Callable[..., jax.Array]


def float_logits(logits: jax.Array) -> jax.Array:
  """Casts bfloat16/float16 logits up to float32 (float64 stays float64), so losses never run in low precision."""
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


class Classifier(nn.Module):
  """Base class of every registry model: `init` always returns a 'batch_stats' collection.

  Flax drops empty collections, so a model without BatchNorm (the TwoMoon MLP) would return only 'params'. The
  training state stores `variables['batch_stats']` for every model, so `init` adds an empty one (`{}`) when the
  model has none. Only `init` is covered; `jax.eval_shape(model.init, ...)` goes through it as well.
  """

  @nn.nowrap
  def init(self, *args, **kwargs):
    variables = super().init(*args, **kwargs)
    return {'batch_stats': {}, **variables}


class BatchNorm(nn.Module):
  """Batch normalisation whose training statistics come from groups of `group_size` consecutive examples.

  The paper trains with a fixed BatchNorm batch (`batch_norm_batch_size`, App. C) independent of the global
  batch; this layer reproduces that without cross-device collectives:

  - `group_size == 0`: mean and variance over the whole batch the layer sees. Under `jax.jit` with the batch
    sharded over devices, that is the *global* batch (XLA inserts the cross-device reductions), i.e. synchronised
    BatchNorm across all devices.
  - `group_size == n > 0`: the batch [B, ...] is viewed as [B / n, n, ...]; every group of n consecutive examples
    is normalised with its own statistics (B must be divisible by n). When n divides the per-device batch, the
    groups never straddle devices, so no cross-device reduction is needed. The running statistics are updated
    with the mean over groups of the per-group statistics.

  Running statistics follow `running = momentum * running + (1 - momentum) * batch_statistic` with the biased
  (1/n) variance; evaluation (`train=False`) uses the running statistics. Statistics are computed in at least
  float32 whatever the compute dtype. The running statistics are not updated while the module is initialising.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3
  group_size: int = 0
  dtype: Optional[Dtype] = None
  scale_init: Initializer = nn.initializers.ones_init()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', self.scale_init, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))

    stats_dtype = jnp.promote_types(jnp.promote_types(x.dtype, scale.dtype), jnp.float32)
    out_dtype = self.dtype or stats_dtype
    if train:
      batch = x.shape[0]
      group = self.group_size or batch
      if batch % group:
        raise errors.ConfigError(f'batch_norm_group_size: {self.group_size} does not divide the batch size '
                                 f'{batch}; choose a divisor of every per-step batch, or 0 for the whole batch')
      groups = batch // group
      grouped = x.astype(stats_dtype).reshape((groups, group) + x.shape[1:])
      # The statistics are sums over rows of `features` numbers (16-64 for the CIFAR-sized WideResNets), a layout
      # XLA:CPU reduces slowly. They are taken over the free view [groups, rows, width x features] (the last
      # spatial axis joins the features), leaving [width, features] to fold: the same sums in another order. Only
      # the reductions use the view; the normalisation stays in the input's shape (applied in the view too, it
      # was miscompiled by JAX's Shardy partitioner with the width sharded: docs/PERFORMANCE.md).
      width = x.shape[-2] if x.ndim > 2 else 1
      per_feature_mean = lambda values: values.reshape(groups, -1, width * features).mean(axis=1).reshape(
          groups, width, features).mean(axis=1)
      to_grouped = lambda per_feature: per_feature.reshape((groups,) + (1,) * (grouped.ndim - 2) + (features,))
      mean = per_feature_mean(grouped)
      centred = grouped - to_grouped(mean)
      var = per_feature_mean(jnp.square(centred))
      normalised = (centred * jax.lax.rsqrt(to_grouped(var) + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        group_mean = mean.mean(axis=0)
        group_var = var.mean(axis=0)
        running_mean.value = (self.momentum * running_mean.value
                              + (1.0 - self.momentum) * group_mean).astype(running_mean.value.dtype)
        running_var.value = (self.momentum * running_var.value
                             + (1.0 - self.momentum) * group_var).astype(running_var.value.dtype)
    else:
      normalised = ((x.astype(stats_dtype) - running_mean.value)
                    * jax.lax.rsqrt(running_var.value + self.epsilon))
    return (normalised * scale + bias).astype(out_dtype)
