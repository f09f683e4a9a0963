"""XLA:CPU's convolution routing (`step_builder.compiler_options`): on CPU only, and the same results as the
default to float32 rounding.

The option moves convolutions from YNNPACK to XLA's own kernels; what it must not change is what is computed:
values and gradients of convolutions of the shapes the registry models use (3x3 / 1x1, strides 1 and 2, SAME,
VALID and explicit padding, EfficientNet's depthwise feature groups).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_pseudo_labels.execution import step_builder

# (batch, side, in channels, out channels, kernel, stride, padding, feature groups)
CONVOLUTIONS = [
    (2, 8, 32, 32, 3, 1, 'SAME', 1),           # WRN block convolution
    (2, 8, 32, 64, 3, 2, 'SAME', 1),           # WRN stage transition
    (2, 8, 32, 64, 1, 2, 'VALID', 1),          # WRN / ResNet 1x1 projection
    (2, 7, 24, 40, 3, 1, ((2, 0), (1, 1)), 1),   # explicit, asymmetric padding, odd side
    (2, 8, 48, 48, 5, 2, 'SAME', 48),          # EfficientNet depthwise, stride 2
]


def _conv_value_and_grads(compiler_options, shape):
  batch, side, cin, cout, kernel, stride, padding, groups = shape
  x = jax.random.normal(jax.random.key(0), (batch, side, side, cin), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin // groups, cout), jnp.float32) / kernel

  def loss(x, w):
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     feature_group_count=groups)
    return jnp.sum(jax.nn.leaky_relu(y, 0.2) ** 2)

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), compiler_options=compiler_options).lower(
      x, w).compile()
  return compiled(x, w), compiled.as_text()


def test_the_option_is_for_cpu_only():
  assert step_builder.compiler_options('gpu') == {}
  assert step_builder.compiler_options('tpu') == {}
  # This project's pinned jaxlib knows the option, so on CPU it is used.
  assert step_builder.compiler_options('cpu') == step_builder.CONVOLUTIONS_IN_XLA


def test_mesh_platform_decides():
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  assert step_builder.compiler_options_for_mesh(mesh) == step_builder.compiler_options('cpu')


@pytest.mark.parametrize('shape', CONVOLUTIONS, ids=lambda s: 'x'.join(map(str, s[:6])) + f'_g{s[7]}')
def test_same_values_and_gradients_as_the_default(shape):
  (value, grads), text = _conv_value_and_grads(step_builder.compiler_options('cpu'), shape)
  (value_ref, grads_ref), text_ref = _conv_value_and_grads({}, shape)
  np.testing.assert_allclose(value, value_ref, rtol=2e-5)
  for grad, grad_ref in zip(grads, grads_ref):
    scale = float(jnp.max(jnp.abs(grad_ref)))
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-5 * scale)
  # Same computation, other kernels: every convolution is still there, none of them in a YNNPACK fusion.
  assert text.count(' convolution(') >= 1
  assert '__ynn_fusion' not in text
  if shape[2] > 16 and shape[7] == 1:
    assert '__ynn_fusion' in text_ref   # the default gave it to YNNPACK: the option does change something
