"""Train states: explicit pytrees of parameters, BatchNorm statistics and optimizer states.

All `create_*` functions are pure functions of their array arguments, so they run under `jax.eval_shape` (to get
the abstract state a checkpoint restores into) and under `jax.jit(..., out_shardings=...)` (to initialise a
sharded state directly on the devices).
"""

from typing import Any, Callable

import flax
from flax import struct
import jax
import jax.numpy as jnp
import optax

from meta_pseudo_labels.method import optimizers
from meta_pseudo_labels.models import reduced_teacher


class NetworkState(struct.PyTreeNode):
  """One network and its optimizer."""
  params: Any
  batch_stats: Any                  # {} for models without BatchNorm
  opt_state: optax.OptState
  apply_fn: Callable = struct.field(pytree_node=False)           # model.apply
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  learning_rate_fn: Callable = struct.field(pytree_node=False)   # step -> lr (the update, metrics, exact lookahead)

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def apply_gradients(self, grads, batch_stats, step):
    """The optimizer update of train step `step` (the state's step counter) with `grads`; `batch_stats` are the
    statistics the same forward pass produced.

    The learning rate is `learning_rate_fn(step)`, the one the step reports: the schedule follows the state's step,
    not a count of applied updates, so a skipped step (the divergence guard) cannot shift it (optimizers.py).
    """
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    updates = optimizers.scale_by_learning_rate(updates, self.learning_rate_fn(step))
    return self.replace(params=optax.apply_updates(self.params, updates), batch_stats=batch_stats,
                        opt_state=opt_state)


class MplState(struct.PyTreeNode):
  step: jax.Array            # int32 scalar, number of MPL steps done
  teacher: NetworkState
  student: NetworkState
  student_ema: Any           # {'params': ..., 'batch_stats': ...}, EMA of the student's variables
  mpl_baseline: jax.Array    # float32 scalar, moving average of h (hard feedback modes)


class SupervisedState(struct.PyTreeNode):
  """Supervised baseline, UDA teacher pretraining, student finetuning."""
  step: jax.Array
  network: NetworkState
  ema: Any                   # {'params', 'batch_stats'} or None (no EMA kept)


def init_variables(rng, model, input_shape):
  """{'params', 'batch_stats'} of `model` for examples of `input_shape` (without the batch dimension)."""
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({'params': params_rng, 'dropout': dropout_rng}, jnp.zeros((1, *input_shape)),
                         train=False)
  variables = flax.core.unfreeze(variables)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def create_network_state(variables, apply_fn, optimizer_config, total_steps, name='optimizer'):
  """A NetworkState that starts from `variables` (fresh init, or e.g. the EMA student for finetuning)."""
  tx, learning_rate_fn = optimizers.create_optimizer(optimizer_config, total_steps, name)
  return NetworkState(params=variables['params'], batch_stats=variables['batch_stats'],
                      opt_state=tx.init(variables['params']), apply_fn=apply_fn, tx=tx,
                      learning_rate_fn=learning_rate_fn)


def _mpl_state(teacher_variables, teacher_apply_fn, student_rng, student_model, input_shape, *, teacher_optimizer,
               student_optimizer, total_steps):
  teacher = create_network_state(teacher_variables, teacher_apply_fn, teacher_optimizer, total_steps,
                                 'teacher_optimizer')
  student = create_network_state(init_variables(student_rng, student_model, input_shape), student_model.apply,
                                 student_optimizer, total_steps, 'student_optimizer')
  return MplState(step=jnp.zeros((), jnp.int32), teacher=teacher, student=student,
                  student_ema=jax.tree.map(jnp.copy, student.variables),
                  mpl_baseline=jnp.zeros((), jnp.float32))


def create_mpl_state(rng, teacher_model, student_model, input_shape, *, teacher_optimizer, student_optimizer,
                     total_steps):
  """Teacher and student initialised from independent keys; the student EMA starts at the student. Each network
  gets its optimizer config (`optimizers.create_optimizer`) and the schedules run over `total_steps`."""
  teacher_rng, student_rng = jax.random.split(rng)
  return _mpl_state(init_variables(teacher_rng, teacher_model, input_shape), teacher_model.apply, student_rng,
                    student_model, input_shape, teacher_optimizer=teacher_optimizer,
                    student_optimizer=student_optimizer, total_steps=total_steps)


def reduced_teacher_model(reduced_config, num_classes):
  """T_R (models/reduced_teacher.py) for `num_classes` classes and `reduced_config.hidden_sizes`."""
  return reduced_teacher.ReducedTeacher(num_classes=num_classes, hidden_sizes=tuple(reduced_config.hidden_sizes))


def create_reduced_mpl_state(rng, reduced_config, num_classes, student_model, input_shape, *, teacher_optimizer,
                             student_optimizer, total_steps):
  """Reduced MPL (App. E): T_R in the teacher's place (with the teacher's optimizer), for stored targets of
  `reduced_config.top_k` classes; it starts at the identity on T's distribution. The student as in
  `create_mpl_state`."""
  teacher_rng, student_rng = jax.random.split(rng)
  model = reduced_teacher_model(reduced_config, num_classes)
  return _mpl_state(reduced_teacher.init_variables(teacher_rng, model, reduced_config.top_k), model.apply,
                    student_rng, student_model, input_shape, teacher_optimizer=teacher_optimizer,
                    student_optimizer=student_optimizer, total_steps=total_steps)


def create_supervised_state(rng, model, optimizer_config, input_shape, *, total_steps, keep_ema=True,
                            name='optimizer'):
  """A fresh network trained alone; `keep_ema` keeps an EMA of its variables (evaluated like the MPL student)."""
  network = create_network_state(init_variables(rng, model, input_shape), model.apply, optimizer_config,
                                 total_steps, name)
  ema = jax.tree.map(jnp.copy, network.variables) if keep_ema else None
  return SupervisedState(step=jnp.zeros((), jnp.int32), network=network, ema=ema)
