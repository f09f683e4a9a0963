"""The evaluator's per-class sums: confusion matrix, per-class top-1 and expected calibration error, against numpy."""

import jax
import numpy as np
from sklearn import metrics as sk_metrics

from meta_pseudo_labels.run import evaluation


def _numpy_ece(probabilities, labels, bins):
  """Guo et al. 2017, Eq. 3, directly: sum over bins of n_b / n |accuracy_b - confidence_b|."""
  confidence, predicted = probabilities.max(-1), probabilities.argmax(-1)
  which = np.minimum((confidence * bins).astype(int), bins - 1)
  ece = 0.0
  for b in range(bins):
    members = which == b
    if members.any():
      ece += members.mean() * abs((predicted[members] == labels[members]).mean() - confidence[members].mean())
  return ece


def test_class_sums_match_numpy_over_the_unmasked_examples():
  rng = np.random.default_rng(0)
  num_classes, size = 5, 64
  logits = rng.normal(scale=2.0, size=(size, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, size).astype(np.int32)
  mask = (rng.random(size) < 0.8).astype(np.float32)
  mask[labels == 4] = 0.0   # class 4 has no unmasked example: its accuracy is None
  sums = jax.jit(evaluation.class_sums)(logits, {'label': labels, 'mask': mask})
  kept = mask > 0
  expected = sk_metrics.confusion_matrix(labels[kept], logits[kept].argmax(-1), labels=range(num_classes))
  np.testing.assert_array_equal(np.asarray(sums['confusion']), expected)
  per_class = evaluation.per_class_accuracy(expected)
  assert per_class[4] is None
  for c in range(4):
    assert per_class[c] == np.mean(logits[kept & (labels == c)].argmax(-1) == c)
  probabilities = np.asarray(jax.nn.softmax(logits))
  ece = evaluation.expected_calibration_error(*(np.asarray(sums[k]) for k in ('bin_count', 'bin_confidence',
                                                                             'bin_correct')))
  np.testing.assert_allclose(ece, _numpy_ece(probabilities[kept], labels[kept], evaluation.CALIBRATION_BINS),
                             rtol=1e-5)
  assert 0.0 < ece < 1.0
