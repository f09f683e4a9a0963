"""Per-example image views as JAX functions of (uint8 image [H, W, 3], key): jitted, vmapped, run on the device.

Views used by Meta Pseudo Labels (paper, Sec. 4 and App. C; UDA, Xie et al. 2020):
- weak (labeled batch and the teacher's x_w): random horizontal flip + pad-and-crop (pad 4, reflect);
- strong (x_s): flip + pad-crop, RandAugment (N ops at magnitude M), Cutout, flip + pad-crop again, the order of
  the authors' released CIFAR pipeline;
- digits ('digits': small grey handwritten digits, e.g. scikit-learn's 8x8 ones): no flip (a mirrored 2 is not a 2);
  weak = a shift of up to `pad` pixels over the black background; strong = the weak view, one random rotation of up
  to DIGITS_MAX_ROTATION degrees and shear of up to DIGITS_MAX_SHEAR about the centre, then a Cutout square, both
  filled with the background (a digit stays a digit under small rotations, slants and missing stroke pieces; the
  colour ops of RandAugment mean little on 17 grey levels and Invert/Solarize turn strokes into background);
- ImageNet: the image is stored (or streamed) at `stored_size(image_size)` = image_size / 0.875 (shorter side
  resized, central square); training takes an Inception-style random resized crop of it (area 0.08..1, aspect
  3/4..4/3, Szegedy et al. 2015) resized to image_size, and a flip (strong adds RandAugment); evaluation takes the
  central image_size square (the usual 87.5% centre crop). Every shape is static, so all of it runs under jit.

RandAugment (Cubuk et al. 2019) follows the policy of the authors' release: the op list
AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, Color, Contrast, Brightness, Sharpness, ShearX, ShearY,
TranslateX, TranslateY, Cutout (no explicit Identity: every chosen op is applied only with a per-image probability
p ~ U(0.2, 0.8), so "identity" happens with probability 1 - p), a fixed magnitude M on the 0..10 level scale of the
RandAugment/AutoAugment code, extrapolated linearly past 10. The paper's M = 16 (CIFAR) and 17 (ImageNet) therefore
mean e.g. rotations of 48 / 51 degrees and enhancement factors near 3; at these levels Solarize's threshold is above
255 and it leaves the image unchanged, as in the release. Every op has PIL's semantics on uint8 images (the release
applies PIL): ImageEnhance blends truncate, the greyscale is PIL's integer "L" conversion, the affine ops sample the
nearest input pixel at PIL's pixel centres and fill with grey (128). tests/test_augment.py measures each op against
PIL.

Randomness: every view takes one `jax.random` key; `input_pipeline` derives it per example by `fold_in` of the
step's key with the example's row, so a resumed run makes exactly the same views.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from meta_pseudo_labels import errors

FILL_VALUE = 128
DIGITS_MAX_ROTATION = 15.0   # degrees
DIGITS_MAX_SHEAR = 0.2       # x offset per row, about the centre (~11 degrees of slant)
DIGITS_BACKGROUND = 0
_MAX_LEVEL = 10.0
CENTER_CROP_FRACTION = 0.875  # ImageNet evaluation: 224 of 256


def check_config(dataset_config):
  """One-line ConfigErrors for the image views' ranges, which they would otherwise take silently: a negative
  RandAugment magnitude gives negative enhancement factors and a solarize threshold below 0 (every pixel inverted),
  not a milder policy; a Cutout square larger than the image greys out most of every x_s (all of it from twice the
  image size); the pad-and-crop's reflect padding needs pad < image size. The one place these ranges live: config
  validation calls it before any work, once it has checked that the fields are integers and finite numbers."""
  num_ops, magnitude = dataset_config.randaugment_num_ops, dataset_config.randaugment_magnitude
  if num_ops < 0:
    raise errors.ConfigError(f'dataset.randaugment_num_ops: must be an integer >= 0, got {num_ops!r}')
  if magnitude < 0:
    raise errors.ConfigError(f'dataset.randaugment_magnitude: must be a number >= 0, got {magnitude!r}')
  image_size = dataset_config.image_size
  for field, maximum, why in (('cutout_size', image_size, 'dataset.image_size'),
                              ('pad_crop', image_size - 1, 'below dataset.image_size')):
    value = getattr(dataset_config, field)
    if not 0 <= value <= maximum:
      raise errors.ConfigError(f'dataset.{field}: must be an integer in [0, {maximum}] ({why}), got {value!r}')


def stored_size(kind, image_size):
  """The side images are stored at: the model's size, or for ImageNet-style crops the size before the 87.5% crop."""
  return round(image_size / CENTER_CROP_FRACTION) if kind == 'imagenet' else image_size


def _truncate_to_uint8(values):
  """PIL's float -> uint8: clipped to [0, 255], then truncated."""
  return jnp.floor(jnp.clip(values, 0.0, 255.0)).astype(jnp.uint8)


# ---- geometric ops (PIL Image.transform(AFFINE, NEAREST) semantics) -------------------------------------------

def affine(image, matrix, fill_value=FILL_VALUE):
  """Output pixel (x, y) takes input pixel floor(M @ (x + 1/2, y + 1/2, 1)), `fill_value` outside the image: PIL's
  `Image.transform(size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=fill)`. `matrix`: (a, b, c, d, e, f)."""
  image = jnp.asarray(image)
  height, width = image.shape[:2]
  a, b, c, d, e, f = (jnp.asarray(v, jnp.float32) for v in matrix)
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5, jnp.arange(width, dtype=jnp.float32) + 0.5,
                        indexing='ij')
  x_in = jnp.floor(a * xs + b * ys + c).astype(jnp.int32)
  y_in = jnp.floor(d * xs + e * ys + f).astype(jnp.int32)
  inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
  pixels = image[jnp.clip(y_in, 0, height - 1), jnp.clip(x_in, 0, width - 1)]
  return jnp.where(inside[:, :, None], pixels, jnp.asarray(fill_value, image.dtype))


def _rotation_matrix(height, width, degrees, shear=0.0):
  """The affine matrix of PIL's `rotate(degrees)` (counter-clockwise about the centre (W/2, H/2)) after an x-shear
  of `shear` about the centre."""
  radians = -jnp.asarray(degrees, jnp.float32) * (math.pi / 180.0)
  cos, sin = jnp.cos(radians), jnp.sin(radians)
  # output -> input: rotation (PIL's matrix), then the shear x_in = x + shear * y, both about the centre.
  a, b, d, e = cos, sin + shear * cos, -sin, cos - shear * sin
  cx, cy = width / 2.0, height / 2.0
  return (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)


def rotate_and_shear(image, degrees, shear, fill_value=FILL_VALUE):
  """PIL's `rotate(degrees)` after an x-shear of `shear`, both about the image centre."""
  return affine(image, _rotation_matrix(*image.shape[:2], degrees, shear), fill_value)


def rotate(image, degrees):
  return rotate_and_shear(image, degrees, 0.0)


def shear_x(image, level):
  return affine(image, (1.0, level, 0.0, 0.0, 1.0, 0.0))


def shear_y(image, level):
  return affine(image, (1.0, 0.0, 0.0, level, 1.0, 0.0))


def translate_x(image, pixels):
  return affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def translate_y(image, pixels):
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


def cutout(image, size, key, fill_value=FILL_VALUE):
  """Fills a size x size square (clipped at the border) centred uniformly in the image (DeVries 2017)."""
  height, width = image.shape[:2]
  key_y, key_x = jax.random.split(key)
  cy = jax.random.randint(key_y, [], 0, height)
  cx = jax.random.randint(key_x, [], 0, width)
  half = size // 2
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= cy - half) & (rows < cy - half + size) & (cols >= cx - half) & (cols < cx - half + size)
  return jnp.where(inside[:, :, None], jnp.asarray(fill_value, image.dtype), image)


# ---- colour ops (PIL semantics) -------------------------------------------------------------------------------

def _blend(degenerate, image, factor):
  """PIL `Image.blend(degenerate, image, factor)` (ImageEnhance): degenerate + factor * (image - degenerate)."""
  degenerate = degenerate.astype(jnp.float32)
  return _truncate_to_uint8(degenerate + jnp.float32(factor) * (image.astype(jnp.float32) - degenerate))


def _grey(image):
  """PIL's RGB -> "L": (19595 R + 38470 G + 7471 B + 2^15) >> 16, in integers."""
  rgb = image.astype(jnp.int32)
  return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16


def _color_degenerate(image):
  return jnp.repeat(_grey(image)[:, :, None], 3, axis=-1)


def _contrast_degenerate(image):
  """The mean grey level, rounded (PIL: int(mean + 0.5))."""
  return jnp.full(image.shape, jnp.floor(jnp.mean(_grey(image).astype(jnp.float32)) + 0.5))


def _sharpness_degenerate(image):
  """PIL's SMOOTH filter (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, rounded; the border keeps its pixels)."""
  height, width = image.shape[:2]
  values = jnp.asarray(image, jnp.float32)
  total = sum(values[dy:height - 2 + dy, dx:width - 2 + dx] for dy in range(3) for dx in range(3))
  smooth = (total + 4.0 * values[1:-1, 1:-1]) / 13.0
  return values.at[1:-1, 1:-1].set(jnp.floor(jnp.clip(smooth + 0.5, 0.0, 255.0)))


def color(image, factor):
  return _blend(_color_degenerate(image), image, factor)


def contrast(image, factor):
  return _blend(_contrast_degenerate(image), image, factor)


def brightness(image, factor):
  return _blend(jnp.zeros(image.shape), image, factor)


def sharpness(image, factor):
  return _blend(_sharpness_degenerate(image), image, factor)


def _histograms(image):
  """Per-channel histograms [C, 256] of a uint8 image [H, W, C]."""
  values = image.reshape(-1, image.shape[-1]).astype(jnp.int32).T
  return jax.vmap(lambda v: jnp.zeros([256], jnp.int32).at[v].add(1))(values)


def _apply_luts(image, luts):
  """Channel c of `image` through the lookup table luts[c] ([C, 256]), as PIL's `point` does per band."""
  return jnp.take_along_axis(luts, image.reshape(-1, image.shape[-1]).astype(jnp.int32).T, axis=1).T.reshape(
      image.shape).astype(jnp.uint8)


@functools.cache
def _pil_autocontrast_shortfalls():
  """Sorted keys lo * 2^16 + hi * 2^8 + level of the stretches where PIL's autocontrast gives one less than the
  exact floor((level - lo) * 255 / (hi - lo)): it computes int(level * scale - lo * scale) in double precision,
  scale = 255 / (hi - lo), which lands just below some exact integers (12094 of the 256^3 / 6 cases)."""
  keys = []
  for span in range(1, 256):   # hi - lo
    lo, offset = np.meshgrid(np.arange(256 - span), np.arange(span + 1), indexing='ij')
    level, scale = lo + offset, 255.0 / span
    short = (level * scale + (-lo * scale)).astype(np.int64) != offset * 255 // span
    keys.append(lo[short] * 65536 + (lo[short] + span) * 256 + level[short])
  return np.sort(np.concatenate(keys)).astype(np.int32)


def _autocontrast_lut(histogram):
  """PIL ImageOps.autocontrast's table for one channel: stretched to [0, 255] (truncated); constant: unchanged."""
  shortfalls = jnp.asarray(_pil_autocontrast_shortfalls())
  levels = jnp.arange(256)
  present = histogram > 0
  lo = jnp.min(jnp.where(present, levels, 255))
  hi = jnp.max(jnp.where(present, levels, 0))
  stretched = jnp.clip((levels - lo) * 255 // jnp.maximum(hi - lo, 1), 0, 255)
  keys = lo * 65536 + hi * 256 + levels
  found = shortfalls[jnp.clip(jnp.searchsorted(shortfalls, keys), 0, len(shortfalls) - 1)] == keys
  return jnp.where(hi > lo, stretched - found, levels)


def _equalize_lut(histogram):
  """PIL ImageOps.equalize's table for one channel, from its cumulative histogram."""
  levels = jnp.arange(256)
  last_nonzero = histogram[jnp.max(jnp.where(histogram > 0, levels, 0))]
  step = (jnp.sum(histogram) - last_nonzero) // 255
  safe_step = jnp.maximum(step, 1)
  before = jnp.cumsum(histogram) - histogram
  table = jnp.clip((before + safe_step // 2) // safe_step, 0, 255)
  return jnp.where(step > 0, table, levels)


def autocontrast(image):
  return _apply_luts(image, jax.vmap(_autocontrast_lut)(_histograms(image)))


def equalize(image):
  return _apply_luts(image, jax.vmap(_equalize_lut)(_histograms(image)))


def invert(image):
  return 255 - image


def posterize(image, bits):
  mask = jnp.uint8((0xFF << (8 - bits)) & 0xFF)
  return image & mask


def solarize(image, threshold):
  return jnp.where(image.astype(jnp.int32) < threshold, image, 255 - image)


# ---- RandAugment ----------------------------------------------------------------------------------------------

RANDAUGMENT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast',
                   'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout')


def op_branches(magnitude, translate_const, cutout_const):
  """One `(image, sign, key) -> image` per RANDAUGMENT_OPS entry, its argument set by the level `magnitude` as in
  the release (sign: the random direction of the geometric ops; key: Cutout's position): the ops one by one, the
  definition that `randaugment`'s fused `_apply_op` computes (tests/test_augment.py checks they agree)."""
  level = magnitude / _MAX_LEVEL
  enhance = level * 1.8 + 0.1
  posterize_bits = min(8, max(1, int(level * 4)))
  cutout_size = 2 * int(level * cutout_const)
  ops = {
      'AutoContrast': lambda image, sign, key: autocontrast(image),
      'Equalize': lambda image, sign, key: equalize(image),
      'Invert': lambda image, sign, key: invert(image),
      'Rotate': lambda image, sign, key: rotate(image, sign * level * 30.0),
      'Posterize': lambda image, sign, key: posterize(image, posterize_bits),
      'Solarize': lambda image, sign, key: solarize(image, int(level * 256)),
      'Color': lambda image, sign, key: color(image, enhance),
      'Contrast': lambda image, sign, key: contrast(image, enhance),
      'Brightness': lambda image, sign, key: brightness(image, enhance),
      'Sharpness': lambda image, sign, key: sharpness(image, enhance),
      'ShearX': lambda image, sign, key: shear_x(image, sign * level * 0.3),
      'ShearY': lambda image, sign, key: shear_y(image, sign * level * 0.3),
      'TranslateX': lambda image, sign, key: translate_x(image, sign * level * translate_const),
      'TranslateY': lambda image, sign, key: translate_y(image, sign * level * translate_const),
      'Cutout': lambda image, sign, key: cutout(image, cutout_size, key),
  }
  return [ops[name] for name in RANDAUGMENT_OPS]


def randaugment_choices(key, num_ops):
  """The random choices of one image's RandAugment: op indices [num_ops], applied flags [num_ops] (each with
  probability p ~ U(0.2, 0.8), one p per image), signs [num_ops] (+-1), one key per op."""
  p_key, op_key, apply_key, sign_key, op_keys = jax.random.split(key, 5)
  apply_prob = jax.random.uniform(p_key, [], minval=0.2, maxval=0.8)
  op_indices = jax.random.randint(op_key, [num_ops], 0, len(RANDAUGMENT_OPS))
  applied = jax.random.uniform(apply_key, [num_ops]) < apply_prob
  signs = jnp.where(jax.random.uniform(sign_key, [num_ops]) < 0.5, -1.0, 1.0)
  return op_indices, applied, signs, jax.random.split(op_keys, num_ops)


def _apply_op(image, op_index, sign, key, *, magnitude, translate_const, cutout_const):
  """RANDAUGMENT_OPS[op_index] of `image`, the same as `op_branches`'s, computed as one op of its family: a
  per-channel lookup table (AutoContrast, Equalize, Invert, Posterize, Solarize), one affine warp (Rotate, ShearX/Y,
  TranslateX/Y), one blend (Color, Contrast, Brightness, Sharpness) or Cutout. Under vmap a `lax.switch` computes
  every branch for every image; this computes each family's one expensive pass (histogram, gather, filter) once."""
  level = magnitude / _MAX_LEVEL
  is_op = lambda *names: jnp.isin(op_index, jnp.asarray([RANDAUGMENT_OPS.index(name) for name in names]))
  height, width = image.shape[:2]
  # Lookup tables: the pointwise ops are their own tables applied to the 256 levels.
  levels = jnp.arange(256, dtype=jnp.uint8)
  histograms = _histograms(image)
  luts = jnp.select(
      [is_op('AutoContrast'), is_op('Equalize'), is_op('Invert'), is_op('Posterize')],
      [jax.vmap(_autocontrast_lut)(histograms), jax.vmap(_equalize_lut)(histograms),
       jnp.broadcast_to(invert(levels), (3, 256)).astype(jnp.int32),
       jnp.broadcast_to(posterize(levels, min(8, max(1, int(level * 4)))), (3, 256)).astype(jnp.int32)],
      jnp.broadcast_to(solarize(levels, int(level * 256)), (3, 256)).astype(jnp.int32))
  # Affine warps: one matrix per op.
  shear, shift = sign * level * 0.3, sign * level * translate_const
  identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
  matrices = {'Rotate': _rotation_matrix(height, width, sign * level * 30.0),
              'ShearX': (1.0, shear, 0.0, 0.0, 1.0, 0.0), 'ShearY': (1.0, 0.0, 0.0, shear, 1.0, 0.0),
              'TranslateX': (1.0, 0.0, shift, 0.0, 1.0, 0.0), 'TranslateY': (1.0, 0.0, 0.0, 0.0, 1.0, shift)}
  matrix = [jnp.select([is_op(name) for name in matrices], [jnp.asarray(m[i], jnp.float32) for m in matrices.values()],
                       identity[i]) for i in range(6)]
  # Blends: one degenerate image per op.
  degenerate = jnp.select([is_op('Color'), is_op('Contrast'), is_op('Brightness')],
                          [_color_degenerate(image).astype(jnp.float32), _contrast_degenerate(image),
                           jnp.zeros(image.shape)], _sharpness_degenerate(image))
  families = [is_op('AutoContrast', 'Equalize', 'Invert', 'Posterize', 'Solarize'), is_op(*matrices),
              is_op('Color', 'Contrast', 'Brightness', 'Sharpness')]
  return jnp.select(families, [_apply_luts(image, luts), affine(image, matrix), _blend(degenerate, image,
                                                                                        level * 1.8 + 0.1)],
                    cutout(image, 2 * int(level * cutout_const), key))


def randaugment(image, key, *, num_ops, magnitude, translate_const, cutout_const):
  """Applies `num_ops` ops drawn uniformly from RANDAUGMENT_OPS, each with probability p ~ U(0.2, 0.8)."""
  op_indices, applied, signs, op_keys = randaugment_choices(key, num_ops)
  for i in range(num_ops):
    augmented = _apply_op(image, op_indices[i], signs[i], op_keys[i], magnitude=float(magnitude),
                          translate_const=float(translate_const), cutout_const=float(cutout_const))
    image = jnp.where(applied[i], augmented, image)
  return image


# ---- views ----------------------------------------------------------------------------------------------------

def _random_crop(image, key, size_hw):
  """A size_hw crop at a uniform offset."""
  height, width = image.shape[:2]
  key_y, key_x = jax.random.split(key)
  top = jax.random.randint(key_y, [], 0, height - size_hw[0] + 1)
  left = jax.random.randint(key_x, [], 0, width - size_hw[1] + 1)
  return jax.lax.dynamic_slice(image, (top, left, 0), (size_hw[0], size_hw[1], image.shape[2]))


def random_flip(image, key):
  return jnp.where(jax.random.bernoulli(key), image[:, ::-1], image)


def flip_and_pad_crop(image, key, pad):
  """Random horizontal flip, then reflect-pad by `pad` and crop back to the original size at a random offset."""
  flip_key, crop_key = jax.random.split(key)
  image = random_flip(image, flip_key)
  if pad:
    padded = jnp.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode='reflect')
    image = _random_crop(padded, crop_key, image.shape[:2])
  return image


def shift_over_background(image, key, pad):
  """A random shift of up to `pad` pixels each way, the uncovered border filled with the digits' background."""
  if not pad:
    return image
  padded = jnp.pad(image, [[pad, pad], [pad, pad], [0, 0]], constant_values=DIGITS_BACKGROUND)
  return _random_crop(padded, key, image.shape[:2])


def inception_crop(image, key, size, *, attempts=10):
  """Random resized crop (Szegedy et al. 2015): area 8%..100% of the image, aspect 3/4..4/3 (log-uniform), the
  first of `attempts` draws that fits (else the central square), resized to size x size (bicubic, antialiased)."""
  height, width = image.shape[:2]
  area_key, aspect_key, y_key, x_key = jax.random.split(key, 4)
  area = jax.random.uniform(area_key, [attempts], minval=0.08, maxval=1.0) * (height * width)
  aspect = jnp.exp(jax.random.uniform(aspect_key, [attempts], minval=math.log(3 / 4), maxval=math.log(4 / 3)))
  crop_w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  crop_h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (crop_w >= 1) & (crop_w <= width) & (crop_h >= 1) & (crop_h <= height)
  first = jnp.argmax(fits)
  side = min(height, width)
  crop_h = jnp.where(fits[first], crop_h[first], side)
  crop_w = jnp.where(fits[first], crop_w[first], side)
  top = jnp.where(fits[first], jax.random.randint(y_key, [], 0, height - crop_h + 1), (height - side) // 2)
  left = jnp.where(fits[first], jax.random.randint(x_key, [], 0, width - crop_w + 1), (width - side) // 2)
  scale = jnp.stack([size / crop_h, size / crop_w]).astype(jnp.float32)
  translation = -jnp.stack([top, left]).astype(jnp.float32) * scale
  resized = jax.image.scale_and_translate(image.astype(jnp.float32), (size, size, image.shape[2]), (0, 1), scale,
                                          translation, method='cubic', antialias=True)
  return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)


def center_crop(image, size):
  """The central size x size square of an image [H, W, C] or a batch [..., H, W, C] (ImageNet evaluation: 224 of
  the stored 256, the 87.5% crop)."""
  height, width = image.shape[-3:-1]
  top, left = (height - size) // 2, (width - size) // 2
  return image[..., top:top + size, left:left + size, :]


def weak_view(image, key, *, kind, image_size, pad):
  """The weak view: flip + pad-crop ('cifar'), a shift ('digits'), inception crop + flip ('imagenet'), unchanged
  ('none')."""
  if kind == 'cifar':
    return flip_and_pad_crop(image, key, pad)
  if kind == 'digits':
    return shift_over_background(image, key, pad)
  if kind == 'imagenet':
    crop_key, flip_key = jax.random.split(key)
    return random_flip(inception_crop(image, crop_key, image_size), flip_key)
  return image


def strong_view(image, key, *, kind, image_size, pad, num_ops, magnitude, cutout_size):
  """The strong view x_s: the weak view, RandAugment, then (CIFAR) Cutout and a second flip + pad-crop; for
  'digits' the weak view, a rotation + shear and Cutout (module docstring)."""
  if kind == 'none':
    return image
  weak_key, ra_key, cutout_key, second_key = jax.random.split(key, 4)
  image = weak_view(image, weak_key, kind=kind, image_size=image_size, pad=pad)
  if kind == 'digits':
    rotation_key, shear_key = jax.random.split(ra_key)
    degrees = jax.random.uniform(rotation_key, [], minval=-DIGITS_MAX_ROTATION, maxval=DIGITS_MAX_ROTATION)
    shear = jax.random.uniform(shear_key, [], minval=-DIGITS_MAX_SHEAR, maxval=DIGITS_MAX_SHEAR)
    image = rotate_and_shear(image, degrees, shear, DIGITS_BACKGROUND)
    return cutout(image, cutout_size, cutout_key, DIGITS_BACKGROUND) if cutout_size else image
  if kind == 'cifar':
    image = randaugment(image, ra_key, num_ops=num_ops, magnitude=magnitude, translate_const=image_size // 8,
                        cutout_const=image_size // 8)
    if cutout_size:
      image = cutout(image, cutout_size, cutout_key)
    return flip_and_pad_crop(image, second_key, pad)
  # ImageNet: the release's constants (translate 100 px, cutout 40 px at 224 px), scaled to the image size.
  return randaugment(image, ra_key, num_ops=num_ops, magnitude=magnitude,
                     translate_const=100 * image_size / 224, cutout_const=40 * image_size / 224)


def eval_view(image, *, kind, image_size):
  """No randomness: the stored image, or for 'imagenet' its central image_size square (an image or a batch)."""
  if kind == 'imagenet':
    return center_crop(image, image_size)
  return image
