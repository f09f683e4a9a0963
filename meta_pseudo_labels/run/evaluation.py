"""Evaluation: accuracy, loss, per-class accuracy, confusion and calibration of several models over one split,
reading the data once.

Every quantity is a per-batch sum over the unmasked examples (the last batch is padded, padding has mask 0): the
network runs once per batch and model, the sums are added up on the devices and fetched once per split, so an
evaluation costs one host round trip whatever the number of classes.

Calibration is the expected calibration error (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017,
Eq. 3): examples are binned by their top-1 probability into `CALIBRATION_BINS` equal-width bins and
ECE = sum_b (n_b / n) |accuracy_b - mean confidence_b|.

The TwoMoon experiment calls `eval_step` on its whole point set directly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from meta_pseudo_labels.execution import sharding
from meta_pseudo_labels.method import losses

CALIBRATION_BINS = 15   # Guo et al. 2017's choice
SCALAR_METRICS = ('top1', 'top5', 'loss', 'ece')   # what goes to TensorBoard; the rest are per class


def eval_sums(logits, batch):
  """Sums over the unmasked examples of one eval batch: top-1 / top-min(5, C) correct, CE loss, count."""
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  return {
      'top1_correct': jnp.sum(mask * losses.top_k_correct(logits, labels, 1)),
      'top5_correct': jnp.sum(mask * losses.top_k_correct(logits, labels, 5)),
      'loss_sum': jnp.sum(mask * losses.softmax_cross_entropy(logits, labels).astype(jnp.float32)),
      'count': jnp.sum(mask),
  }


def class_sums(logits, batch):
  """Per-batch sums behind the per-class metrics: the confusion matrix (rows: true class, columns: predicted)
  and, per confidence bin, the example count, the summed top-1 probability and the number correct."""
  num_classes = logits.shape[-1]
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  probabilities = jax.nn.softmax(logits.astype(jnp.float32))
  confidence, predicted = jnp.max(probabilities, axis=-1), jnp.argmax(probabilities, axis=-1)
  true_one_hot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
  confusion = true_one_hot.T @ jax.nn.one_hot(predicted, num_classes)
  bins = jnp.minimum((confidence * CALIBRATION_BINS).astype(jnp.int32), CALIBRATION_BINS - 1)
  in_bin = jax.nn.one_hot(bins, CALIBRATION_BINS) * mask[:, None]
  return {
      'confusion': confusion,
      'bin_count': jnp.sum(in_bin, axis=0),
      'bin_confidence': confidence @ in_bin,
      'bin_correct': (predicted == labels).astype(jnp.float32) @ in_bin,
  }


def eval_step(apply_fn, variables, batch):
  """`eval_sums` and `class_sums` of one batch, from one forward pass."""
  logits = apply_fn(variables, batch['image'], train=False)
  return {**eval_sums(logits, batch), **class_sums(logits, batch)}


def expected_calibration_error(bin_count, bin_confidence, bin_correct):
  count = np.sum(bin_count)
  if not count:
    return float('nan')
  return float(np.sum(np.abs(bin_correct - bin_confidence)) / count)   # sum_b n_b/n |acc_b - conf_b|


def per_class_accuracy(confusion):
  """Top-1 accuracy of each true class (None for a class without examples in the split)."""
  totals = confusion.sum(axis=1)
  return [float(confusion[c, c] / totals[c]) if totals[c] else None for c in range(len(confusion))]


def for_json(results):
  """`Evaluator.evaluate`'s results without the confusion matrices (C x C each: kept out of results.json)."""
  return {name: {k: v for k, v in values.items() if k != 'confusion'} for name, values in results.items()}


class Evaluator:
  """Evaluates named models (`{name: (apply_fn, variables)}`) on a split of `pipeline`."""

  def __init__(self, pipeline, mesh):
    self._pipeline = pipeline
    self._mesh = mesh
    self._steps = {}   # apply_fn -> jitted eval step (one compilation per architecture and batch shape)

  def _step(self, apply_fn):
    if apply_fn not in self._steps:
      self._steps[apply_fn] = jax.jit(functools.partial(eval_step, apply_fn))
    return self._steps[apply_fn]

  def evaluate(self, split, named_models):
    """Returns `{name: metrics}` over `split`: 'top1', 'top5' (in [0, 1]), mean 'loss', 'ece', 'count',
    'per_class_top1' (a list over classes) and 'confusion' (int64 [C, C] numpy, rows: true class)."""
    totals = {name: None for name in named_models}
    for host_batch in self._pipeline.eval_batches(split):
      batch = sharding.make_global_batch(host_batch, self._mesh)
      for name, (apply_fn, variables) in named_models.items():
        sums = self._step(apply_fn)(variables, batch)
        totals[name] = sums if totals[name] is None else jax.tree.map(jnp.add, totals[name], sums)
    totals = jax.device_get(totals)
    results = {}
    for name, sums in totals.items():
      count = float(sums['count']) if sums is not None else 0.0
      denominator = max(count, 1.0)
      confusion = (np.rint(sums['confusion']).astype(np.int64) if sums is not None
                   else np.zeros((self._pipeline.num_classes,) * 2, np.int64))
      results[name] = {
          'top1': float(sums['top1_correct']) / denominator if count else float('nan'),
          'top5': float(sums['top5_correct']) / denominator if count else float('nan'),
          'loss': float(sums['loss_sum']) / denominator if count else float('nan'),
          'ece': (expected_calibration_error(sums['bin_count'], sums['bin_confidence'], sums['bin_correct'])
                  if count else float('nan')),
          'count': int(count),
          'per_class_top1': per_class_accuracy(confusion),
          'confusion': confusion,
      }
    return results
