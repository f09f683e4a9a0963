"""What evaluation feeds a run's models, saved in its workdir so that trained models take new inputs exactly so.

`inputs.json` (`to_dict()`, written by `train` through rundir/run_directory.py next to config.json) holds the
preprocessing of the eval splits (`input_pipeline.eval_input`): the stored-size fit, `augment.eval_view`'s kind and
size and the per-channel normalisation, whose statistics come from an in-memory training split and exist nowhere
else, plus the class names. No TensorFlow here: an exported model's metadata carries the same dict to machines with
jax alone.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class InputSpec:
  kind: str                   # eval_view's kind: 'cifar' | 'imagenet' | 'none' (vectors)
  image_size: int             # model input side (images)
  stored_size: int | None     # decoded images are first fitted to this square side (None: the views crop them)
  mean: tuple | None          # per-channel normalisation; None: inputs are used as they are (vectors)
  std: tuple | None
  input_shape: tuple          # one example, without the batch dimension
  num_classes: int
  class_names: tuple | None   # label -> name (image folders, TFDS ClassLabel); None: the labels are the names

  def to_dict(self):
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values):
    values = dict(values)
    for field in ('mean', 'std', 'input_shape', 'class_names'):
      if values[field] is not None:
        values[field] = tuple(values[field])
    return cls(**values)
