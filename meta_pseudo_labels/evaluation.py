"""Evaluation: top-1 / top-5 accuracy and cross-entropy of several models over one split, reading the data once.

`eval_step` returns per-batch sums over the unmasked examples (the last batch is padded, padding has mask 0);
`Evaluator` adds them up on the devices and fetches them once per split, so an evaluation costs one host round
trip. The TwoMoon experiment calls `eval_step` on its whole point set directly.
"""

import functools

import jax
import jax.numpy as jnp

from meta_pseudo_labels import losses
from meta_pseudo_labels import sharding


def eval_step(apply_fn, variables, batch):
  """Sums over the unmasked examples of one eval batch: top-1 / top-min(5, C) correct, CE loss, count."""
  logits = apply_fn(variables, batch['image'], train=False)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  return {
      'top1_correct': jnp.sum(mask * losses.top_k_correct(logits, labels, 1)),
      'top5_correct': jnp.sum(mask * losses.top_k_correct(logits, labels, 5)),
      'loss_sum': jnp.sum(mask * losses.softmax_cross_entropy(logits, labels).astype(jnp.float32)),
      'count': jnp.sum(mask),
  }


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
    """Returns `{name: {'top1', 'top5', 'loss', 'count'}}` (accuracies in [0, 1], mean loss) over `split`."""
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
      results[name] = {
          'top1': float(sums['top1_correct']) / denominator if count else float('nan'),
          'top5': float(sums['top5_correct']) / denominator if count else float('nan'),
          'loss': float(sums['loss_sum']) / denominator if count else float('nan'),
          'count': int(count),
      }
    return results
