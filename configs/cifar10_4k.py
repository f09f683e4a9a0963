r"""CIFAR-10-4K (Pham et al., "Meta Pseudo Labels", Sec. 3.2, Table 2; hyper-parameters App. C): WRN-28-2.

    python -m meta_pseudo_labels.main --config=configs/cifar10_4k.py --workdir=/tmp/cifar10_4k
    python -m meta_pseudo_labels.main --config=configs/cifar10_4k.py:cpu --workdir=/tmp/cifar10_4k_cpu   # laptop

Paper: 96.11 +- 0.07 % top-1. Data: `tfds build cifar10` first (the program reads prepared TFDS data, never downloads).
"paper": App. C. "release": the authors' released code, where the paper is silent. "ours": chosen here.
"""

from configs import common


def get_config(arg=None):
  """The paper's setup; `arg='cpu'` shrinks it for a local CPU run (see `common.apply_config_arg`)."""
  config = common.get_base_config()
  config.experiment = 'train'
  config.method = 'mpl'
  config.seed = 0

  config.dataset.source = 'tfds'
  config.dataset.name = 'cifar10'
  config.dataset.train_split = 'train'
  config.dataset.test_split = 'test'
  config.dataset.num_classes = 10
  config.dataset.image_size = 32
  config.dataset.num_labeled = 4000          # paper: 4000 labeled (400 per class)
  config.dataset.num_validation = 5000       # paper: 5000 held out of train for model selection
  config.dataset.num_unlabeled = -1          # paper: the remaining 41000 train images
  config.dataset.augment = 'cifar'           # paper: flip + pad-4 crop (weak); RandAugment + Cutout (strong)
  config.dataset.randaugment_num_ops = 2     # paper: 2 ops
  config.dataset.randaugment_magnitude = 16  # paper: magnitude 16
  config.dataset.cutout_size = 16            # paper: 16x16 Cutout
  config.dataset.pad_crop = 4                # paper: pad 4, random crop

  config.model.name = 'wrn28_2'              # paper: WRN-28-2 (leaky ReLU 0.2)
  config.model.dropout_rate = 0.2            # paper: dropout 0.2 on the dense layer
  config.model.bn_momentum = 0.99            # release
  config.student_model.name = ''             # paper: the student is the same WRN-28-2

  config.batch_size = 128                    # paper: 128 labeled per step
  config.uda_ratio = 7                       # paper: mu = 7 (896 unlabeled per step)
  config.eval_batch_size = 256               # ours

  config.mpl.feedback = 'hard_taylor'        # paper: hard pseudo labels, first-order h (Sec. 2, App. A)
  config.mpl.h_sign = 1.0                    # MPL_SPEC.md: h = CE_old - CE_new (the release flips it)
  config.mpl.baseline_rate = 0.0             # ours: no moving-average baseline
  config.mpl.pseudo_labels = 'sampled'       # paper: drawn from the teacher (Sec. 2)
  config.label_smoothing = 0.15              # paper
  config.uda.weight = 8.0                    # paper: lambda_u = 8
  config.uda.temperature = 0.7               # paper: tau = 0.7
  config.uda.threshold = 0.6                 # paper: confidence threshold 0.6
  config.uda.ramp_steps = 5000               # paper: UDA weight ramped up over 5k steps
  config.ema_decay = 0.995                   # paper

  config.num_train_steps = 300_000           # paper
  config.teacher_optimizer = common.optimizer_config(
      learning_rate=0.05,                    # paper
      warmup_steps=5000,                     # paper: linear warmup 5k, then cosine
      weight_decay=5e-4)                     # paper: 5e-4, not on BatchNorm
  config.student_optimizer = common.optimizer_config(
      learning_rate=0.05,                    # paper
      warmup_steps=5000,                     # paper
      wait_steps=3000,                       # paper: the student waits 3k steps (lr 0)
      weight_decay=5e-4)                     # paper
  config.finetune.num_steps = 1000           # paper: 1000 finetuning steps on the labeled data
  config.finetune.batch_size = 512           # paper
  config.finetune.optimizer = common.optimizer_config(
      learning_rate=1e-5, warmup_steps=0, schedule='constant')  # paper: SGD lr 1e-5

  config.log_every_steps = 100               # ours
  config.eval_every_steps = 5000             # ours
  config.checkpoint_every_steps = 5000       # ours
  config.keep_checkpoints = 3                # ours
  return common.apply_config_arg(config, arg, cpu_model='wrn10_1')
