"""The model zoo: a registry of Flax classifiers built from a duck-typed model config.

    model = create_model(config.model, num_classes, bn_group_size=config.batch_norm_group_size)
    variables = model.init({'params': key}, x, train=False)   # always {'params': ..., 'batch_stats': ...}
    logits, updates = model.apply(variables, x, train=True, rngs={'dropout': key}, mutable=['batch_stats'])

Contract (docs/ARCHITECTURE.md):
- Inputs are NHWC float images, or [N, D] for the MLP; outputs are float32 logits [N, num_classes].
- `model.init` always returns both collections: models without BatchNorm (the MLP) get `'batch_stats': {}`
  from `layers.Classifier.init`, so the training state never has to special-case them.
- Parameters are float32; activations are computed in `model_config.dtype` ('float32' or 'bfloat16'). For
  'float32' the layers promote inputs and parameters instead of forcing float32, so a gradient check that casts
  the parameters and inputs to float64 runs entirely in float64.
- Model config fields read (attribute access; a missing field takes the default below): `name`, `dropout_rate`
  (0.0; EfficientNet: the variant's published rate), `bn_momentum` (0.99), `drop_connect_rate` (0.0,
  EfficientNet only), `dtype` ('float32'), `remat` ('none'; a policy of `remat.POLICIES`, which blocks are
  checkpointed and what they save). The MLP reads only `name` and `dtype`.
- `bn_group_size` is the top-level `batch_norm_group_size`: 0 normalises over the whole (global) batch, n > 0
  over groups of n consecutive examples (see `layers.BatchNorm`).
"""

import functools
import numbers
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from meta_pseudo_labels import errors
from meta_pseudo_labels.models import efficientnet
from meta_pseudo_labels.models import layers
from meta_pseudo_labels.models import mlp
from meta_pseudo_labels.models import remat
from meta_pseudo_labels.models import resnet
from meta_pseudo_labels.models import wide_resnet

ModelConstructor = Callable[[Any, int, Optional[layers.Dtype], int], nn.Module]

REMAT_POLICIES = tuple(remat.POLICIES)  # the `model.remat` names, defined in remat.py
COMPUTE_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}  # None: promote inputs and params (see above)


def _regularisation(model_config, default_dropout: float = 0.0) -> dict[str, Any]:
  """The fields every block-structured model reads (dropout, BatchNorm momentum, the remat policy)."""
  return dict(dropout_rate=getattr(model_config, 'dropout_rate', default_dropout),
              bn_momentum=getattr(model_config, 'bn_momentum', 0.99),
              remat=getattr(model_config, 'remat', 'none'))


def _mlp(model_config, num_classes, dtype, bn_group_size):
  del model_config, bn_group_size  # Sec. 3.1 fixes the architecture; no BatchNorm, no blocks to remat.
  return mlp.MLP(num_classes=num_classes, dtype=dtype)


def _wide_resnet(depth, width, model_config, num_classes, dtype, bn_group_size):
  return wide_resnet.WideResNet(num_classes=num_classes, depth=depth, width=width, bn_group_size=bn_group_size,
                                dtype=dtype, **_regularisation(model_config))


def _resnet(stage_sizes, block, model_config, num_classes, dtype, bn_group_size):
  return resnet.ResNet(num_classes=num_classes, stage_sizes=stage_sizes, block=block, bn_group_size=bn_group_size,
                       dtype=dtype, **_regularisation(model_config))


def _efficientnet(variant, model_config, num_classes, dtype, bn_group_size):
  scaling = efficientnet.SCALINGS[variant]
  return efficientnet.EfficientNet(num_classes=num_classes, scaling=scaling,
                                   drop_connect_rate=getattr(model_config, 'drop_connect_rate', 0.0),
                                   bn_group_size=bn_group_size, dtype=dtype,
                                   **_regularisation(model_config, default_dropout=scaling.dropout_rate))


MODELS: dict[str, ModelConstructor] = {
    'mlp': _mlp,
    'wrn28_2': functools.partial(_wide_resnet, 28, 2),
    'wrn28_8': functools.partial(_wide_resnet, 28, 8),
    'wrn10_1': functools.partial(_wide_resnet, 10, 1),
    'wrn16_2': functools.partial(_wide_resnet, 16, 2),
    'resnet18': functools.partial(_resnet, (2, 2, 2, 2), resnet.BasicBlock),
    'resnet50': functools.partial(_resnet, (3, 4, 6, 3), resnet.BottleneckBlock),
    'resnet101': functools.partial(_resnet, (3, 4, 23, 3), resnet.BottleneckBlock),
    **{f'efficientnet-{variant}': functools.partial(_efficientnet, variant) for variant in efficientnet.SCALINGS},
}


VECTOR_MODELS = ('mlp',)   # take [N, D] vectors (TwoMoon, .npz vectors); every other model takes NHWC images


def create_model(model_config, num_classes: int, dtype=None, bn_group_size: int = 0) -> nn.Module:
  """Builds the registry model `model_config.name`.

  Args:
    model_config: any object with the model fields listed in the module docstring.
    num_classes: width of the logits.
    dtype: compute dtype overriding `model_config.dtype` (a name or a jnp dtype); None reads the config.
    bn_group_size: examples per BatchNorm group, 0 for the whole batch (the top-level `batch_norm_group_size`).

  Raises:
    errors.ConfigError: unknown name, dtype, or out-of-range size or rate.
  """
  check_config(model_config, dtype=dtype)
  if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
    raise errors.ConfigError(f'dataset.num_classes: must be a positive integer, got {num_classes!r}')
  if not isinstance(bn_group_size, numbers.Integral) or bn_group_size < 0:
    raise errors.ConfigError(f'batch_norm_group_size: must be 0 (whole batch) or a positive number of examples, '
                             f'got {bn_group_size!r}')
  name = model_config.name
  dtype_name = jnp.dtype(dtype).name if dtype is not None else getattr(model_config, 'dtype', 'float32')
  return MODELS[name](model_config, num_classes, COMPUTE_DTYPES[dtype_name], bn_group_size)


def check_config(model_config, field='model', dtype=None):
  """One-line ConfigErrors for a model config's own fields (name, dtype, rates, remat policy, BatchNorm momentum),
  named by the config path `field` ('model' or 'student_model'); `dtype` overrides the config's, as in
  `create_model`. The one place these rules live: `create_model` and config validation both call it."""
  name = getattr(model_config, 'name', None)
  if name not in MODELS:
    raise errors.ConfigError(f"{field}.name: unknown model '{name}'; choose one of {sorted(MODELS)}")
  dtype_name = jnp.dtype(dtype).name if dtype is not None else getattr(model_config, 'dtype', 'float32')
  if dtype_name not in COMPUTE_DTYPES:
    raise errors.ConfigError(f"{field}.dtype: unsupported compute dtype '{dtype_name}'; "
                             f'choose one of {sorted(COMPUTE_DTYPES)}')
  for rate_field in ('dropout_rate', 'drop_connect_rate'):
    rate = getattr(model_config, rate_field, 0.0)
    if not 0.0 <= rate < 1.0:
      raise errors.ConfigError(f'{field}.{rate_field}: must be in [0, 1), got {rate}')
  policy = getattr(model_config, 'remat', 'none')
  if policy not in remat.POLICIES:
    raise errors.ConfigError(f'{field}.remat: unknown rematerialisation policy {policy!r}; choose one of '
                             f'{list(REMAT_POLICIES)}')
  momentum = getattr(model_config, 'bn_momentum', 0.99)
  if not 0.0 <= momentum < 1.0:
    raise errors.ConfigError(f'{field}.bn_momentum: must be in [0, 1), got {momentum}')
