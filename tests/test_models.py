"""Tests of the model zoo: registry, contract (shapes, dtypes, collections), published sizes, grouped BatchNorm."""

import functools
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_pseudo_labels import errors
from meta_pseudo_labels import models
from meta_pseudo_labels.models import efficientnet
from meta_pseudo_labels.models import layers

REGISTRY_NAMES = {'mlp', 'wrn28_2', 'wrn28_8', 'wrn10_1', 'wrn16_2', 'resnet18', 'resnet50', 'resnet101',
                  *(f'efficientnet-b{i}' for i in range(8)), 'efficientnet-l2'}


def model_config(name, **overrides):
  fields = dict(name=name, dropout_rate=0.2, bn_momentum=0.99, drop_connect_rate=0.0, dtype='float32')
  return types.SimpleNamespace(**{**fields, **overrides})


def input_shape(name, batch=1, size=32):
  return (batch, 2) if name == 'mlp' else (batch, size, size, 3)


def abstract_variables(model, shape):
  return jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, jnp.zeros(shape), train=False))


@functools.cache
def registry_variables(name, num_classes):
  """Abstract variables of a registry model at 32x32 (shared by the tests below: tracing the L2 takes seconds)."""
  return abstract_variables(models.create_model(model_config(name), num_classes), input_shape(name))


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_registry_has_the_contract_names():
  assert set(models.MODELS) == REGISTRY_NAMES


def test_unknown_name_is_a_one_line_config_error():
  with pytest.raises(errors.ConfigError) as info:
    models.create_model(model_config('wrn28_3'), 10)
  message = str(info.value)
  assert "model.name: unknown model 'wrn28_3'" in message
  assert all(name in message for name in REGISTRY_NAMES)
  assert '\n' not in message


@pytest.mark.parametrize('overrides, field', [
    (dict(dtype='float16'), 'model.dtype'),
    (dict(dropout_rate=1.0), 'model.dropout_rate'),
    (dict(drop_connect_rate=-0.1), 'model.drop_connect_rate'),
    (dict(bn_momentum=1.5), 'model.bn_momentum'),
])
def test_bad_fields_are_config_errors(overrides, field):
  with pytest.raises(errors.ConfigError, match=field):
    models.create_model(model_config('wrn10_1', **overrides), 10)


def test_bad_group_size_and_classes_are_config_errors():
  with pytest.raises(errors.ConfigError, match='batch_norm_group_size'):
    models.create_model(model_config('wrn10_1'), 10, bn_group_size=-1)
  with pytest.raises(errors.ConfigError, match='num_classes'):
    models.create_model(model_config('wrn10_1'), 0)


def test_plain_namespace_with_only_a_name_works():
  model = models.create_model(types.SimpleNamespace(name='efficientnet-b3'), 5)
  assert model.dropout_rate == efficientnet.SCALINGS['b3'].dropout_rate  # the published default
  assert model.bn_momentum == 0.99 and model.drop_connect_rate == 0.0 and model.dtype is None


# Published parameter counts, 10 classes for CIFAR models and 1000 for ImageNet models.
PUBLISHED_PARAMETERS = [
    ('wrn28_2', 10, 1.47e6),          # Oliver et al. (2018), Sec. 4.1 / FixMatch (Sohn et al. 2020): 1.47M
    ('wrn28_8', 10, 23.4e6),          # FixMatch (Sohn et al. 2020), CIFAR-100 model: 23.4M
    ('resnet18', 1000, 11.69e6),      # He et al. (2016); torchvision / Keras reference: 11,689,512
    ('resnet50', 1000, 25.56e6),      # He et al. (2016); torchvision / Keras reference: 25,557,032
    ('resnet101', 1000, 44.55e6),     # He et al. (2016); torchvision reference: 44,549,160
    ('efficientnet-b0', 1000, 5.3e6),  # Tan & Le (2019), Table 2: 5.3M (reference checkpoint: 5,288,548)
    ('efficientnet-b7', 1000, 66e6),   # Tan & Le (2019), Table 2: 66M
    ('efficientnet-l2', 1000, 480e6),  # Xie et al. (2020), Noisy Student, Table 2: 480M
]
PUBLISHED_CLASSES = {name: num_classes for name, num_classes, _ in PUBLISHED_PARAMETERS}


@pytest.mark.parametrize('name', sorted(REGISTRY_NAMES))
def test_every_model_initialises_with_both_collections(name):
  # eval_shape: builds the parameter tree without allocating (the L2 has 480M parameters).
  variables = registry_variables(name, PUBLISHED_CLASSES.get(name, 10))
  assert set(variables) == {'params', 'batch_stats'}
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  assert (count(variables['batch_stats']) == 0) == (name == 'mlp')


@pytest.mark.parametrize('name, num_classes, published', PUBLISHED_PARAMETERS)
def test_parameter_counts_match_published(name, num_classes, published):
  measured = count(registry_variables(name, num_classes)['params'])
  assert abs(measured - published) <= 0.02 * published, f'{name}: {measured:,} vs {published:,.0f}'


def test_efficientnet_rounding_follows_compound_scaling():
  assert efficientnet.round_filters(32, 1.0) == 32
  assert efficientnet.round_filters(32, 1.1) == 32   # 35.2 -> 32 (within 10%)
  assert efficientnet.round_filters(1280, 2.0) == 2560
  assert efficientnet.round_filters(16, 4.3) == 72   # 68.8 -> 72
  assert efficientnet.round_repeats(3, 3.1) == 10    # ceil(9.3)
  assert efficientnet.round_repeats(1, 1.0) == 1


SMALL_MODELS = ['mlp', 'wrn10_1', 'wrn28_2', 'resnet18', 'efficientnet-b0']
REAL_INIT_MODELS = {'mlp'}  # compiling a real (threefry) init of the conv nets costs 10-25 s of CPU
# Forward checks: XLA's backend optimisations only cost compile time here (numerics are unchanged).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def lecun_variables(model, x):
  """Variables with the model's structure, weights ~ N(0, 1/fan_in), BatchNorm at its initial state.

  Stands in for `model.init` in forward tests of the larger models, where compiling the initialisers' random
  number generation takes far longer than the forward pass; their initialisers are traced by the init tests.
  """
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if leaf.ndim >= 2:
      return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(math.prod(leaf.shape[:-1])), leaf.dtype)
    return jnp.full(leaf.shape, 1.0 if name in ("['scale']", "['var']") else 0.0, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract_variables(model, x.shape))


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_forward_train_and_eval(name):
  num_classes = 3
  model = models.create_model(model_config(name, drop_connect_rate=0.2), num_classes)
  x = jax.random.normal(jax.random.key(1), input_shape(name, batch=4))
  if name in REAL_INIT_MODELS:
    variables = jax.jit(lambda x: model.init({'params': jax.random.key(0)}, x, train=False))(x)
  else:
    variables = lecun_variables(model, x)

  def forward(variables, x):  # One compilation: two training forwards (vmapped over dropout keys), evaluation.
    train = lambda key: model.apply(variables, x, train=True, rngs={'dropout': key}, mutable=['batch_stats'])
    train_logits, updates = jax.vmap(train)(jax.random.split(jax.random.key(2)))
    return train_logits, updates, model.apply(variables, x, train=False)

  train_logits, updates, eval_logits = jax.jit(forward).lower(variables, x).compile(FAST_COMPILE)(variables, x)
  for logits in (*train_logits, eval_logits):
    assert logits.shape == (4, num_classes) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
  assert set(variables) == {'params', 'batch_stats'}
  if name == 'mlp':
    assert variables['batch_stats'] == {} and not jax.tree.leaves(updates)
    return
  stats_after = jax.tree.map(lambda a: a[0], updates['batch_stats'])
  assert jax.tree.structure(variables['batch_stats']) == jax.tree.structure(stats_after)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'], stats_after)
  assert all(jax.tree.leaves(changed)), 'every BatchNorm must update its running statistics in training'
  assert not np.allclose(train_logits[0], train_logits[1]), 'dropout must draw from the dropout rng'
  assert not np.allclose(train_logits[0], eval_logits), 'training must use batch statistics and dropout'


def abstract_forward(model, x, params_dtype=jnp.float32):
  """dtypes of logits, BatchNorm updates and intermediates, by tracing only (nothing is compiled)."""

  def forward(x):
    variables = model.init({'params': jax.random.key(0)}, x, train=False)
    variables = jax.tree.map(lambda a: a.astype(params_dtype), variables)
    logits, updates = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)},
                                  mutable=['batch_stats'], capture_intermediates=True)
    return variables, logits, updates

  return jax.eval_shape(forward, x)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = models.create_model(model_config('wrn10_1', dtype='bfloat16'), 10)
  variables, logits, updates = abstract_forward(model, jnp.ones((2, 8, 8, 3)))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates['batch_stats']))
  assert logits.dtype == jnp.float32
  assert updates['intermediates']['stem']['__call__'][0].dtype == jnp.bfloat16
  assert updates['intermediates']['stage3_block1']['__call__'][0].dtype == jnp.bfloat16


def test_float32_models_run_in_float64_when_given_float64_params():
  # Gradient checks (tests of mpl.py) cast params and inputs to float64; nothing may round them to float32.
  for name in ('mlp', 'wrn10_1', 'resnet18', 'efficientnet-b0'):
    model = models.create_model(model_config(name), 3)
    with jax.enable_x64(True):
      _, logits, updates = abstract_forward(model, jnp.ones(input_shape(name, 2, 32), jnp.float64), jnp.float64)
    assert logits.dtype == jnp.float64, name
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(updates)), name


def test_mlp_initialisation_follows_the_paper():
  model = models.create_model(model_config('mlp'), 2)
  variables = model.init({'params': jax.random.key(0)}, jnp.zeros((1, 2)), train=False)
  assert variables['batch_stats'] == {}
  params = variables['params']
  assert [params[f'Dense_{i}']['kernel'].shape for i in range(3)] == [(2, 8), (8, 8), (8, 2)]
  kernels = jnp.concatenate([params[f'Dense_{i}']['kernel'].ravel() for i in range(3)])
  assert float(jnp.max(jnp.abs(kernels))) <= 0.1 and float(jnp.std(kernels)) > 0.04  # U(-0.1, 0.1): std 0.058
  assert all(not jnp.any(params[f'Dense_{i}']['bias']) for i in range(3))


class DropConnect(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, x, train):
    return efficientnet.drop_connect(self, x, self.rate, train)


def test_drop_connect_drops_whole_examples_and_rescales():
  x = jnp.ones((256, 2, 2, 3))
  out = DropConnect(0.25).apply({}, x, train=True, rngs={'dropout': jax.random.key(0)})
  per_example = out.reshape(256, -1)
  assert bool(jnp.all(per_example == per_example[:, :1]))
  assert set(np.unique(per_example).tolist()) <= {0.0, float(np.float32(1.0) / np.float32(0.75))}
  assert 0.15 < float(jnp.mean(per_example[:, 0] == 0.0)) < 0.35
  np.testing.assert_array_equal(DropConnect(0.25).apply({}, x, train=False), x)


def test_efficientnet_drop_connect_rate_grows_with_block_index():
  model = models.create_model(model_config('efficientnet-b0', drop_connect_rate=0.2), 3)
  rates = []
  original = efficientnet.MBConvBlock.__call__
  def recording_call(block, x, train):   # blocks take `train` positionally (a static argument under remat)
    rates.append(block.drop_connect_rate)
    return original(block, x, train)
  efficientnet.MBConvBlock.__call__ = recording_call
  try:
    abstract_variables(model, input_shape('efficientnet-b0'))
  finally:
    efficientnet.MBConvBlock.__call__ = original
  np.testing.assert_allclose(rates, [0.2 * i / 16 for i in range(16)])


# ---- grouped BatchNorm --------------------------------------------------------------------------------------

def reference_batch_norm(x, epsilon):
  """Plain BatchNorm by hand: normalise over every axis but the last, biased variance."""
  axes = tuple(range(x.ndim - 1))
  mean, var = x.mean(axis=axes), x.var(axis=axes)
  return (x - mean) / np.sqrt(var + epsilon), mean, var


def run_batch_norm(x, group_size, momentum=0.9, epsilon=1e-3):
  norm = layers.BatchNorm(momentum=momentum, epsilon=epsilon, group_size=group_size)
  variables = norm.init(jax.random.key(0), x, train=True)
  variables = {'params': jax.tree.map(lambda p: p + 0.5, variables['params']),  # scale 1.5, bias 0.5
               'batch_stats': variables['batch_stats']}
  y, updates = norm.apply(variables, x, train=True, mutable=['batch_stats'])
  return np.asarray(y), jax.tree.map(np.asarray, updates['batch_stats']), variables


@pytest.fixture
def activations():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(8, 3, 3, 4)) * rng.uniform(0.5, 3.0, size=4) + rng.normal(size=4)).astype(np.float32)


def test_grouped_batch_norm_equals_per_group_plain_batch_norm(activations):
  y, stats, _ = run_batch_norm(activations, group_size=2)
  means, variances = [], []
  for start in range(0, 8, 2):
    normalised, mean, var = reference_batch_norm(activations[start:start + 2], 1e-3)
    np.testing.assert_allclose(y[start:start + 2], 1.5 * normalised + 0.5, rtol=1e-5, atol=1e-5)
    means.append(mean)
    variances.append(var)
  np.testing.assert_allclose(stats['mean'], 0.1 * np.mean(means, axis=0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * np.mean(variances, axis=0), rtol=1e-5)
  # Whole-batch statistics differ from per-group ones, so the grouping is observable.
  assert not np.allclose(y, run_batch_norm(activations, group_size=0)[0], atol=1e-3)


def test_group_size_zero_and_whole_batch_equal_plain_batch_norm(activations):
  normalised, mean, var = reference_batch_norm(activations, 1e-3)
  for group_size in (0, 8):
    y, stats, _ = run_batch_norm(activations, group_size)
    np.testing.assert_allclose(y, 1.5 * normalised + 0.5, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats['mean'], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * var, rtol=1e-5)
  # Same update as Flax's own BatchNorm (which also keeps the biased variance).
  flax_norm = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
  flax_y, flax_updates = flax_norm.apply(flax_norm.init(jax.random.key(0), activations), activations,
                                         mutable=['batch_stats'])
  y, stats, _ = run_batch_norm(activations, group_size=0)
  np.testing.assert_allclose((y - 0.5) / 1.5, flax_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats['var'], flax_updates['batch_stats']['var'], rtol=1e-5)


def test_batch_norm_matches_the_plain_formula_per_feature_in_value_and_gradient():
  """The layer reduces over a [rows, width * features] view (layers.BatchNorm): with a different scale and bias
  per feature and a loss that weighs every output differently, its values and its gradients for the input, the
  scale and the bias equal the plain per-feature formula's (a tiling in the wrong order would mix features)."""
  rng = np.random.default_rng(1)
  x = (rng.normal(size=(6, 5, 7, 3)) * [0.5, 2.0, 4.0] + [1.0, -2.0, 0.3]).astype(np.float32)
  weights = rng.normal(size=x.shape).astype(np.float32)
  scale, bias = np.float32([0.7, 1.9, -1.1]), np.float32([0.2, -0.4, 1.3])
  norm = layers.BatchNorm(epsilon=1e-3, group_size=2)

  def layer_loss(x, scale, bias):
    variables = {'params': {'scale': scale, 'bias': bias},
                 'batch_stats': {'mean': jnp.zeros(3), 'var': jnp.ones(3)}}
    y, _ = norm.apply(variables, x, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.tanh(y) * weights), y

  def plain_loss(x, scale, bias):
    groups = x.reshape(3, 2, 5, 7, 3)
    mean = groups.mean(axis=(1, 2, 3), keepdims=True)
    var = jnp.square(groups - mean).mean(axis=(1, 2, 3), keepdims=True)
    y = ((groups - mean) * jax.lax.rsqrt(var + 1e-3)).reshape(x.shape) * scale + bias
    return jnp.sum(jnp.tanh(y) * weights), y

  (_, y), grads = jax.value_and_grad(layer_loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
  (_, y_plain), grads_plain = jax.value_and_grad(plain_loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
  np.testing.assert_allclose(y, y_plain, rtol=1e-5, atol=1e-5)
  for name, grad, grad_plain in zip(('x', 'scale', 'bias'), grads, grads_plain):
    np.testing.assert_allclose(grad, grad_plain, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('shape, group_size', [((6, 5, 7, 3), 2), ((6, 5, 7, 3), 0), ((8, 3), 4)])
def test_batch_norm_written_out_backward_equals_the_formula_s_in_float64_to_second_order(shape, group_size):
  """The layer's backward is written out (layers._train_batch_norm). In float64 it must equal the gradient of the
  plain formula: for the input, the scale and the bias, through the running statistics too (their cotangents
  enter the loss here), and once more differentiated, as the exact meta-gradient differentiates a student's
  backward pass."""
  rng = np.random.default_rng(2)
  features = shape[-1]
  groups = shape[0] // (group_size or shape[0])
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=shape) * rng.uniform(0.5, 3.0, features) + rng.normal(size=features))
    weights = jnp.asarray(rng.normal(size=shape))
    params = {'scale': jnp.asarray(rng.normal(size=features)), 'bias': jnp.asarray(rng.normal(size=features))}
    running = {'mean': jnp.asarray(rng.normal(size=features)), 'var': jnp.asarray(rng.uniform(0.5, 2.0, features))}
    norm = layers.BatchNorm(momentum=0.9, epsilon=1e-3, group_size=group_size)

    def layer_loss(params, x):
      y, updates = norm.apply({'params': params, 'batch_stats': running}, x, train=True, mutable=['batch_stats'])
      stats = updates['batch_stats']
      return jnp.sum(jnp.tanh(y) * weights) + jnp.sum(jnp.sin(stats['mean'])) + jnp.sum(jnp.cos(stats['var']))

    def plain_loss(params, x):
      grouped = x.reshape((groups, -1) + x.shape[1:])
      axes = tuple(range(1, grouped.ndim - 1))
      mean = grouped.mean(axis=axes, keepdims=True)
      var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
      y = ((grouped - mean) * jax.lax.rsqrt(var + 1e-3)).reshape(x.shape) * params['scale'] + params['bias']
      new_mean = 0.9 * running['mean'] + 0.1 * mean.reshape(groups, features).mean(axis=0)
      new_var = 0.9 * running['var'] + 0.1 * var.reshape(groups, features).mean(axis=0)
      return jnp.sum(jnp.tanh(y) * weights) + jnp.sum(jnp.sin(new_mean)) + jnp.sum(jnp.cos(new_var))

    def second_order(loss):
      gradient_norm = lambda params, x: sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(
          jax.grad(loss, argnums=(0, 1))(params, x)))
      return jax.grad(gradient_norm, argnums=(0, 1))

    for check in (lambda loss: loss, lambda loss: jax.grad(loss, argnums=(0, 1)), second_order):
      got, want = check(layer_loss)(params, x), check(plain_loss)(params, x)
      for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert got_leaf.dtype == jnp.float64
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-9, atol=1e-11)


def test_batch_norm_eval_uses_running_statistics(activations):
  _, stats, variables = run_batch_norm(activations, group_size=2)
  variables = {'params': variables['params'], 'batch_stats': stats}
  y = layers.BatchNorm(momentum=0.9, group_size=2).apply(variables, activations, train=False)
  expected = (activations - stats['mean']) / np.sqrt(stats['var'] + 1e-3) * 1.5 + 0.5
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_rejects_indivisible_batch(activations):
  with pytest.raises(errors.ConfigError, match='batch_norm_group_size: 3 does not divide the batch size 8'):
    run_batch_norm(activations, group_size=3)


def test_model_group_size_reaches_every_batch_norm():
  # With groups of one example, the training forward of example 0 cannot depend on example 1.
  per_example = models.create_model(model_config('wrn10_1', dropout_rate=0.0), 3, bn_group_size=1)
  pairs = models.create_model(model_config('wrn10_1', dropout_rate=0.0), 3, bn_group_size=2)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  changed = x.at[1].set(-3.0 * x[1])
  variables = lecun_variables(per_example, x)

  def forward(x, changed):
    train = lambda model, x: model.apply(variables, x, train=True, mutable=['batch_stats'])[0]
    return train(per_example, x), train(per_example, changed), train(pairs, x)

  alone, alone_changed, paired = jax.jit(forward).lower(x, changed).compile(FAST_COMPILE)(x, changed)
  np.testing.assert_allclose(alone[0], alone_changed[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(paired[0], alone[0], atol=1e-4)
