"""The TwoMoon toy data set of the paper's Sec. 3.1 (pure numpy, no TensorFlow)."""

import numpy as np


def make_two_moons(num_points=2000, noise=0.1, seed=0):
  """Two interleaving half circles, num_points // 2 per moon (the paper uses 2000 points, 1000 per moon).

  Moon 0 is the upper half of the unit circle, moon 1 the lower half shifted to (1, 0.5); points are spread evenly
  along each arc, perturbed by isotropic Gaussian noise of std `noise`, and returned in a seeded random order.

  Returns:
    x: float32 [num_points, 2]; y: int32 [num_points], the moon of each point.
  """
  if num_points < 2:
    raise ValueError(f'num_points must be at least 2, got {num_points}')
  rng = np.random.default_rng(seed)
  num_first = num_points // 2
  num_second = num_points - num_first
  angle_first = np.linspace(0.0, np.pi, num_first)
  angle_second = np.linspace(0.0, np.pi, num_second)
  first = np.stack([np.cos(angle_first), np.sin(angle_first)], axis=1)
  second = np.stack([1.0 - np.cos(angle_second), 0.5 - np.sin(angle_second)], axis=1)
  x = np.concatenate([first, second]) + noise * rng.standard_normal((num_points, 2))
  y = np.concatenate([np.zeros(num_first, np.int32), np.ones(num_second, np.int32)])
  order = rng.permutation(num_points)
  return x[order].astype(np.float32), y[order]
