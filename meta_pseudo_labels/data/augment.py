"""Per-example image augmentations, all stateless: the output is a pure function of (image, seed).

Views used by Meta Pseudo Labels (paper, Sec. 4 and App. C; UDA, Xie et al. 2020):
- weak (labeled batch and the teacher's x_w): random horizontal flip + pad-and-crop (pad 4, reflect);
- strong (x_s): flip + pad-crop, RandAugment (N ops at magnitude M), Cutout, flip + pad-crop again, the order of
  the authors' released CIFAR pipeline;
- digits ('digits': small grey handwritten digits, e.g. scikit-learn's 8x8 ones): no flip (a mirrored 2 is not a 2);
  weak = a shift of up to `pad` pixels over the black background; strong = the weak view, one random rotation of up
  to DIGITS_MAX_ROTATION degrees and shear of up to DIGITS_MAX_SHEAR about the centre, then a Cutout square, both
  filled with the background (a digit stays a digit under small rotations, slants and missing stroke pieces; the
  colour ops of RandAugment mean little on 17 grey levels and Invert/Solarize turn strokes into background);
- ImageNet: Inception-style random resized crop (area 0.08..1, aspect 3/4..4/3) + flip for training (strong adds
  RandAugment), resize + central crop of 87.5% for evaluation.

RandAugment (Cubuk et al. 2019) follows the policy of the authors' release: the op list
AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, Color, Contrast, Brightness, Sharpness, ShearX, ShearY,
TranslateX, TranslateY, Cutout (no explicit Identity: every chosen op is applied only with a per-image probability
p ~ U(0.2, 0.8), so "identity" happens with probability 1 - p), a fixed magnitude M on the 0..10 level scale of the
RandAugment/AutoAugment code, extrapolated linearly past 10. The paper's M = 16 (CIFAR) and 17 (ImageNet) therefore
mean e.g. rotations of 48 / 51 degrees and enhancement factors near 3; at these levels Solarize's threshold is above
255 and it leaves the image unchanged, as in the release. Ops use PIL semantics on uint8 images; geometric ops fill
with grey (128).

Every random choice comes from `tf.random.stateless_*` with seeds split from the one `seed` argument (shape [2],
int32/int64), so a batch can be rebuilt bitwise from (config seed, example position) after a restart.
"""

import math

import tensorflow as tf

FILL_VALUE = 128
DIGITS_MAX_ROTATION = 15.0   # degrees
DIGITS_MAX_SHEAR = 0.2       # x offset per row, about the centre (~11 degrees of slant)
DIGITS_BACKGROUND = 0
_MAX_LEVEL = 10.0
CENTER_CROP_FRACTION = 0.875  # ImageNet evaluation: 224 of 256


def _split(seed, num):
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def _uniform(seed, minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform([], seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _to_uint8(image):
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


# ---- geometric ops --------------------------------------------------------------------------------------------

def _projective(image, transform, fill_value=FILL_VALUE):
  """Warps `image` by an 8-parameter transform mapping output (x, y) to input coordinates; `fill_value` outside."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.reshape(transform, [1, 8]), tf.float32),
      output_shape=tf.stack([height, width]), fill_value=float(fill_value), interpolation='NEAREST',
      fill_mode='CONSTANT')
  return warped[0]


def rotate_and_shear(image, degrees, shear, fill_value=FILL_VALUE):
  """Rotation by `degrees` after an x-shear of `shear`, both about the image centre."""
  radians = degrees * (math.pi / 180.0)
  cx = (tf.cast(tf.shape(image)[1], tf.float32) - 1.0) / 2.0
  cy = (tf.cast(tf.shape(image)[0], tf.float32) - 1.0) / 2.0
  cos, sin = tf.cos(radians), tf.sin(radians)
  a, b, c, d = cos, cos * shear - sin, sin, sin * shear + cos   # output -> input: rotation @ shear
  return _projective(image, tf.stack([a, b, cx - a * cx - b * cy, c, d, cy - c * cx - d * cy, 0.0, 0.0]),
                     fill_value)


def rotate(image, degrees):
  return rotate_and_shear(image, degrees, 0.0)


def shear_x(image, level):
  return _projective(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image, level):
  return _projective(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0]))


def translate_x(image, pixels):
  return _projective(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image, pixels):
  return _projective(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0]))


def cutout(image, size, seed, fill_value=FILL_VALUE):
  """Fills a size x size square (clipped at the border) centred uniformly in the image (DeVries 2017)."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  seed_y, seed_x = _split(seed, 2)
  cy = tf.random.stateless_uniform([], seed_y, minval=0, maxval=height, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], seed_x, minval=0, maxval=width, dtype=tf.int32)
  half = size // 2
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = (rows >= cy - half) & (rows < cy - half + size) & (cols >= cx - half) & (cols < cx - half + size)
  return tf.where(inside[:, :, None], tf.constant(fill_value, image.dtype), image)


# ---- colour ops (PIL semantics) -------------------------------------------------------------------------------

def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped to uint8."""
  degenerate = tf.cast(degenerate, tf.float32)
  return _to_uint8(degenerate + factor * (tf.cast(image, tf.float32) - degenerate))


def _grayscale(image):
  return tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))


def color(image, factor):
  return _blend(tf.image.grayscale_to_rgb(_grayscale(image)), image, factor)


def contrast(image, factor):
  return _blend(tf.fill(tf.shape(image), tf.reduce_mean(_grayscale(image))), image, factor)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blends with PIL's SMOOTH-filtered image (borders keep the original pixels)."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.cast(_to_uint8(smooth), tf.float32)
  interior = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior > 0, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), tf.cast(image, tf.float32))
  return _blend(degenerate, image, factor)


def autocontrast(image):
  """Stretches each channel linearly to [0, 255]; constant channels are left alone."""
  image_f = tf.cast(image, tf.float32)
  lo = tf.reduce_min(image_f, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image_f, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, lo, 0.0)
  return _to_uint8((image_f - offset) * scale)


def equalize(image):
  """PIL ImageOps.equalize per channel: a lookup table from the cumulative histogram."""
  def channel(values):
    values = tf.cast(values, tf.int32)
    histogram = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    last_nonzero = tf.gather(histogram, tf.reduce_max(tf.where(histogram > 0)))
    step = (tf.reduce_sum(histogram) - last_nonzero) // 255
    safe_step = tf.maximum(step, 1)
    lut = (tf.cumsum(histogram) + safe_step // 2) // safe_step
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.where(step > 0, tf.gather(lut, values), values)
  return tf.cast(tf.stack([channel(image[:, :, c]) for c in range(3)], axis=-1), tf.uint8)


def invert(image):
  return 255 - image


def posterize(image, bits):
  shift = tf.cast(8 - bits, tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, threshold):
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


# ---- RandAugment ----------------------------------------------------------------------------------------------

RANDAUGMENT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast',
                   'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout')


def _op_branches(image, magnitude, sign, seed, translate_const, cutout_const):
  """One zero-argument callable per RANDAUGMENT_OPS entry, its argument set by the level `magnitude`."""
  level = magnitude / _MAX_LEVEL
  enhance = level * 1.8 + 0.1
  posterize_bits = min(8, max(1, int(level * 4)))
  cutout_size = 2 * int(level * cutout_const)
  ops = {
      'AutoContrast': lambda: autocontrast(image),
      'Equalize': lambda: equalize(image),
      'Invert': lambda: invert(image),
      'Rotate': lambda: rotate(image, sign * level * 30.0),
      'Posterize': lambda: posterize(image, posterize_bits),
      'Solarize': lambda: solarize(image, int(level * 256)),
      'Color': lambda: color(image, enhance),
      'Contrast': lambda: contrast(image, enhance),
      'Brightness': lambda: brightness(image, enhance),
      'Sharpness': lambda: sharpness(image, enhance),
      'ShearX': lambda: shear_x(image, sign * level * 0.3),
      'ShearY': lambda: shear_y(image, sign * level * 0.3),
      'TranslateX': lambda: translate_x(image, sign * level * translate_const),
      'TranslateY': lambda: translate_y(image, sign * level * translate_const),
      'Cutout': lambda: cutout(image, cutout_size, seed),
  }
  return [ops[name] for name in RANDAUGMENT_OPS]


def randaugment(image, seed, *, num_ops, magnitude, translate_const, cutout_const):
  """Applies `num_ops` ops drawn uniformly from RANDAUGMENT_OPS, each with probability p ~ U(0.2, 0.8)."""
  static_shape = image.shape
  seeds = _split(seed, num_ops + 1)
  apply_prob = _uniform(seeds[0], 0.2, 0.8)
  for layer_seed in seeds[1:]:
    op_seed, apply_seed, sign_seed, op_random_seed = _split(layer_seed, 4)
    op_index = tf.random.stateless_uniform([], op_seed, minval=0, maxval=len(RANDAUGMENT_OPS), dtype=tf.int32)
    sign = tf.where(_uniform(sign_seed) < 0.5, -1.0, 1.0)
    branches = _op_branches(image, float(magnitude), sign, op_random_seed, float(translate_const),
                            float(cutout_const))
    augmented = tf.switch_case(op_index, branches)
    image = tf.where(_uniform(apply_seed) < apply_prob, augmented, image)
    image.set_shape(static_shape)
  return image


# ---- views ----------------------------------------------------------------------------------------------------

def flip_and_pad_crop(image, seed, pad):
  """Random horizontal flip, then reflect-pad by `pad` and crop back to the original size at a random offset."""
  flip_seed, crop_seed = _split(seed, 2)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if pad:
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode='REFLECT')
    image = tf.image.stateless_random_crop(padded, tf.shape(image), crop_seed)
  return image


def shift_over_background(image, seed, pad):
  """A random shift of up to `pad` pixels each way, the uncovered border filled with the digits' background."""
  if not pad:
    return image
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], constant_values=DIGITS_BACKGROUND)
  return tf.image.stateless_random_crop(padded, tf.shape(image), seed)


def inception_crop(image, seed, size):
  """Random resized crop (Szegedy et al. 2015): area 8%..100%, aspect 3/4..4/3, resized to size x size."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  return _to_uint8(tf.image.resize(crop, [size, size], method='bicubic'))


def center_crop(image, size, fraction=CENTER_CROP_FRACTION):
  """Central square crop of `fraction` of the shorter side, resized to size x size (ImageNet evaluation)."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  crop = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  top, left = (height - crop + 1) // 2, (width - crop + 1) // 2
  return _to_uint8(tf.image.resize(image[top:top + crop, left:left + crop], [size, size], method='bicubic'))


def resize_shorter_and_center_crop(image, size):
  """Resizes the shorter side to `size` and crops the central size x size square (no zoom)."""
  return center_crop(image, size, fraction=1.0)


def weak_view(image, seed, *, kind, image_size, pad):
  """The weak view: flip + pad-crop ('cifar'), a shift ('digits'), inception crop + flip ('imagenet'), unchanged
  ('none')."""
  if kind == 'cifar':
    return flip_and_pad_crop(image, seed, pad)
  if kind == 'digits':
    return shift_over_background(image, seed, pad)
  if kind == 'imagenet':
    crop_seed, flip_seed = _split(seed, 2)
    return tf.image.stateless_random_flip_left_right(inception_crop(image, crop_seed, image_size), flip_seed)
  return image


def strong_view(image, seed, *, kind, image_size, pad, num_ops, magnitude, cutout_size):
  """The strong view x_s: the weak view, RandAugment, then (CIFAR) Cutout and a second flip + pad-crop; for
  'digits' the weak view, a rotation + shear and Cutout (module docstring)."""
  weak_seed, ra_seed, cutout_seed, second_seed = _split(seed, 4)
  if kind == 'none':
    return image
  image = weak_view(image, weak_seed, kind=kind, image_size=image_size, pad=pad)
  if kind == 'digits':
    rotation_seed, shear_seed = _split(ra_seed, 2)
    image = rotate_and_shear(image, _uniform(rotation_seed, -DIGITS_MAX_ROTATION, DIGITS_MAX_ROTATION),
                             _uniform(shear_seed, -DIGITS_MAX_SHEAR, DIGITS_MAX_SHEAR), DIGITS_BACKGROUND)
    return cutout(image, cutout_size, cutout_seed, DIGITS_BACKGROUND) if cutout_size else image
  if kind == 'cifar':
    image = randaugment(image, ra_seed, num_ops=num_ops, magnitude=magnitude, translate_const=image_size // 8,
                        cutout_const=image_size // 8)
    if cutout_size:
      image = cutout(image, cutout_size, cutout_seed)
    return flip_and_pad_crop(image, second_seed, pad)
  # ImageNet: the release's constants (translate 100 px, cutout 40 px at 224 px), scaled to the image size.
  return randaugment(image, ra_seed, num_ops=num_ops, magnitude=magnitude,
                     translate_const=100 * image_size / 224, cutout_const=40 * image_size / 224)


def eval_view(image, *, kind, image_size):
  """No randomness: the stored image ('cifar', 'none') or the 87.5% central crop ('imagenet')."""
  if kind == 'imagenet':
    return center_crop(image, image_size)
  return image
