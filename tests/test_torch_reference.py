"""The PyTorch reference of the MPL step has the project's model shapes and runs the step it claims (torch optional)."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import cifar10_4k
from meta_pseudo_labels import models
from meta_pseudo_labels import torch_reference
from meta_pseudo_labels.execution import workload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not torch_reference.available(),
                                reason='torch is not installed (the optional extra: pip install .[bench])')


def _config(name='wrn10_1', batch=2, mu=1, side=8):
  config = cifar10_4k.get_config()
  config.model.name = name
  config.batch_size, config.uda_ratio = batch, mu
  config.dataset.image_size = side
  return config


@pytest.mark.parametrize('name', ['wrn10_1', 'wrn28_2'])
def test_same_parameter_shapes_as_the_flax_model(name):
  torch_model = torch_reference.wide_resnet(int(name[3:].split('_')[0]), int(name.split('_')[1]), 10,
                                            bn_momentum=0.99, dropout_rate=0.2)
  flax_model = models.create_model(_config(name).model, 10)
  variables = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)), train=False))
  flax_sizes = sorted(leaf.size for leaf in jax.tree.leaves(variables['params']))
  torch_sizes = sorted(p.numel() for p in torch_model.parameters())
  assert torch_sizes == flax_sizes            # the same layers, kernel for kernel (WRN-28-2: 1.47 M)


def test_one_step_updates_both_networks_and_leaves_the_feedback_statistics_alone():
  import torch  # pylint: disable=g-import-not-at-top
  config = _config()
  step = torch_reference.MplStep(config, jax.device_get(workload.synthetic_batch(config)), 'cpu')
  teacher_before = [p.detach().clone() for p in step.teacher.parameters()]
  student_before = [p.detach().clone() for p in step.student.parameters()]
  stats = [b.clone() for b in step.student.buffers()]
  step._labeled_loss(seed=1)    # the feedback's forwards: batch statistics used, running statistics untouched
  assert all(torch.equal(a, b) for a, b in zip(stats, step.student.buffers()))
  assert step._labeled_loss(seed=1) == step._labeled_loss(seed=1)   # same dropout mask on both sides of h
  loss = step(0)
  assert np.isfinite(float(loss.detach()))
  assert any(not torch.equal(a, b) for a, b in zip(teacher_before, step.teacher.parameters()))
  assert any(not torch.equal(a, b) for a, b in zip(student_before, step.student.parameters()))


def test_device_follows_the_jax_backend():
  assert torch_reference.device_for('cpu') == 'cpu'
  assert torch_reference.device_for('tpu') == 'cpu'


def test_the_step_runs_in_a_process_that_loaded_tensorflow_first():
  """A test worker that ran TensorFlow tests before: torch's first optimizer step there used to kill the process
  (triton loading after TensorFlow); the same step, in a fresh process that imports TensorFlow first."""
  program = textwrap.dedent('''
      import sys, tensorflow, jax
      sys.path.insert(0, 'tests')
      from test_torch_reference import _config
      from meta_pseudo_labels import torch_reference
      from meta_pseudo_labels.execution import workload
      config = _config()
      step = torch_reference.MplStep(config, jax.device_get(workload.synthetic_batch(config)), 'cpu')
      print('loss', float(step(0).detach()))
  ''')
  process = subprocess.run([sys.executable, '-c', program], cwd=REPO, capture_output=True, text=True, timeout=300,
                           check=False, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'JAX_PLATFORMS': 'cpu'})
  assert process.returncode == 0, f'exit {process.returncode}\n{process.stderr[-3000:]}'
  assert np.isfinite(float(process.stdout.split('loss')[-1]))
