"""Test-only launcher: `python tests/mock_tfds_main.py <main's flags>` runs `meta_pseudo_labels.main` with TFDS mocked.

`tfds.testing.mock_data` patches TFDS inside one process, so the end-to-end tests cannot mock a plain
`python -m meta_pseudo_labels.main`; this launcher enters the mock and then runs main with exactly the flags a user
passes. Every TFDS dataset then yields MOCK_TFDS_EXAMPLES deterministic examples per split (no download, no prepared
data), example i with label i mod K (K = the dataset's number of classes, capped by MOCK_TFDS_NUM_CLASSES), so every
class is present however few examples there are; a cap lets an ImageNet config run with `dataset.num_classes=K`
instead of 1000 classes. Images are MOCK_TFDS_IMAGE_SIZE squares (JPEG-encoded when the pipeline asks TFDS to skip
decoding, as the streaming pipeline does). Train examples differ from those of every other split.

`mock_as_dataset(num_examples, image_size, max_classes)` is the same mock for in-process tests
(`tfds.testing.mock_data(as_dataset_fn=...)`).

Here `DatasetBuilder.as_dataset` itself is replaced as well: TFDS's mock runs the real `as_dataset` inside
`test_utils.MockFs`, which redirects the whole process's file system (`tf.io.gfile`, `epath`) to a temporary
directory while it runs. The streaming pipeline opens datasets during training (at evaluations, at the finetuning
phase) while orbax may be finalising a checkpoint in a background thread, whose files would then land in that
temporary directory and the save fail.
"""

import os
import sys

from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def mock_as_dataset(num_examples, image_size=32, max_classes=0):
  """An `as_dataset_fn` for `tfds.testing.mock_data`: label i mod K for example i (see the module docstring)."""

  def as_dataset(builder, split, decoders=None, read_config=None, shuffle_files=False):
    del read_config, shuffle_files
    num_classes = builder.info.features['label'].num_classes
    if max_classes:
      num_classes = min(num_classes, max_classes)
    offset = 0 if str(split).startswith('train') else num_examples  # other splits' examples differ from train's
    encoded = decoders is not None and isinstance(decoders.get('image'), tfds.decode.SkipDecoding)

    def examples():
      for i in range(offset, offset + num_examples):
        image = np.random.default_rng(i).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        yield {'image': tf.io.encode_jpeg(image).numpy() if encoded else image, 'label': i % num_classes}

    image_spec = (tf.TensorSpec([], tf.string) if encoded
                  else tf.TensorSpec([image_size, image_size, 3], tf.uint8))
    dataset = tf.data.Dataset.from_generator(
        examples, output_signature={'image': image_spec, 'label': tf.TensorSpec([], tf.int64)})
    return dataset.apply(tf.data.experimental.assert_cardinality(num_examples))

  return as_dataset


def _without_mock_fs(as_dataset_fn):
  """`DatasetBuilder.as_dataset` straight to `as_dataset_fn`, without TFDS's process-wide mock file system."""

  def as_dataset(builder, split=None, *, decoders=None, read_config=None, shuffle_files=False, **kwargs):
    del kwargs  # batch_size, as_supervised: not used by the pipeline
    return as_dataset_fn(builder, split, decoders=decoders, read_config=read_config, shuffle_files=shuffle_files)

  return as_dataset


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
  from meta_pseudo_labels import main  # pylint: disable=g-import-not-at-top

  as_dataset_fn = mock_as_dataset(int(os.environ.get('MOCK_TFDS_EXAMPLES', '200')),
                                  int(os.environ.get('MOCK_TFDS_IMAGE_SIZE', '32')),
                                  int(os.environ.get('MOCK_TFDS_NUM_CLASSES', '0')))
  with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn), \
       mock.patch.object(tfds.core.DatasetBuilder, 'as_dataset', _without_mock_fs(as_dataset_fn)):
    main.run()
