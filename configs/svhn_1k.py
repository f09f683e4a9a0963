r"""SVHN-1K (Pham et al., "Meta Pseudo Labels", Sec. 3.2, Table 2; hyper-parameters App. C): WRN-28-2.

    python -m meta_pseudo_labels.main --config=configs/svhn_1k.py --workdir=/tmp/svhn_1k
    python -m meta_pseudo_labels.main --config=configs/svhn_1k.py:cpu --workdir=/tmp/svhn_1k_cpu   # laptop

Paper: 98.01 +- 0.07 % top-1. Data: `tfds build svhn_cropped`. The paper gives SVHN-1K the training setup of
CIFAR-10-4K (App. C lists them together); where a value below is marked "as CIFAR-10-4K" the paper does not state
it for SVHN separately, so it is carried over.
"""

from configs import cifar10_4k
from configs import common


def get_config(arg=None):
  """The paper's setup; `arg='cpu'` shrinks it for a local CPU run (see `common.apply_config_arg`)."""
  config = cifar10_4k.get_config()           # as CIFAR-10-4K: model, optimizers, UDA, MPL, schedule
  config.dataset.name = 'svhn_cropped'       # TFDS name of SVHN's cropped digits
  config.dataset.train_split = 'train'       # paper: the 73257 train digits (no 'extra' split)
  config.dataset.test_split = 'test'
  config.dataset.num_classes = 10
  config.dataset.image_size = 32
  config.dataset.num_labeled = 1000          # paper: 1000 labeled (100 per class)
  config.dataset.num_validation = 5000       # ours, as CIFAR-10-4K's 5000
  config.dataset.num_unlabeled = -1          # paper: the rest of train
  config.dataset.augment = 'cifar'           # as CIFAR-10-4K (the pipeline's CIFAR policy, incl. flip)
  return common.apply_config_arg(config, arg, cpu_model='wrn10_1')
