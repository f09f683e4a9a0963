"""The field set every config shares, and the schedule helpers (`follow_num_train_steps`, `:cpu`).

The values are not neutral: they are the paper's CIFAR-10-4K setup (App. C), each marked with its source, the setup
the other experiments depart from, so a field an experiment config leaves alone has its CIFAR-10-4K value. This is
the one place they are stated: configs/cifar10_4k.py is this config as it stands; the other configs set what their
paper (or our choice) decides.

Sources: Pham et al., "Meta Pseudo Labels", CVPR 2021 (arXiv 2003.10580), Appendix C ("paper") and the authors'
released hyper-parameters where the paper is silent ("release"). Anything chosen here is marked "ours".
"""

import fractions

import ml_collections

from meta_pseudo_labels import errors


def optimizer_config(*, learning_rate, warmup_steps, wait_steps=0, weight_decay=0.0, grad_clip_norm=0.0,
                     momentum=0.9, nesterov=True, schedule='cosine'):
  """SGD (Nesterov) with `wait_steps` at lr 0, linear warmup, then cosine decay to 0 (paper, App. C)."""
  return ml_collections.ConfigDict(dict(
      learning_rate=learning_rate,   # peak lr after warmup
      warmup_steps=warmup_steps,     # linear warmup from 0, counted after wait_steps
      wait_steps=wait_steps,         # steps at lr 0 before warmup (the paper's student waits)
      weight_decay=weight_decay,     # L2 added to the gradient, masked off BatchNorm scales/biases and biases
      grad_clip_norm=grad_clip_norm, # global-norm clipping; 0 disables
      momentum=momentum,
      nesterov=nesterov,
      schedule=schedule,             # 'cosine' | 'constant'
  ))


def get_base_config():
  """The complete field set, at the CIFAR-10-4K values (configs/cifar10_4k.py); experiment configs change values,
  never add fields."""
  config = ml_collections.ConfigDict()
  # 'train': one run (train.py); sweeps: 'two_moons' (Sec. 3.1), 'digits', 'fashion_mnist'; 'precompute_targets':
  # a trained teacher's targets for Reduced MPL (`reduced`)
  config.experiment = 'train'
  config.method = 'mpl'         # 'mpl' | 'supervised' (labeled only) | 'uda' (teacher's sup+UDA loss alone)
  config.seed = 0

  # ---- data -------------------------------------------------------------------------------------------------
  config.dataset = ml_collections.ConfigDict(dict(
      source='tfds',            # 'tfds' | 'folder' (<root>/<split>/<class>/*.png|jpg) | 'npz' | 'idx' (MNIST
                                # format) | 'digits' | 'two_moons'
      name='cifar10',           # paper: CIFAR-10-4K; the TFDS name (source 'tfds')
      data_dir='',              # TFDS data_dir, image-folder root, .npz path or idx directory; '' = TFDS default
      train_split='train',
      test_split='test',
      num_classes=10,
      image_size=32,            # model input size (square)
      num_labeled=4000,         # paper: 4000 labeled (400 per class), a class-balanced subset of train chosen by
                                # `split_seed`
      num_validation=5000,      # paper: 5000 held out of train for model selection (never the test split)
      num_unlabeled=-1,         # -1: all of train not labeled and not validation (paper: the remaining 41000)
      split_seed=0,             # which examples are labeled / validation
      unlabeled_source='',      # '' = rest of train; else a TFDS name 'name[:split]' as extra unlabeled pool
      augment='cifar',          # paper: 'cifar' (flip + pad-4 crop weak; RandAugment + Cutout strong) | 'digits'
                                # | 'imagenet' | 'none'
      labeled_view='weak',      # the view of the labeled images outside finetuning: 'weak' | 'strong' (the paper's
                                # RandAugment baseline, Table 3: supervised on RandAugment views)
      randaugment_num_ops=2,    # paper: 2 ops
      randaugment_magnitude=16, # paper: magnitude 16
      cutout_size=16,           # paper: 16x16 Cutout
      pad_crop=4,               # paper: pad 4, random crop
      in_memory=True,           # small datasets: index-based, bitwise-resumable pipeline
      shuffle_buffer=16384,     # streaming (in_memory=False) pipelines only
      prefetch=2,
  ))

  # ---- models -----------------------------------------------------------------------------------------------
  config.model = ml_collections.ConfigDict(dict(
      name='wrn28_2',           # paper: WRN-28-2 (leaky ReLU 0.2); a registry name, see meta_pseudo_labels/models
      dropout_rate=0.2,         # paper: dropout 0.2 on the dense layer
      bn_momentum=0.99,         # release
      drop_connect_rate=0.0,    # EfficientNet only
      dtype='float32',          # compute dtype ('bfloat16' on TPU); params stay float32
      remat='none',             # rematerialisation of every block: 'none', 'block', 'dots' (models/remat.py)
  ))
  # name '' = the student is `model` (its remat included; paper: the same WRN-28-2); else a full override: its own
  # name and remat.
  config.student_model = ml_collections.ConfigDict(dict(name='', remat='none'))
  # Warm starts (ours; warm_start.py): start a network from a trained one, its parameters and BatchNorm statistics
  # (not its optimizer). '' = fresh init; else a workdir 'W' (its final network), 'W:<network>' (teacher, student,
  # student_ema, student_finetuned, model, model_ema), 'W:<phase>' (mpl, finetune, supervised, uda: that phase's
  # final network) or a directory written by `python -m meta_pseudo_labels.export`. Same architecture and classes.
  config.teacher_init = ''      # the teacher (method 'supervised' / 'uda': the one network)
  config.student_init = ''      # the student (method 'mpl' only)

  # ---- batch ------------------------------------------------------------------------------------------------
  config.batch_size = 128       # paper: labeled examples per step (global)
  config.uda_ratio = 7          # paper: mu = 7 unlabeled examples per labeled example (896 per step)
  config.eval_batch_size = 256  # ours

  # ---- MPL --------------------------------------------------------------------------------------------------
  config.mpl = ml_collections.ConfigDict(dict(
      # paper: 'hard_taylor', hard pseudo labels and first-order h (Sec. 2, App. A) | 'exact' | 'hard_dot' |
      # 'none' (UDA teacher + distillation)
      feedback='hard_taylor',
      h_sign=1.0,               # +1: h = CE_old - CE_new (correct, MPL_SPEC.md); -1: the flipped sign of released code
      baseline_rate=0.0,        # ours, 0 disables: alpha of the moving-average baseline b <- b + alpha (h - b)
      pseudo_labels='sampled',  # 'sampled' (paper, Sec. 2) | 'argmax' (released code) | 'soft'; 'exact' always soft
      teacher='network',        # 'network' | 'reduced': Reduced MPL's T_R on stored targets (App. E; `reduced`)
  ))
  # Reduced MPL (paper App. E; README "Reduced Meta Pseudo Labels"): a trained teacher's distributions on the
  # unlabeled pool, precomputed once (experiment 'precompute_targets'), read by the reduced teacher T_R.
  config.reduced = ml_collections.ConfigDict(dict(
      teacher='',               # precompute: the trained teacher, 'W' or 'W:<network>' (model_ema,
                                # student_finetuned, ...)
      targets_dir='',           # training with mpl.teacher='reduced': the precompute's --workdir
      top_k=8,                  # ours: classes stored per image (4k+2 bytes; the rest mass spread evenly)
      hidden_sizes=(512, 512),  # ours: T_R's ReLU MLP (App. E: "a multi-layer perceptron", size not checked here)
      chunk_size=4096,          # precompute: images per file (the unit of resume)
  ))
  config.label_smoothing = 0.15   # paper
  config.uda = ml_collections.ConfigDict(dict(
      weight=8.0,               # paper: lambda_u = 8
      temperature=0.7,          # paper: tau = 0.7
      threshold=0.6,            # paper: confidence mask 0.6
      ramp_steps=5000,          # paper: w(t) = weight * min(1, (t+1)/ramp_steps), ramped up over 5k steps
  ))
  config.ema_decay = 0.995      # paper: student EMA; effective decay min(d, (t+1)/(t+10))

  # ---- optimisation -----------------------------------------------------------------------------------------
  config.num_train_steps = 300_000   # paper
  # paper: lr 0.05, linear warmup over 5k steps then cosine, weight decay 5e-4 (not on BatchNorm); the student
  # waits 3k steps at lr 0
  config.teacher_optimizer = optimizer_config(learning_rate=0.05, warmup_steps=5000, weight_decay=5e-4)
  config.student_optimizer = optimizer_config(learning_rate=0.05, warmup_steps=5000, wait_steps=3000,
                                              weight_decay=5e-4)
  config.finetune = ml_collections.ConfigDict(dict(
      num_steps=1000,           # paper: 1000 steps on the labeled data; 0 skips finetuning
      batch_size=512,           # paper
      optimizer=optimizer_config(learning_rate=1e-5, warmup_steps=0, schedule='constant'),   # paper: SGD lr 1e-5
  ))

  # ---- distribution -----------------------------------------------------------------------------------------
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1,                  # -1: all devices not used by the other axes
      fsdp=1,                   # parameters and optimizer state split over this axis
      spatial=1,                # image width split over this axis (high-resolution inputs)
      fsdp_min_size=2**18,      # parameters smaller than this stay replicated
  ))
  config.batch_norm_group_size = 0  # 0: statistics over the global batch; n: over groups of n examples

  # ---- sweeps (experiments 'two_moons', 'digits' and 'fashion_mnist': experiments/*.py) -------------------------
  config.sweep = ml_collections.ConfigDict(dict(
      methods=(),               # method names of the sweep; () = every method the experiment defines
      num_seeds=10,             # runs per method; seed i picks the labeled points and initialises the networks
      num_seeds_other=1,        # fashion_mnist: runs of the rows outside the claim (num_seeds: the claim's rows)
      plot_seed=0,              # the seed whose decision boundaries the figure draws
      mode='run',               # fashion_mnist: 'run' | 'report' (finished runs only) | 'tune_bases'
      bases='',                 # fashion_mnist: the JSON of tuned base settings ('tune_bases' writes it)
  ))

  # ---- loop -------------------------------------------------------------------------------------------------
  config.log_every_steps = 100          # ours
  config.eval_every_steps = 5000        # ours
  config.checkpoint_every_steps = 5000  # ours
  config.keep_checkpoints = 3           # ours
  config.on_nonfinite = 'stop'  # 'stop' | 'skip'
  # Training steps per call of the jitted step (a loop over stacked batches; equal to one step per call up to
  # float32 rounding): fewer dispatches and transfers, for accelerators. Keep 1 on CPU: XLA:CPU ran WRN-10-1's MPL
  # step 6.7x slower inside the loop (docs/PERFORMANCE.md, issue 23). A dispatch ends at every log/eval/checkpoint
  # step, so choose a divisor of their cadences.
  config.steps_per_dispatch = 1
  return config


# The schedule shape of `:cpu` (ours), in fractions of `num_train_steps`: at its 200 steps, warmup and wait 20
# steps, UDA ramp 40, finetuning 20, evaluation and checkpoints every 50, a log line every 20 (the paper's 300k-step
# CIFAR run: 1.7 % warmup, 1 % wait, 1.7 % ramp, 0.3 % finetuning). docs/RESULTS.md measures the ramp's fraction.
CPU_SCHEDULE = dict(warmup=1 / 10, wait=1 / 10, uda_ramp=1 / 5, finetune=1 / 10, eval_every=1 / 4,
                    checkpoint_every=1 / 4, log_every=1 / 10)


def _fraction_of(steps_ref, fraction, *, at_least_one):
  """fraction * steps, rounded down (up with `at_least_one`), as an int FieldReference that follows `steps_ref`."""
  ratio = fractions.Fraction(fraction).limit_denominator(10_000)
  return (steps_ref * ratio.numerator + (ratio.denominator - 1 if at_least_one else 0)) // ratio.denominator


def follow_num_train_steps(config, *, warmup, wait, uda_ramp, finetune, eval_every, checkpoint_every, log_every):
  """Makes warmup, wait, UDA ramp, finetune length and the loop's cadences fractions of `num_train_steps`.

  They become ml_collections FieldReferences of `config.num_train_steps`, resolved whenever they are read, so
  `--config.num_train_steps=N` keeps the schedule's shape (a run of N steps warms up over warmup * N ...). A field set
  explicitly (`--config.uda.ramp_steps=300`) holds its value and no longer follows.
  """
  steps = config.get_ref('num_train_steps')
  for optimizer in (config.teacher_optimizer, config.student_optimizer):
    optimizer.warmup_steps = _fraction_of(steps, warmup, at_least_one=False)
  config.student_optimizer.wait_steps = _fraction_of(steps, wait, at_least_one=False)
  config.teacher_optimizer.wait_steps = 0
  config.uda.ramp_steps = _fraction_of(steps, uda_ramp, at_least_one=True)
  config.finetune.num_steps = _fraction_of(steps, finetune, at_least_one=True) if finetune else 0
  config.eval_every_steps = _fraction_of(steps, eval_every, at_least_one=True)
  config.checkpoint_every_steps = _fraction_of(steps, checkpoint_every, at_least_one=True)
  config.log_every_steps = _fraction_of(steps, log_every, at_least_one=True)
  return config


def shrink_for_cpu(config, *, steps=None, batch_size=None, image_size=None):
  """Applies `local.*` style overrides to make any paper config run on a laptop CPU (ours).

  `steps`: the run's length, with the `CPU_SCHEDULE` shape following any later override of `num_train_steps`.
  """
  if steps is not None:
    config.num_train_steps = steps
    follow_num_train_steps(config, **CPU_SCHEDULE)
  if batch_size is not None:
    config.batch_size = batch_size
    config.eval_batch_size = min(config.eval_batch_size, 4 * batch_size)
    config.finetune.batch_size = min(config.finetune.batch_size, 4 * batch_size)
  if image_size is not None:
    config.dataset.image_size = image_size
  return config


# `--config=configs/X.py:cpu`: any paper config shrunk for a laptop CPU (ours). The schedule keeps its shape
# (wait, warmup, cosine; `CPU_SCHEDULE`) at any `num_train_steps`; the model is the config's `cpu_model`, a small
# net of the same family.
CPU_STEPS = 200
CPU_BATCH_SIZE = 16
CPU_IMAGE_SIZE = 32
CPU_UDA_RATIO = 4


def apply_config_arg(config, arg, *, cpu_model):
  """The config string after the colon: '' (the paper's setup) or 'cpu' (shrunk for a local CPU run)."""
  if arg in (None, ''):
    return config
  if arg != 'cpu':
    raise errors.ConfigError(f"config argument {arg!r}: unknown; use no argument (the paper's setup) or ':cpu'")
  shrink_for_cpu(config, steps=CPU_STEPS, batch_size=CPU_BATCH_SIZE, image_size=CPU_IMAGE_SIZE)
  config.model.name = cpu_model
  if config.student_model.name:
    config.student_model.name = cpu_model
  config.uda_ratio = min(config.uda_ratio, CPU_UDA_RATIO)
  return config
