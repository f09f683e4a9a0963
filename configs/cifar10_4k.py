r"""CIFAR-10-4K (Pham et al., "Meta Pseudo Labels", Sec. 3.2, Table 2; hyper-parameters App. C): WRN-28-2.

    python -m meta_pseudo_labels.main --config=configs/cifar10_4k.py --workdir=/tmp/cifar10_4k
    python -m meta_pseudo_labels.main --config=configs/cifar10_4k.py:cpu --workdir=/tmp/cifar10_4k_cpu   # laptop

Paper: 96.11 +- 0.07 % top-1. Data: `tfds build cifar10` first (the program reads prepared TFDS data, never downloads).
The base config of configs/common.py is this setup, each value marked with its source ("paper": App. C; "release":
the authors' released code, where the paper is silent; "ours": chosen there); this file adds nothing to it.
"""

from configs import common


def get_config(arg=None):
  """The paper's setup, the base config as it stands (every value and its source: `common.get_base_config`);
  `arg='cpu'` shrinks it for a local CPU run (see `common.apply_config_arg`)."""
  return common.apply_config_arg(common.get_base_config(), arg, cpu_model='wrn10_1')
