"""Tiny flax classifiers for the MPL core tests: an MLP without BatchNorm and a conv net with BatchNorm + dropout.

Smooth activations (tanh, swish) keep central finite differences accurate; dtype=None everywhere so a test that
casts the variables and inputs to float64 runs entirely in float64.
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp

from meta_pseudo_labels.method import train_state

NUM_CLASSES = 3


class TinyMLP(nn.Module):
  num_classes: int = NUM_CLASSES
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, x, *, train):
    x = x.reshape(x.shape[0], -1)
    x = nn.tanh(nn.Dense(12)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.tanh(nn.Dense(12)(x))
    return nn.Dense(self.num_classes)(x)


class TinyConvNet(nn.Module):
  num_classes: int = NUM_CLASSES
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, x, *, train):
    for features, stride in ((4, 1), (8, 2)):
      x = nn.Conv(features, (3, 3), strides=stride, use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.swish(x)
    x = x.mean(axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


MODELS = {'mlp': (TinyMLP(), (6,)), 'convnet': (TinyConvNet(), (8, 8, 3))}


def optimizer_config(learning_rate=0.1, warmup_steps=0, wait_steps=0, weight_decay=0.0, grad_clip_norm=0.0,
                     momentum=0.0, nesterov=False, schedule='constant'):
  return types.SimpleNamespace(learning_rate=learning_rate, warmup_steps=warmup_steps, wait_steps=wait_steps,
                               weight_decay=weight_decay, grad_clip_norm=grad_clip_norm, momentum=momentum,
                               nesterov=nesterov, schedule=schedule)


def mpl_optimizers(teacher_optimizer=None, student_optimizer=None, total_steps=100):
  """The optimizer arguments of `train_state.create_mpl_state` (and `create_reduced_mpl_state`)."""
  return dict(teacher_optimizer=teacher_optimizer or optimizer_config(),
              student_optimizer=student_optimizer or optimizer_config(), total_steps=total_steps)


def make_batch(rng, input_shape, labeled=4, mu=2, num_classes=NUM_CLASSES, dtype=jnp.float32):
  keys = jax.random.split(rng, 4)
  return {
      'labeled_image': jax.random.normal(keys[0], (labeled, *input_shape), dtype),
      'labeled_label': jax.random.randint(keys[1], (labeled,), 0, num_classes),
      'unlabeled_weak': jax.random.normal(keys[2], (mu * labeled, *input_shape), dtype),
      'unlabeled_strong': jax.random.normal(keys[3], (mu * labeled, *input_shape), dtype),
  }


def make_mpl_state(name, optimizers=None, seed=0):
  model, input_shape = MODELS[name]
  return train_state.create_mpl_state(jax.random.key(seed), model, model, input_shape,
                                      **(optimizers or mpl_optimizers()))


def to_float64(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
