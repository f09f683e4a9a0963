"""augment.py: every op against PIL on real images at several levels, RandAugment's choice distributions, the views'
shapes and determinism, and the views of a batch before and after a resume.

Tolerances, in grey levels (uint8), on scikit-learn's digits upscaled to 32x32 and coloured (three different
channels) plus a random texture:
- colour and pointwise ops (Color, Contrast, Brightness, Sharpness, AutoContrast, Equalize, Invert, Posterize,
  Solarize): equal to PIL, max abs difference 0 (AutoContrast reproduces PIL's double-precision truncation);
- affine ops (Rotate, ShearX/Y, TranslateX/Y): the same nearest-pixel rule as PIL, in float32 where PIL computes in
  double, so a pixel centre that falls within ~1e-6 of an input pixel's edge may take its neighbour: at most 0.5% of
  the pixels differ (measured: 0 for shears and translations, 1 pixel in 1024 for some rotations).
"""

import jax
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest

from meta_pseudo_labels.data import augment
from meta_pseudo_labels.data import input_pipeline

GREY = (augment.FILL_VALUE,) * 3
LEVELS = (1.0, 5.0, 10.0, 16.0, 17.0)   # RandAugment magnitudes: low, mid, max of the 0..10 scale, the paper's M


def _real_images():
  """Four digits (scikit-learn's bundled 8x8 ones) upscaled to 32x32 by PIL, three different channels each, and
  a random texture."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits().images[[0, 7, 13, 42]]
  rng = np.random.default_rng(0)
  images = []
  for digit in digits:
    grey = np.asarray(Image.fromarray(np.round(digit * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC))
    noisy = np.clip(grey.astype(int) + rng.integers(0, 60, grey.shape), 0, 255)
    images.append(np.stack([grey, noisy, 255 - grey // 2], -1).astype(np.uint8))
  images.append(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8))
  return images


def _key(i):
  return jax.random.key(i)


def _max_difference(ours, pil):
  return int(np.abs(np.asarray(ours).astype(int) - np.asarray(pil).astype(int)).max())


def _differing_fraction(ours, pil):
  return float(np.mean(np.any(np.asarray(ours) != np.asarray(pil), axis=-1)))


# ---- each op against PIL --------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['Color', 'Contrast', 'Brightness', 'Sharpness'])
def test_enhance_ops_equal_pil_at_every_level(name):
  op = getattr(augment, name.lower())
  for magnitude in (0.0,) + LEVELS:
    factor = magnitude / 10 * 1.8 + 0.1   # the release's enhancement factor of level M
    for image in _real_images():
      pil = getattr(ImageEnhance, name)(Image.fromarray(image)).enhance(factor)
      assert _max_difference(op(image, factor), pil) == 0, (name, magnitude)


@pytest.mark.parametrize('name', ['autocontrast', 'equalize', 'invert'])
def test_pointwise_ops_equal_pil(name):
  for image in _real_images() + [np.full((8, 8, 3), 77, np.uint8)]:   # and a constant image (left unchanged)
    assert _max_difference(getattr(augment, name)(image), getattr(ImageOps, name)(Image.fromarray(image))) == 0


def test_posterize_and_solarize_equal_pil_at_every_level():
  for image in _real_images():
    for magnitude in LEVELS:
      bits = min(8, max(1, int(magnitude / 10 * 4)))
      assert _max_difference(augment.posterize(image, bits), ImageOps.posterize(Image.fromarray(image), bits)) == 0
    for threshold in (0, 50, 128, 255):
      assert _max_difference(augment.solarize(image, threshold),
                             ImageOps.solarize(Image.fromarray(image), threshold)) == 0
    # The release's level scale puts Solarize's threshold above 255 from M = 10: the image is unchanged.
    np.testing.assert_array_equal(augment.solarize(image, int(1.6 * 256)), image)


@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_affine_ops_match_pil_at_every_level(sign):
  worst = 0.0
  for magnitude in LEVELS:
    level = magnitude / 10
    for image in _real_images():
      pil = Image.fromarray(image)
      cases = [
          (augment.rotate(image, sign * level * 30), pil.rotate(sign * level * 30, fillcolor=GREY)),
          (augment.shear_x(image, sign * level * 0.3),
           pil.transform(pil.size, Image.AFFINE, (1, sign * level * 0.3, 0, 0, 1, 0), fillcolor=GREY)),
          (augment.shear_y(image, sign * level * 0.3),
           pil.transform(pil.size, Image.AFFINE, (1, 0, 0, sign * level * 0.3, 1, 0), fillcolor=GREY)),
          (augment.translate_x(image, sign * level * 4),
           pil.transform(pil.size, Image.AFFINE, (1, 0, sign * level * 4, 0, 1, 0), fillcolor=GREY)),
          (augment.translate_y(image, sign * level * 4),
           pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, sign * level * 4), fillcolor=GREY)),
      ]
      worst = max(worst, *(_differing_fraction(ours, theirs) for ours, theirs in cases))
  assert worst <= 0.005


def test_cutout_fills_a_grey_square():
  image = np.zeros((32, 32, 3), np.uint8)
  out = np.asarray(augment.cutout(image, 16, _key(3)))
  grey = np.argwhere((out == augment.FILL_VALUE).all(-1))
  assert 0 < len(grey) <= 16 * 16
  rows, cols = grey[:, 0], grey[:, 1]
  assert len(grey) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a (clipped) rectangle


# ---- RandAugment's choices ------------------------------------------------------------------------------------

def test_randaugment_choice_distributions():
  """Ops uniform over the 15, each applied with a per-image p ~ U(0.2, 0.8), signs +-1 with 1/2 each."""
  count = 20000
  keys = jax.random.split(_key(0), count)
  ops, applied, signs, _ = jax.vmap(lambda k: augment.randaugment_choices(k, 2))(keys)
  ops, applied, signs = np.asarray(ops), np.asarray(applied), np.asarray(signs)
  frequencies = np.bincount(ops.ravel(), minlength=15) / ops.size
  assert len(frequencies) == len(augment.RANDAUGMENT_OPS) == 15
  # binomial standard error of 1/15 over 40000 draws: 0.00125; 5 of them
  np.testing.assert_allclose(frequencies, 1 / 15, atol=0.00625)
  assert abs(applied.mean() - 0.5) < 0.01                      # E[p] = 0.5
  assert abs(applied.all(axis=1).mean() - 0.28) < 0.015        # both applied: E[p^2] = 0.25 + 0.6^2 / 12 = 0.28
  assert abs((signs > 0).mean() - 0.5) < 0.01
  assert abs(np.corrcoef(ops[:, 0], ops[:, 1])[0, 1]) < 0.03   # the two layers choose independently


def test_randaugment_applies_its_choices_in_order():
  image = _real_images()[1]
  branches = [jax.jit(branch) for branch in augment.op_branches(16.0, 4.0, 4.0)]
  randaugment = jax.jit(lambda key: augment.randaugment(image, key, num_ops=2, magnitude=16, translate_const=4,
                                                        cutout_const=4))
  for i in range(6):
    ops, applied, signs, keys = augment.randaugment_choices(_key(i), 2)
    expected = image
    for j in range(2):
      if applied[j]:
        expected = branches[int(ops[j])](expected, signs[j], keys[j])
    np.testing.assert_array_equal(randaugment(_key(i)), expected)


def test_every_randaugment_op_keeps_shape_and_dtype():
  image = _real_images()[4]
  changed = 0
  for name, branch in zip(augment.RANDAUGMENT_OPS, augment.op_branches(16.0, 4.0, 4.0)):
    out = jax.jit(branch)(image, -1.0, _key(5))
    assert out.dtype == np.uint8 and out.shape == image.shape, name
    changed += not np.array_equal(out, image)
  assert changed >= 12  # all but AutoContrast/Solarize (no-ops on a full-range image at M=16) and rare ties


# ---- views ----------------------------------------------------------------------------------------------------

def _strong(image, key):
  return augment.strong_view(image, key, kind='cifar', image_size=32, pad=4, num_ops=2, magnitude=16,
                             cutout_size=16)


def test_views_are_deterministic_given_the_key_and_vary_with_it():
  image = _real_images()[4]
  for view in (lambda k: augment.weak_view(image, k, kind='cifar', image_size=32, pad=4), lambda k: _strong(image, k)):
    view = jax.jit(view)
    first, again, other = view(_key(7)), view(_key(7)), view(_key(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)


def test_vmapped_views_equal_the_per_example_views():
  views = input_pipeline.Views(kind='cifar', image_size=32, pad=4, num_ops=2, magnitude=16.0, cutout_size=16,
                               mean=(0.0,) * 3, std=(1.0,) * 3)
  images = np.stack(_real_images())
  batch = jax.jit(views.of_batch, static_argnums=0)('strong', images, _key(3))
  for r, image in enumerate(images):
    np.testing.assert_array_equal(batch[r], _strong(image, jax.random.fold_in(_key(3), r)).astype(np.float32))


def test_strong_views_differ_from_weak_views_in_distribution():
  rows = np.linspace(60, 190, 32)[:, None, None]   # a smooth low-contrast gradient: shifts barely change it
  image = np.broadcast_to(rows + np.linspace(0, 20, 32)[None, :, None] * np.arange(1, 4) / 3,
                          (32, 32, 3)).round().astype(np.uint8)
  keys = jax.random.split(_key(1), 16)
  weak = np.asarray(jax.vmap(lambda k: augment.weak_view(image, k, kind='cifar', image_size=32, pad=4))(keys))
  strong = np.asarray(jax.vmap(lambda k: _strong(image, k))(keys))
  assert np.abs(strong.astype(float) - image).mean() > 1.5 * np.abs(weak.astype(float) - image).mean()


def test_weak_view_is_a_flip_and_shift_of_the_reflect_padded_image():
  image = _real_images()[4]
  padded = [np.pad(im, ((4, 4), (4, 4), (0, 0)), mode='reflect') for im in (image, image[:, ::-1])]
  for i in range(4):
    out = np.asarray(augment.flip_and_pad_crop(image, _key(i), 4))
    assert any(np.array_equal(out, p[dy:dy + 32, dx:dx + 32]) for p in padded for dy in range(9) for dx in range(9))


def test_imagenet_views_shapes_and_center_crop():
  stored = augment.stored_size('imagenet', 24)
  assert stored == 27 and augment.stored_size('imagenet', 224) == 256
  image = np.random.default_rng(10).integers(0, 256, (stored, stored, 3)).astype(np.uint8)
  weak = jax.jit(lambda k: augment.weak_view(image, k, kind='imagenet', image_size=24, pad=0))(_key(1))
  strong = augment.strong_view(image, _key(1), kind='imagenet', image_size=24, pad=0, num_ops=2, magnitude=17,
                               cutout_size=0)
  evaluated = augment.eval_view(image, kind='imagenet', image_size=24)
  for out in (weak, strong, evaluated):
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(evaluated, image[1:25, 1:25])
  # The crop is resized, not only cut: a constant image stays constant, an inception crop of a gradient varies.
  np.testing.assert_array_equal(augment.inception_crop(np.full((27, 27, 3), 90, np.uint8), _key(2), 24), 90)


def test_none_views_are_identity():
  image = _real_images()[4]
  assert np.array_equal(augment.strong_view(image, _key(1), kind='none', image_size=32, pad=4, num_ops=2,
                                            magnitude=16, cutout_size=16), image)
  assert np.array_equal(augment.weak_view(image, _key(1), kind='none', image_size=32, pad=4), image)


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
  mirrored = np.pad(image[:, ::-1], ((1, 1), (1, 1), (0, 0)))
  for i in range(20):
    out = np.asarray(augment.weak_view(image, _key(i), kind='digits', image_size=8, pad=1))
    assert any(np.array_equal(out, shift) for shift in shifts)
    assert not any(np.array_equal(out, mirrored[dy:dy + 8, dx:dx + 8]) for dy in range(3) for dx in range(3))


def test_digits_strong_view_rotates_shears_and_cuts_out_with_the_background():
  image = _digit()
  strong = jax.jit(lambda k: augment.strong_view(image, k, kind='digits', image_size=8, pad=1, num_ops=2,
                                                 magnitude=16, cutout_size=3))
  views = [np.asarray(strong(_key(i))) for i in range(16)]
  np.testing.assert_array_equal(views[0], strong(_key(0)))
  for view in views:
    assert view.shape == (8, 8, 3) and view.dtype == np.uint8
    assert set(np.unique(view)) <= {0, 255}   # nearest-neighbour warp, background fill: no grey appears
  weak = [np.asarray(augment.weak_view(image, _key(i), kind='digits', image_size=8, pad=1)) for i in range(16)]
  assert sum(not any(np.array_equal(v, w) for w in weak) for v in views) >= 12   # not only a shift
  # A rotation by 90 degrees about the centre (counter-clockwise, as PIL) turns the stroke horizontal.
  rotated = np.asarray(augment.rotate_and_shear(image, 90.0, 0.0, fill_value=0))
  np.testing.assert_array_equal(rotated[..., 0], np.rot90(_digit()[..., 0], k=1))
  np.testing.assert_array_equal(rotated, Image.fromarray(image).rotate(90, fillcolor=(0, 0, 0)))


# ---- the views of a batch, before and after a resume ----------------------------------------------------------

def test_views_of_a_batch_are_the_same_after_a_resume():
  """The views are made from (host batch of step s, fold_in(rng, s)): a restarted pipeline at step s makes exactly
  the uninterrupted run's views."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_base_config()
  config.batch_size, config.uda_ratio, config.eval_batch_size = 4, 3, 8
  config.dataset.update(source='digits', num_classes=10, image_size=8, augment='digits', pad_crop=1, cutout_size=3,
                        num_labeled=20, num_validation=10)
  rng = jax.random.key(config.seed)

  def create():
    return input_pipeline.create(config.dataset, input_pipeline.BatchSpec.from_config(config), seed=config.seed)

  pipeline = create()
  make = jax.jit(lambda batch, step: input_pipeline.model_batch(pipeline.views, batch,
                                                                input_pipeline.step_views_key(rng, step)))
  batches = pipeline.mpl_batches(0)
  run = [make(next(batches), step) for step in range(4)]
  resumed = create()   # a restarted process, resuming at step 3
  again = make(next(resumed.mpl_batches(3)), 3)
  for key in run[3]:
    np.testing.assert_array_equal(again[key], run[3][key], err_msg=key)
  assert not np.array_equal(run[2]['unlabeled_strong'], run[3]['unlabeled_strong'])
