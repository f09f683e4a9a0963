"""Optimizers of the paper (Pham et al., App. C): SGD with Nesterov momentum, a wait at lr 0, linear warmup, cosine.

An optimizer config (see `configs/common.py: optimizer_config`) is read by attribute, so any namespace works.
"""

import jax
import jax.numpy as jnp
import optax

from meta_pseudo_labels import errors

SCHEDULES = ('cosine', 'constant')


def check_config(optimizer_config, name='optimizer'):
  """One-line ConfigErrors for values that would silently produce a broken schedule or optimizer; `name` is the
  config path named in them (e.g. 'student_optimizer'). The one place these ranges live (config validation calls
  it before any work, `create_learning_rate_fn` when it builds the schedule)."""
  if optimizer_config.schedule not in SCHEDULES:
    raise errors.ConfigError(f'{name}.schedule: unknown schedule {optimizer_config.schedule!r}; choose one of '
                             f'{list(SCHEDULES)}')
  for field in ('learning_rate', 'warmup_steps', 'wait_steps', 'weight_decay', 'grad_clip_norm', 'momentum'):
    if getattr(optimizer_config, field) < 0:
      raise errors.ConfigError(f'{name}.{field}: must be >= 0, got {getattr(optimizer_config, field)}')
  if optimizer_config.momentum >= 1:
    raise errors.ConfigError(f'{name}.momentum: must be in [0, 1), got {optimizer_config.momentum}')


def create_learning_rate_fn(optimizer_config, total_steps, name='optimizer'):
  """step -> learning rate: 0 for `wait_steps`, then linear warmup over `warmup_steps`, then cosine decay to 0 at
  `total_steps` ('cosine') or flat at the peak ('constant').

  The wait is the paper's student delay (the student's lr stays 0 while the teacher warms up, App. C). The edges
  follow the authors' release (`get_learning_rate`, meta_pseudo_labels/common_utils.py in
  github.com/google-research/google-research): with s = step - wait_steps, lr = 0 for s < 0 (exactly `wait_steps`
  steps), peak * (s + 1) / warmup_steps for 0 <= s < warmup_steps (the first warmup step already moves, the last
  one is at the peak), then peak * (1 + cos(pi * min(s - warmup_steps, D) / D)) / 2 with
  D = total_steps - wait_steps - warmup_steps. `step` is the train step's index (the state's step counter before
  it, 0 for the first). `name` is the config path named in errors (e.g. 'student_optimizer').
  """
  check_config(optimizer_config, name)
  if total_steps < 0:
    raise errors.ConfigError(f'number of steps must be >= 0, got {total_steps}')
  peak = float(optimizer_config.learning_rate)
  wait = int(optimizer_config.wait_steps)
  warmup = int(optimizer_config.warmup_steps)
  decay_steps = max(1, int(total_steps) - wait - warmup)
  cosine = optimizer_config.schedule == 'cosine'

  def learning_rate_fn(step):
    since_wait = jnp.asarray(step, jnp.float32) - wait
    warming = peak * (since_wait + 1.0) / warmup if warmup else jnp.float32(peak)
    if cosine:
      progress = jnp.clip((since_wait - warmup) / decay_steps, 0.0, 1.0)
      after_warmup = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      after_warmup = jnp.float32(peak)
    lr = jnp.where(since_wait < warmup, warming, after_warmup)
    return jnp.where(since_wait < 0, 0.0, lr).astype(jnp.float32)

  return learning_rate_fn


def decay_mask(params):
  """True for kernels (ndim > 1): weight decay never touches biases or BatchNorm scales/biases (App. C)."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def create_optimizer(optimizer_config, total_steps, name='optimizer'):
  """Returns (tx, learning_rate_fn) for one network: step t applies `scale_by_learning_rate(u, learning_rate_fn(t))`
  to tx's update u.

  tx: weight decay (L2 as a gradient term wd * w, i.e. the loss wd/2 * |w|^2 of TF's l2_loss, kernels only)
  -> global-norm clipping (if grad_clip_norm > 0) -> (Nesterov) momentum. The learning rate, SGD's last stage, is
  left out of tx on purpose: optax would count its own updates for the schedule, and a train step whose update is
  discarded (the divergence guard's 'skip') would leave that count behind the state's step, so the lr a step reports
  (and the one MPL's exact lookahead uses) would not be the one it applies. The caller scales by
  `learning_rate_fn(state step)` instead (`train_state.NetworkState.apply_gradients`).
  """
  learning_rate_fn = create_learning_rate_fn(optimizer_config, total_steps, name)
  chain = []
  if optimizer_config.weight_decay:
    chain.append(optax.add_decayed_weights(optimizer_config.weight_decay, mask=decay_mask))
  if optimizer_config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(optimizer_config.grad_clip_norm))
  if optimizer_config.momentum:
    chain.append(optax.trace(decay=optimizer_config.momentum, nesterov=bool(optimizer_config.nesterov)))
  return (optax.chain(*chain) if chain else optax.identity()), learning_rate_fn


def scale_by_learning_rate(updates, learning_rate):
  """SGD's last stage: -learning_rate * updates (as optax.sgd's, in each update's dtype)."""
  return jax.tree.map(lambda u: jnp.asarray(-learning_rate, u.dtype) * u, updates)
