"""Shrunk configs keep their schedule's shape at any `--config.num_train_steps` (configs/common.py, issue 12)."""

from absl import flags
from ml_collections import config_flags
import pytest

from configs import common
from meta_pseudo_labels.run import config_validation


def parse(*overrides, config='configs/cifar10_4k.py:cpu'):
  """The config main gets from `--config=<config> <overrides>` (the same config_flags parsing, own flag set)."""
  argv = ['main', f'--config={config}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def schedule(config):
  return {'warmup': (config.teacher_optimizer.warmup_steps, config.student_optimizer.warmup_steps),
          'wait': config.student_optimizer.wait_steps, 'uda_ramp': config.uda.ramp_steps,
          'finetune': config.finetune.num_steps, 'eval_every': config.eval_every_steps,
          'checkpoint_every': config.checkpoint_every_steps, 'log_every': config.log_every_steps}


CPU_SHAPE_AT_1000 = {'warmup': (100, 100), 'wait': 100, 'uda_ramp': 200, 'finetune': 100, 'eval_every': 250,
                     'checkpoint_every': 250, 'log_every': 100}


@pytest.mark.parametrize('config', ['configs/cifar10_4k.py:cpu', 'configs/svhn_1k.py:cpu',
                                    'configs/imagenet_10pct.py:cpu'])
def test_cpu_variants_follow_an_overridden_num_train_steps(config):
  assert schedule(parse(config=config)) == {'warmup': (20, 20), 'wait': 20, 'uda_ramp': 40, 'finetune': 20,
                                            'eval_every': 50, 'checkpoint_every': 50, 'log_every': 20}
  overridden = parse('--config.num_train_steps=1000', config=config)
  assert overridden.num_train_steps == 1000
  assert schedule(overridden) == CPU_SHAPE_AT_1000
  config_validation.validate(overridden, 1)
  resolved = overridden.to_dict()   # what train.py writes to config.json and results.json
  assert resolved['uda']['ramp_steps'] == 200 and resolved['finetune']['num_steps'] == 100


def test_a_field_set_on_the_command_line_keeps_its_value_in_either_order():
  for overrides in (['--config.num_train_steps=1000', '--config.uda.ramp_steps=7'],
                    ['--config.uda.ramp_steps=7', '--config.num_train_steps=1000']):
    config = parse(*overrides)
    assert config.uda.ramp_steps == 7
    assert schedule(config) == dict(CPU_SHAPE_AT_1000, uda_ramp=7)


def test_fractions_round_and_never_reach_zero_where_a_step_count_must_be_positive():
  config = parse('--config.num_train_steps=3')
  assert schedule(config) == {'warmup': (0, 0), 'wait': 0, 'uda_ramp': 1, 'finetune': 1, 'eval_every': 1,
                              'checkpoint_every': 1, 'log_every': 1}
  config_validation.validate(config, 1)


def test_paper_configs_keep_the_papers_constants():
  config = parse('--config.num_train_steps=1000', config='configs/cifar10_4k.py')
  assert config.uda.ramp_steps == 5000 and config.student_optimizer.wait_steps == 3000


def test_digits_follows_num_train_steps():
  config = parse('--config.num_train_steps=2000', config='configs/digits.py')
  assert schedule(config) == {'warmup': (200, 200), 'wait': 200, 'uda_ramp': 400, 'finetune': 200,
                              'eval_every': 100, 'checkpoint_every': 1000, 'log_every': 200}
  assert common.CPU_SCHEDULE['uda_ramp'] == 1 / 5
