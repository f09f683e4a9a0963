r"""ImageNet with extra unlabeled images (Pham et al., "Meta Pseudo Labels", Sec. 4; App. C): EfficientNet.

    python -m meta_pseudo_labels.main --config=configs/imagenet.py --workdir=DIR        # EfficientNet-L2, 512px
    python -m meta_pseudo_labels.main --config=configs/imagenet.py:b0 --workdir=DIR     # a smaller EfficientNet
    python -m meta_pseudo_labels.main --config=configs/imagenet.py:b0,cpu --workdir=DIR # shrunk for a laptop CPU

The argument after the colon is a comma-separated list: an EfficientNet variant (`b0` ... `b7`, `l2`; default
`l2`, or `b0` when only `cpu` is given) and optionally `cpu`. Paper: teacher and student EfficientNet-L2 at
512x512, labeled ImageNet plus the unlabeled JFT-300M images, 90.2 % top-1, on 2048 TPUv3 cores (128 replicas x
16 cores, images split in strips, weights split 16 ways). JFT is not public: `dataset.unlabeled_source` names the
TFDS source of the unlabeled pool (default: ImageNet's own train images, labels dropped); point it at any TFDS image
dataset you have built.
Values marked "as ImageNet-10%" are not stated for this run in a source we could check and are carried over.
"""

from configs import common
from configs import imagenet_10pct
from meta_pseudo_labels import errors
from meta_pseudo_labels.models import efficientnet

PAPER_VARIANT = 'l2'
CPU_VARIANT = 'b0'                           # ours: `:cpu` alone must not build EfficientNet-L2 on a laptop
PAPER_IMAGE_SIZE = 512                       # paper: EfficientNet-L2 trained at 512x512
BATCH_SIZE = 2048                            # paper: 2048 labeled per step
PAPER_MESH_FSDP, PAPER_MESH_SPATIAL = 8, 2   # paper: 16 cores per replica (weights and images split)


def get_config(arg=None):
  """EfficientNet-`variant` on labeled ImageNet + an unlabeled TFDS source; see the module docstring for `arg`."""
  tokens = [t for t in (arg or '').split(',') if t]
  variants = [t for t in tokens if t in efficientnet.SCALINGS]
  unknown = [t for t in tokens if t not in efficientnet.SCALINGS and t != 'cpu']
  if unknown or len(variants) > 1:
    raise errors.ConfigError(f'config argument {arg!r}: expected one EfficientNet variant of '
                             f"{sorted(efficientnet.SCALINGS)} and optionally 'cpu', e.g. ':b0,cpu'")
  variant = variants[0] if variants else (CPU_VARIANT if 'cpu' in tokens else PAPER_VARIANT)

  config = imagenet_10pct.get_config()       # as ImageNet-10%: UDA, label smoothing, clipping, augmentation
  config.dataset.num_validation = 25_000     # ours: held out of train for model selection
  config.dataset.num_labeled = 1_281_167 - 25_000  # paper: all of ImageNet's train labels (less validation)
  config.dataset.num_unlabeled = -1
  config.dataset.unlabeled_source = 'imagenet2012:train'  # paper: JFT-300M (not public); see module docstring
  config.dataset.image_size = (PAPER_IMAGE_SIZE if variant == PAPER_VARIANT
                               else efficientnet.SCALINGS[variant].resolution)  # EfficientNet's own resolution

  config.model.name = f'efficientnet-{variant}'  # paper: EfficientNet-L2 teacher and student
  config.model.dropout_rate = efficientnet.SCALINGS[variant].dropout_rate  # EfficientNet's published rate
  config.model.drop_connect_rate = 0.2       # EfficientNet's published stochastic depth
  config.model.dtype = 'bfloat16'            # release: bfloat16 activations on TPU
  config.student_model.name = ''

  config.batch_size = BATCH_SIZE
  config.uda_ratio = 8                       # paper: 16384 unlabeled per step = 8 x 2048
  config.num_train_steps = 1_000_000         # paper: 1M steps
  config.teacher_optimizer.learning_rate = 0.15 * BATCH_SIZE / 256   # as ImageNet-10% (per-256 rate)
  config.student_optimizer.learning_rate = 0.1 * BATCH_SIZE / 256    # as ImageNet-10%
  config.finetune.num_steps = 20_000         # paper: 20k finetuning steps on labeled ImageNet
  config.finetune.batch_size = 512           # as ImageNet-10%
  config.eval_every_steps = 20_000           # ours
  config.checkpoint_every_steps = 2000       # ours: preemptible pods, save often
  if variant == PAPER_VARIANT and 'cpu' not in tokens:
    # The paper's layout on 2048 TPUv3 cores, 128 replicas x 16 cores: weights split 8 ways, images in 2 strips,
    # data over the rest (128 on v3-2048). Without remat the step needs 75.1 G per 15.5 G core; with `block` it
    # fits, 15.57 of 16 GiB per core (compile_check, docs/SCALING.md "Memory plans"). Other slices: set
    # --config.mesh.* (README, "TPU pods").
    config.mesh.fsdp = PAPER_MESH_FSDP
    config.mesh.spatial = PAPER_MESH_SPATIAL
    config.model.remat = 'block'
    # ours: the finetuning batch is split over the data x fsdp shards (1024 on v3-2048), so 512 cannot be.
    config.finetune.batch_size = 1024

  if 'cpu' in tokens:
    common.apply_config_arg(config, 'cpu', cpu_model=f'efficientnet-{variant}')
    config.model.dtype = 'float32'
    config.dataset.unlabeled_source = ''
    config.dataset.num_labeled = imagenet_10pct.get_config().dataset.num_labeled
  return config
