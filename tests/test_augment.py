"""augment.py: PIL-faithful colour ops, geometry, view shapes/dtypes/ranges, and determinism given the seed."""

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from meta_pseudo_labels.data import augment


def _image(seed=0, shape=(32, 32, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def _smooth_image(shape=(32, 32, 3)):
  """A low-contrast gradient (values 60..190), where contrast/equalize/autocontrast have visible effects."""
  rows = np.linspace(60, 190, shape[0])[:, None, None]
  cols = np.linspace(0, 20, shape[1])[None, :, None]
  return np.broadcast_to(rows + cols * np.arange(1, 4) / 3, shape).round().astype(np.uint8)


def _seed(a, b=0):
  return tf.constant([a, b], tf.int64)


@pytest.mark.parametrize('factor', [0.3, 1.7, 2.98])
@pytest.mark.parametrize('name', ['Color', 'Brightness', 'Sharpness', 'Contrast'])
def test_enhance_ops_match_pil(name, factor):
  image = _smooth_image() if name == 'Contrast' else _image(1)
  ours = {'Color': augment.color, 'Brightness': augment.brightness, 'Sharpness': augment.sharpness,
          'Contrast': augment.contrast}[name](tf.constant(image), factor).numpy()
  pil = np.asarray(getattr(ImageEnhance, name)(Image.fromarray(image)).enhance(factor))
  # PIL truncates its integer grey levels and blends; we round from float: off by at most a level or two.
  difference = np.abs(ours.astype(int) - pil.astype(int))
  assert difference.max() <= 2 and difference.mean() < 0.75


@pytest.mark.parametrize('name', ['autocontrast', 'equalize', 'invert'])
def test_pointwise_ops_match_pil(name):
  image = _smooth_image()
  ours = getattr(augment, name)(tf.constant(image)).numpy()
  pil = np.asarray(getattr(ImageOps, name)(Image.fromarray(image)))
  assert np.abs(ours.astype(int) - pil.astype(int)).max() <= 1
  assert not np.array_equal(ours, image)


def test_posterize_and_solarize_match_pil():
  image = _image(2)
  np.testing.assert_array_equal(augment.posterize(tf.constant(image), 3).numpy(),
                                np.asarray(ImageOps.posterize(Image.fromarray(image), 3)))
  np.testing.assert_array_equal(augment.solarize(tf.constant(image), 100).numpy(),
                                np.asarray(ImageOps.solarize(Image.fromarray(image), 100)))
  # The release's level scale puts Solarize's threshold above 255 from M = 10: the image is unchanged.
  np.testing.assert_array_equal(augment.solarize(tf.constant(image), int(1.6 * 256)).numpy(), image)


def test_geometric_ops_move_pixels_as_expected():
  image = np.zeros((9, 9, 3), np.uint8)
  image[4, 6] = 255  # right of the centre
  moved = augment.translate_x(tf.constant(image), 2.0).numpy()  # content moves left by 2
  assert moved[4, 4, 0] == 255 and moved[4, 6, 0] != 255
  assert (moved[:, -2:] == augment.FILL_VALUE).all()  # uncovered pixels are grey
  rotated = augment.rotate(tf.constant(image), 90.0).numpy()
  bright = np.argwhere(rotated[:, :, 0] == 255)
  assert len(bright) == 1 and tuple(bright[0]) in {(2, 4), (6, 4)}  # a quarter turn about the centre
  sheared = augment.shear_x(tf.constant(image), 0.0).numpy()
  np.testing.assert_array_equal(sheared, image)


def test_cutout_fills_a_grey_square():
  image = np.zeros((32, 32, 3), np.uint8)
  out = augment.cutout(tf.constant(image), 16, _seed(3)).numpy()
  grey = np.argwhere((out == augment.FILL_VALUE).all(-1))
  assert 0 < len(grey) <= 16 * 16
  rows, cols = grey[:, 0], grey[:, 1]
  assert len(grey) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a (clipped) rectangle


def test_every_randaugment_op_keeps_shape_and_dtype():
  image = tf.constant(_image(4))
  branches = augment._op_branches(image, 16.0, -1.0, _seed(5), 4.0, 4.0)
  assert len(branches) == len(augment.RANDAUGMENT_OPS) == 15
  changed = 0
  for name, branch in zip(augment.RANDAUGMENT_OPS, branches):
    out = branch()
    assert out.dtype == tf.uint8 and out.shape == image.shape, name
    changed += not np.array_equal(out.numpy(), image.numpy())
  assert changed >= 12  # all but AutoContrast/Solarize (no-ops on a full-range image at M=16) and rare ties


def _strong(image, seed):
  return augment.strong_view(image, seed, kind='cifar', image_size=32, pad=4, num_ops=2, magnitude=16,
                             cutout_size=16)


def test_views_are_deterministic_given_the_seed_and_vary_with_it():
  image = tf.constant(_image(6))
  for view in (lambda s: augment.weak_view(image, s, kind='cifar', image_size=32, pad=4),
               lambda s: _strong(image, s)):
    first, again, other = view(_seed(7, 1)).numpy(), view(_seed(7, 1)).numpy(), view(_seed(7, 2)).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)


def test_strong_views_differ_from_weak_views_in_distribution():
  image = tf.constant(_smooth_image())
  weak = np.stack([augment.weak_view(image, _seed(i), kind='cifar', image_size=32, pad=4).numpy()
                   for i in range(16)]).astype(float)
  strong = np.stack([_strong(image, _seed(i)).numpy() for i in range(16)]).astype(float)
  original = _smooth_image().astype(float)
  assert np.abs(strong - original).mean() > 2 * np.abs(weak - original).mean()


def test_weak_view_is_a_flip_and_shift_of_the_reflect_padded_image():
  image = _image(8)
  out = augment.flip_and_pad_crop(tf.constant(image), _seed(9), 4).numpy()
  padded = [np.pad(im, ((4, 4), (4, 4), (0, 0)), mode='reflect') for im in (image, image[:, ::-1])]
  assert any(np.array_equal(out, p[dy:dy + 32, dx:dx + 32]) for p in padded for dy in range(9) for dx in range(9))


def test_imagenet_views_shapes_and_center_crop():
  image = tf.constant(_image(10, (60, 90, 3)))
  weak = augment.weak_view(image, _seed(1), kind='imagenet', image_size=24, pad=0)
  strong = augment.strong_view(image, _seed(1), kind='imagenet', image_size=24, pad=0, num_ops=2, magnitude=17,
                               cutout_size=0)
  evaluated = augment.eval_view(image, kind='imagenet', image_size=24)
  for out in (weak, strong, evaluated):
    assert out.shape == (24, 24, 3) and out.dtype == tf.uint8
  np.testing.assert_array_equal(evaluated.numpy(), augment.eval_view(image, kind='imagenet', image_size=24).numpy())
  # Centre crop of 87.5% of the shorter side: a constant-colour centre stays exactly that colour.
  framed = np.zeros((64, 64, 3), np.uint8)
  framed[4:60, 4:60] = 200
  np.testing.assert_array_equal(augment.center_crop(tf.constant(framed), 16).numpy(), np.full((16, 16, 3), 200))


def test_none_views_are_identity():
  image = tf.constant(_image(11))
  assert np.array_equal(augment.strong_view(image, _seed(1), kind='none', image_size=32, pad=4, num_ops=2,
                                            magnitude=16, cutout_size=16).numpy(), image.numpy())
  assert np.array_equal(augment.weak_view(image, _seed(1), kind='none', image_size=32, pad=4).numpy(),
                        image.numpy())


def _digit():
  """An asymmetric 8x8 'digit': a vertical stroke with a foot to the right, on the black background."""
  image = np.zeros((8, 8, 3), np.uint8)
  image[1:7, 3] = 255
  image[6, 3:6] = 255
  return image


def test_digits_weak_view_is_a_shift_over_the_background_never_a_flip():
  image = _digit()
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
  shifts = [padded[dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
  mirrored = image[:, ::-1]
  for i in range(20):
    out = augment.weak_view(tf.constant(image), _seed(i), kind='digits', image_size=8, pad=1).numpy()
    assert any(np.array_equal(out, shift) for shift in shifts)
    assert not any(np.array_equal(out, np.pad(mirrored, ((1, 1), (1, 1), (0, 0)))[dy:dy + 8, dx:dx + 8])
                   for dy in range(3) for dx in range(3))


def test_digits_strong_view_rotates_shears_and_cuts_out_with_the_background():
  image = tf.constant(_digit())
  views = [augment.strong_view(image, _seed(i), kind='digits', image_size=8, pad=1, num_ops=2, magnitude=16,
                               cutout_size=3).numpy() for i in range(16)]
  np.testing.assert_array_equal(views[0], augment.strong_view(image, _seed(0), kind='digits', image_size=8, pad=1,
                                                              num_ops=2, magnitude=16, cutout_size=3).numpy())
  for view in views:
    assert view.shape == (8, 8, 3) and view.dtype == np.uint8
    assert set(np.unique(view)) <= {0, 255}   # nearest-neighbour warp, background fill: no grey appears
  weak = [augment.weak_view(image, _seed(i), kind='digits', image_size=8, pad=1).numpy() for i in range(16)]
  assert sum(not any(np.array_equal(v, w) for w in weak) for v in views) >= 12   # not only a shift
  # A rotation by 90 degrees about the centre (counter-clockwise, as PIL) turns the stroke horizontal.
  rotated = augment.rotate_and_shear(image, 90.0, 0.0, fill_value=0).numpy()
  np.testing.assert_array_equal(rotated[..., 0], np.rot90(_digit()[..., 0], k=1))
