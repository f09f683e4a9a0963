"""Layers shared by the model zoo: grouped BatchNorm and the classifier base class.

Compute dtype convention (all models): a module's `dtype` is the dtype its activations are computed in; `None`
means "promote the inputs and the parameters", which is float32 in normal runs and float64 when a gradient check
casts the parameters to float64. Parameters are always created in float32; logits are returned in float32 (or
float64 under such a check), never in bfloat16.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import custom_derivatives

from meta_pseudo_labels import errors

Dtype = Any
Initializer = Callable[..., jax.Array]


def _per_feature_sum(values: jax.Array) -> jax.Array:
  """Sums of [groups, examples, ..., features] per group and feature: [groups, features].

  They are sums over rows of `features` numbers (16-64 for the CIFAR-sized WideResNets), a layout XLA:CPU reduces
  slowly, so they are taken over the free view [groups, rows, width x features] (the last spatial axis joins the
  features) and the [width, features] rest is folded after: the same sums in another order. Only reductions use the
  view; applied to the normalisation too, it was miscompiled by JAX's Shardy partitioner with the width sharded
  (docs/PERFORMANCE.md).
  """
  groups, features = values.shape[0], values.shape[-1]
  width = values.shape[-2] if values.ndim > 3 else 1
  return values.reshape(groups, -1, width * features).sum(axis=1).reshape(groups, width, features).sum(axis=1)


def _per_group(per_feature: jax.Array, ndim: int) -> jax.Array:
  """[groups, features] broadcastable against a [groups, examples, ..., features] array of `ndim` axes."""
  return per_feature.reshape((per_feature.shape[0],) + (1,) * (ndim - 2) + (per_feature.shape[-1],))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _train_batch_norm(grouped, scale, bias, epsilon):
  """Training-mode BatchNorm of [groups, examples, ..., features]: (scaled output, per-group mean, variance).

  The backward pass is written out (the fused form of BatchNorm's gradient, as cuDNN's): the input's gradient
  needs the two sums that are also the bias's and the scale's gradients, so each layer's backward takes 2 sums
  where differentiating the forward formula takes 4. The MPL step took 0.85-0.93x the time on a 2-core CPU
  (docs/PERFORMANCE.md); the same values to float32 rounding, and it is differentiable again (the exact
  meta-gradient differentiates through a student's backward pass), which tests/test_models.py checks in float64.
  """
  return _train_batch_norm_forward(grouped, scale, bias, epsilon)[0]


def _train_batch_norm_forward(grouped, scale, bias, epsilon):
  count = grouped[0].size // grouped.shape[-1]
  mean = _per_feature_sum(grouped) / count
  centred = grouped - _per_group(mean, grouped.ndim)
  var = _per_feature_sum(jnp.square(centred)) / count
  inverse_std = jax.lax.rsqrt(var + epsilon)
  normalised = centred * _per_group(inverse_std, grouped.ndim)
  return (normalised * scale + bias, mean, var), (grouped, scale, mean, inverse_std)


def _train_batch_norm_fwd(grouped, scale, bias, epsilon):
  return _train_batch_norm_forward(grouped.value, scale.value, bias.value, epsilon)


def _train_batch_norm_bwd(epsilon, residuals, cotangents):
  """With n examples' rows per group, y = x_hat * scale + bias, x_hat = (x - mean) * inverse_std:
  d_bias = sum(dy), d_scale = sum(dy * x_hat), dx = scale * inverse_std * (dy - d_bias / n - x_hat * d_scale / n),
  plus the terms of the mean's and the variance's own cotangents (the running statistics), when they have any."""
  del epsilon
  grouped, scale, mean, inverse_std = residuals
  d_out, d_mean, d_var = cotangents
  ndim = grouped.ndim
  count = grouped[0].size // grouped.shape[-1]
  centred = grouped - _per_group(mean, ndim)
  is_zero = lambda cotangent: isinstance(cotangent, custom_derivatives.SymbolicZero)
  if is_zero(d_out):
    d_bias = d_scale = jnp.zeros_like(mean)
    d_grouped = jnp.zeros_like(grouped)
  else:
    normalised = centred * _per_group(inverse_std, ndim)
    d_bias = _per_feature_sum(d_out)
    d_scale = _per_feature_sum(d_out * normalised)
    d_grouped = _per_group(inverse_std, ndim) * scale * (
        d_out - _per_group(d_bias / count, ndim) - normalised * _per_group(d_scale / count, ndim))
  if not is_zero(d_mean):
    d_grouped = d_grouped + _per_group(d_mean / count, ndim)
  if not is_zero(d_var):
    d_grouped = d_grouped + centred * _per_group(2.0 * d_var / count, ndim)
  return d_grouped, d_scale.sum(axis=0).astype(scale.dtype), d_bias.sum(axis=0).astype(scale.dtype)


_train_batch_norm.defvjp(_train_batch_norm_fwd, _train_batch_norm_bwd, symbolic_zeros=True)


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
    if not train:
      normalised = ((x.astype(stats_dtype) - running_mean.value)
                    * jax.lax.rsqrt(running_var.value + self.epsilon))
      return (normalised * scale + bias).astype(out_dtype)
    batch = x.shape[0]
    group = self.group_size or batch
    if batch % group:
      raise errors.ConfigError(f'batch_norm_group_size: {self.group_size} does not divide the batch size '
                               f'{batch}; choose a divisor of every per-step batch, or 0 for the whole batch')
    grouped = x.astype(stats_dtype).reshape((batch // group, group) + x.shape[1:])
    out, mean, var = _train_batch_norm(grouped, scale, bias, self.epsilon)
    if not self.is_initializing():
      running_mean.value = (self.momentum * running_mean.value
                            + (1.0 - self.momentum) * mean.mean(axis=0)).astype(running_mean.value.dtype)
      running_var.value = (self.momentum * running_var.value
                           + (1.0 - self.momentum) * var.mean(axis=0)).astype(running_var.value.dtype)
    return out.reshape(x.shape).astype(out_dtype)
