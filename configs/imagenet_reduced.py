r"""Reduced Meta Pseudo Labels on ImageNet (Pham et al., "Meta Pseudo Labels", Sec. 4 and App. E): a B7 student.

    # 1. the trained teacher's targets on the unlabeled pool, once
    python -m meta_pseudo_labels.main --config=configs/imagenet_reduced.py --config.experiment=precompute_targets \
        --config.reduced.teacher=TEACHER_WORKDIR:model_ema --workdir=TARGETS
    # 2. Reduced MPL: the student and T_R, then finetuning
    python -m meta_pseudo_labels.main --config=configs/imagenet_reduced.py --config.reduced.targets_dir=TARGETS \
        --workdir=DIR
    # the memory plan, no TPU needed
    python -m meta_pseudo_labels.compile_check --config=configs/imagenet_reduced.py --topology=v3-2048

The argument after the colon: '' (paper: EfficientNet-B7 student), 'l2' (an EfficientNet-L2 student at 512x512, on
the layout of configs/imagenet.py's L2 run, for the memory plan of docs/SCALING.md), 'cpu' (shrunk, B0).

Paper (App. E): labeled ImageNet, unlabeled YFCC100M; the teacher T is a converged EfficientNet-L2 (trained on
ImageNet + JFT), run once over the unlabeled images; the reduced teacher T_R is a multi-layer perceptron on T's
distribution, trained with the student by the MPL feedback; the EfficientNet-B7 student reaches 86.9 % top-1.
YFCC100M is not in TFDS: `dataset.unlabeled_source` names the TFDS source you have built (default: ImageNet's own
train images, labels dropped). The values of App. E we could not check here (batch sizes, steps, T_R's width and
depth, its optimizer) are marked "ours" or "as the L2 run" (configs/imagenet.py) and are one flag away.
"""

from configs import common
from configs import imagenet
from meta_pseudo_labels import errors

PAPER_STUDENT = 'b7'


def get_config(arg=None):
  tokens = [t for t in (arg or '').split(',') if t]
  if any(t not in ('l2', 'cpu') for t in tokens):
    raise errors.ConfigError(f"config argument {arg!r}: use no argument (paper: B7 student), 'l2' or 'cpu'")
  variant = 'l2' if 'l2' in tokens else PAPER_STUDENT
  # B7: EfficientNet-B7's own 600x600 (configs/imagenet.py); L2: 512x512 on the L2 run's mesh and remat.
  config = imagenet.get_config(','.join([variant] + (['cpu'] if 'cpu' in tokens else [])))
  # The image network of this config is the student (`model`); the teacher is T_R.
  config.mpl.teacher = 'reduced'             # paper, App. E
  config.mpl.feedback = 'hard_taylor'        # as the L2 run: hard pseudo labels, first-order h
  config.mpl.pseudo_labels = 'sampled'       # paper, Sec. 2
  config.uda.weight = 0.0                    # T_R reads stored distributions, no image views: no UDA term
  config.reduced.top_k = 8                   # ours: 34 bytes per image (4.4 GB for 130M); TV <= rest mass
  config.reduced.hidden_sizes = (1024, 1024)  # ours: App. E says "a multi-layer perceptron"; size not checked
  config.reduced.chunk_size = 4096           # ours: ~140 KB per file, the unit of resume
  config.teacher_optimizer = common.optimizer_config(   # ours: T_R's optimizer (App. E not checked here)
      learning_rate=1e-3 * config.batch_size / 256, warmup_steps=config.teacher_optimizer.warmup_steps,
      weight_decay=0.0, grad_clip_norm=config.teacher_optimizer.grad_clip_norm)
  if 'cpu' in tokens:
    config.reduced.hidden_sizes = (64,)
    config.reduced.chunk_size = 256
  return config
