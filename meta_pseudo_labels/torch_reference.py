"""A PyTorch reference of the hard_taylor MPL step, for the benchmark's side-by-side timing only (torch optional).

The benchmark (`benchmark.py`) times this next to the project's `mpl.mpl_step` in the same process, so that
"how fast is this project" has an answer that does not depend on the machine's load: the ratio of the two step
times, taken alternately. Nothing else imports this module; torch is the optional extra `bench`
(`pip install .[bench]`), and `available()` says whether it is installed.

What is the same as the project's step (MPL_SPEC.md 'One MPL step', hard_taylor feedback; paper Sec. 2, App. A):
- the networks: WRN-28-2 (or any WRN-d-k of `wide_resnet.py`): 3x3 stem with 16 filters, pre-activation blocks
  of 16k/32k/64k filters (strides 1, 2, 2), leaky ReLU 0.2, BatchNorm with the config's momentum (PyTorch's
  `momentum` is 1 - ours) and epsilon 1e-3, bias-free convolutions, 1x1 projection shortcuts, global average
  pooling, dropout on the dense layer;
- the batch: B labeled images and two views of mu*B unlabeled ones, NHWC float32 from the same synthetic batch
  (transposed once to NCHW before timing);
- the order of operations: one teacher forward on [x_l; x_w; x_s]; its own loss CE_eps(y_l) + w(t) UDA(x_w, x_s);
  hard pseudo labels argmax T(x_s); the student's forward + backward on CE_eps(y_hat, S(x_s)) and its SGD update;
  the labeled loss CE(y_l, S(x_l)) before and after that update (train-mode BatchNorm on x_l with the running
  statistics left untouched, the same dropout mask on both sides), h = before - after; the teacher's MPL loss
  h * CE(y_hat, T(x_s)); one teacher backward and SGD update; the student's EMA;
- the optimizer: SGD with Nesterov momentum, weight decay on kernels only (as a gradient term).
Learning-rate schedules are not reproduced (a constant rate costs the same).
"""

import contextlib
import importlib.util
import sys
from typing import Any

import numpy as np

LEAKY_RELU_SLOPE = 0.2
BN_EPSILON = 1e-3


def available() -> bool:
  return importlib.util.find_spec('torch') is not None


def _torch():
  """torch, imported so that it works beside TensorFlow.

  torch imports triton (its GPU compiler) on first use of `torch.optim`; triton 3.8.0 crashes the process with a
  segmentation fault while loading when TensorFlow 2.21 is already loaded in it (both orders of the two imports
  were tried: only TensorFlow first crashes), as in a test worker that ran TensorFlow tests before. The reference
  runs eager PyTorch and never uses triton, so with TensorFlow loaded, triton is made unimportable first (a None
  entry in `sys.modules`), which torch reads as "triton not installed".
  """
  if 'tensorflow' in sys.modules:
    sys.modules.setdefault('triton', None)
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def wide_resnet(depth: int, width: int, num_classes: int, *, bn_momentum: float, dropout_rate: float):
  """WRN-`depth`-`width` of the same shapes and order of layers as `models.wide_resnet.WideResNet`."""
  torch = _torch()
  nn = torch.nn

  def norm(channels):
    return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=1.0 - bn_momentum)

  def act(x):
    return nn.functional.leaky_relu(x, LEAKY_RELU_SLOPE)

  class Block(nn.Module):

    def __init__(self, cin, cout, stride, activate_before_residual):
      super().__init__()
      self.bn1, self.bn2 = norm(cin), norm(cout)
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.projection = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout or stride != 1 else None
      self.activate_before_residual = activate_before_residual

    def forward(self, x):
      preactivated = act(self.bn1(x))
      shortcut = preactivated if self.activate_before_residual else x
      y = self.conv2(act(self.bn2(self.conv1(preactivated))))
      if self.projection is not None:
        shortcut = self.projection(shortcut)
      return shortcut + y

  class WideResNet(nn.Module):

    def __init__(self):
      super().__init__()
      blocks_per_stage = (depth - 4) // 6
      self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      blocks, cin = [], 16
      for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks_per_stage):
          first = block == 0
          blocks.append(Block(cin, filters, 2 if first and stage > 0 else 1, first and stage == 0))
          cin = filters
      self.blocks = nn.Sequential(*blocks)
      self.final_norm = norm(cin)
      self.dropout = nn.Dropout(dropout_rate)
      self.classifier = nn.Linear(cin, num_classes)
      for module in self.modules():
        if isinstance(module, nn.Conv2d):
          nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(module, nn.Linear):
          nn.init.xavier_uniform_(module.weight)
          nn.init.zeros_(module.bias)

    def forward(self, x):
      x = act(self.final_norm(self.blocks(self.stem(x))))
      return self.classifier(self.dropout(x.mean(dim=(2, 3))))

  return WideResNet()


def _optimizer(model, optimizer_config):
  """SGD + Nesterov momentum; weight decay on kernels (ndim > 1) only, like `optimizers.decay_mask`."""
  torch = _torch()
  params = list(model.parameters())
  groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=float(optimizer_config.weight_decay)),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]
  momentum = float(optimizer_config.momentum)
  return torch.optim.SGD(groups, lr=float(optimizer_config.learning_rate), momentum=momentum,
                         nesterov=bool(optimizer_config.nesterov) and momentum > 0)


@contextlib.contextmanager
def _frozen_batch_stats(model):
  """Train-mode BatchNorm (batch statistics) with the running statistics left as they are (`labeled_loss`)."""
  saved = [(buffer, buffer.clone()) for buffer in model.buffers()]   # BatchNorm's running statistics and counts
  try:
    yield
  finally:
    for buffer, value in saved:
      buffer.copy_(value)


class MplStep:
  """Teacher, student, student EMA and their optimizers; `__call__(step)` runs one hard_taylor MPL step."""

  def __init__(self, config, batch: dict[str, np.ndarray], device: str):
    torch = _torch()
    name = config.model.name
    if not name.startswith('wrn'):
      raise ValueError(f'the PyTorch reference has only WideResNets, not {name!r}')
    depth, width = (int(part) for part in name[3:].split('_'))
    num_classes = config.dataset.num_classes

    def make():
      return wide_resnet(depth, width, num_classes, bn_momentum=config.model.bn_momentum,
                         dropout_rate=config.model.dropout_rate).to(device).train()

    torch.manual_seed(config.seed)
    self.teacher, self.student, self.student_ema = make(), make(), make()
    self.student_ema.load_state_dict(self.student.state_dict())
    for p in self.student_ema.parameters():
      p.requires_grad_(False)
    self.teacher_opt = _optimizer(self.teacher, config.teacher_optimizer)
    self.student_opt = _optimizer(self.student, config.student_optimizer)
    self.label_smoothing = float(config.label_smoothing)
    self.uda = config.uda
    self.ema_decay = float(config.ema_decay)
    self.device = device

    def image(key):
      return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(batch[key]), (0, 3, 1, 2)))).to(device)
    self.x_l, self.x_w, self.x_s = image('labeled_image'), image('unlabeled_weak'), image('unlabeled_strong')
    self.y_l = torch.from_numpy(np.asarray(batch['labeled_label']).astype(np.int64)).to(device)

  def _labeled_loss(self, seed):
    """CE(y_l, S(x_l)) in train mode, running statistics untouched, dropout mask fixed by `seed`."""
    torch = _torch()
    torch.manual_seed(seed)
    with torch.no_grad(), _frozen_batch_stats(self.student):
      return torch.nn.functional.cross_entropy(self.student(self.x_l), self.y_l)

  def __call__(self, step: int):
    torch = _torch()
    functional = torch.nn.functional
    sizes = (self.x_l.shape[0], self.x_w.shape[0], self.x_s.shape[0])
    # 1. One teacher forward; its backward waits for the feedback.
    logits_l, logits_w, logits_s = torch.split(self.teacher(torch.cat([self.x_l, self.x_w, self.x_s])), sizes)
    # 2. Hard pseudo labels on x_s.
    pseudo_labels = logits_s.detach().argmax(dim=-1)
    # 3. The student learns them; the labeled loss before the update is a function of the old parameters.
    feedback_seed = step + 1
    before = self._labeled_loss(feedback_seed)
    self.student_opt.zero_grad(set_to_none=True)
    student_loss = functional.cross_entropy(self.student(self.x_s), pseudo_labels,
                                            label_smoothing=self.label_smoothing)
    student_loss.backward()
    self.student_opt.step()
    # 4. h = CE_l(old) - CE_l(new).
    h = before - self._labeled_loss(feedback_seed)
    # 5. The teacher's own loss (labeled CE + UDA) and the MPL loss; one backward.
    loss = functional.cross_entropy(logits_l, self.y_l, label_smoothing=self.label_smoothing)
    if self.uda.weight:
      targets = functional.softmax(logits_w.detach() / self.uda.temperature, dim=-1)
      mask = (targets.max(dim=-1).values >= self.uda.threshold).to(logits_s.dtype)
      per_example = -(targets * functional.log_softmax(logits_s, dim=-1)).sum(dim=-1)
      ramp = min(1.0, (step + 1.0) / self.uda.ramp_steps) if self.uda.ramp_steps > 0 else 1.0
      loss = loss + self.uda.weight * ramp * (mask * per_example).mean()
    loss = loss + h.detach() * functional.cross_entropy(logits_s, pseudo_labels)
    self.teacher_opt.zero_grad(set_to_none=True)
    loss.backward()
    self.teacher_opt.step()
    # 6. The student's EMA (parameters and BatchNorm statistics), decay min(d, (t+1)/(t+10)).
    rate = min(self.ema_decay, (step + 1.0) / (step + 10.0))
    with torch.no_grad():
      ema = self.student_ema.state_dict()
      for key, value in self.student.state_dict().items():
        if value.dtype.is_floating_point:
          ema[key].mul_(rate).add_(value, alpha=1.0 - rate)
    return loss


def device_for(jax_backend: str) -> str:
  """The torch device matching the JAX backend: 'cuda' on a GPU backend when torch sees one, else 'cpu'."""
  torch = _torch()
  if jax_backend == 'gpu' and torch.cuda.is_available():
    return 'cuda'
  return 'cpu'


def synchronize(device: str) -> None:
  if device == 'cuda':
    _torch().cuda.synchronize()


def run_to_completion(step: MplStep, index: int) -> None:
  """Step number `index` of the reference, returning when its device has finished it (for timing)."""
  step(index)
  synchronize(step.device)


def set_threads(count: int) -> None:
  _torch().set_num_threads(count)


def describe() -> dict[str, Any]:
  torch = _torch()
  return dict(torch_version=torch.__version__, torch_threads=torch.get_num_threads())
