"""Loss terms of losses.py against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta_pseudo_labels.method import losses

LOGITS = jnp.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0], [-2.0, 4.0, 0.0]])
LABELS = jnp.array([0, 1, 2, 1])


def numpy_log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_cross_entropy_of_labels_equals_one_hot_targets_and_numpy():
  expected = -numpy_log_softmax(LOGITS)[np.arange(4), np.asarray(LABELS)]
  np.testing.assert_allclose(losses.softmax_cross_entropy(LOGITS, LABELS), expected, rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(LOGITS, jax.nn.one_hot(LABELS, 3)), expected.mean(), rtol=1e-6)


def test_label_smoothing_mixes_the_target_with_uniform():
  eps = 0.15
  targets = (1 - eps) * np.eye(3)[np.asarray(LABELS)] + eps / 3
  expected = -(targets * numpy_log_softmax(LOGITS)).sum(-1).mean()
  np.testing.assert_allclose(losses.cross_entropy(LOGITS, LABELS, eps), expected, rtol=1e-6)


def test_weights_multiply_examples_and_average_over_the_whole_batch():
  weights = jnp.array([1.0, 0.0, 1.0, 0.0])
  per_example = losses.softmax_cross_entropy(LOGITS, LABELS)
  np.testing.assert_allclose(losses.cross_entropy(LOGITS, LABELS, weights=weights),
                             (per_example[0] + per_example[2]) / 4, rtol=1e-6)


def test_uda_loss_masks_unconfident_examples_and_stops_the_weak_view():
  weak = jnp.array([[4.0, 0.0, 0.0], [0.1, 0.0, 0.0]])   # confident, unconfident
  strong = jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0]])
  loss, mask_rate = losses.uda_loss(weak, strong, temperature=0.7, threshold=0.6)
  q = np.exp(numpy_log_softmax(np.asarray(weak) / 0.7))
  assert q[0].max() >= 0.6 > q[1].max()
  expected = -(q[0] * numpy_log_softmax(strong)[0]).sum() / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(mask_rate) == 0.5
  weak_grad = jax.grad(lambda w: losses.uda_loss(w, strong, 0.7, 0.6)[0])(weak)
  np.testing.assert_array_equal(weak_grad, 0.0)


def test_uda_weight_ramps_linearly_then_stays_flat():
  values = [float(losses.uda_weight(t, 8.0, 4)) for t in (0, 1, 3, 10)]
  np.testing.assert_allclose(values, [2.0, 4.0, 8.0, 8.0])
  assert float(losses.uda_weight(0, 8.0, 0)) == 8.0


def test_top_k_correct_clamps_k_to_the_number_of_classes():
  np.testing.assert_array_equal(losses.top_k_correct(LOGITS, LABELS, 1), [1, 0, 0, 1])  # ties: [1,1,1] -> 0
  np.testing.assert_array_equal(losses.top_k_correct(LOGITS, jnp.array([2, 0, 0, 2]), 2), [0, 1, 1, 1])
  np.testing.assert_array_equal(losses.top_k_correct(LOGITS, LABELS, 5), [1, 1, 1, 1])


@pytest.mark.parametrize('advantage', [0.7, -0.7])
def test_mpl_feedback_gradient_is_advantage_times_the_hard_label_gradient(advantage):
  labels = jnp.argmax(LOGITS, -1)
  grad = jax.grad(lambda z: losses.mpl_feedback_loss(z, labels, jnp.float32(advantage)))(LOGITS)
  expected = advantage * (jax.nn.softmax(LOGITS) - jax.nn.one_hot(labels, 3)) / 4
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  # The advantage itself is a constant for the teacher.
  advantage_grad = jax.grad(lambda a: losses.mpl_feedback_loss(LOGITS, labels, a))(jnp.float32(advantage))
  assert float(advantage_grad) == 0.0


@pytest.mark.parametrize('loss', [
    lambda labels: losses.softmax_cross_entropy(LOGITS, labels),
    lambda labels: losses.cross_entropy(LOGITS, labels),
    lambda labels: losses.cross_entropy(LOGITS, labels, label_smoothing=0.1),
    lambda labels: losses.top_k_correct(LOGITS, labels, 1),
])
def test_labels_of_another_shape_than_the_logits_rows_are_refused(loss):
  """Labels [N, 1] would broadcast against [N, C] logits into an [N, N] loss: 1.926 instead of 1.114 here."""
  with pytest.raises(ValueError, match=r'labels of shape \(4, 1\) do not match logits of shape \(4, 3\)'):
    loss(LABELS[:, None])
  with pytest.raises(ValueError, match=r'labels of shape \(3,\) do not match logits of shape \(4, 3\)'):
    loss(LABELS[:3])


def test_targets_and_weights_of_another_shape_are_refused():
  with pytest.raises(ValueError, match=r'targets of shape \(4, 1, 3\) do not match logits of shape \(4, 3\)'):
    losses.cross_entropy(LOGITS, jax.nn.one_hot(LABELS[:, None], 3))
  with pytest.raises(ValueError, match=r'weights of shape \(4, 1\) do not match the 4 examples'):
    losses.cross_entropy(LOGITS, LABELS, weights=jnp.ones((4, 1)))
  with pytest.raises(ValueError, match=r'labels must be integer class indices, got dtype float32 \(shape \(4,\)\)'):
    losses.top_k_correct(LOGITS, LABELS.astype(jnp.float32), 1)
