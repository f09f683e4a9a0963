r"""Labels new inputs with a trained network: `python -m meta_pseudo_labels.predict --workdir=W --images=DIR
--output=preds.csv` (or `--npz=F` for arrays).

The network (`--model`, default the run's final one: the finetuned student of an MPL run, else its EMA student; the
network of a supervised / UDA run) is restored from the newest checkpoint of its phase in W with the architecture
of W's config.json, and every input is prepared exactly as the run's evaluation prepared its test split (the
stored-size fit, `augment.eval_view`, the training split's channel statistics; `input_pipeline.eval_input`).

Inputs: `--images=DIR`, every .png / .jpg / .jpeg below DIR (sorted paths); or `--npz=F`, the array 'x' (else
'x_test', else the file's only array) of uint8 images [N, H, W, 1|3] or, for a vector model, float vectors [N, D].

Output: a CSV with one row per input, in input order: path (for --npz `F[i]`), class (the training folder's class
names, TFDS's label names, else the label index), probability, and the top-5 classes and probabilities separated by
';'. Batches of `--batch_size` (default: the run's eval_batch_size) are split over the local devices.

A missing or damaged checkpoint, an unreadable image, an input the model cannot take: one line, exit 2.
"""

import csv
import functools
import io
import os
import types

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from meta_pseudo_labels import cli
from meta_pseudo_labels import errors
from meta_pseudo_labels.data import data_sources
from meta_pseudo_labels.data import input_pipeline
from meta_pseudo_labels.execution import sharding
from meta_pseudo_labels.rundir import run_directory
from meta_pseudo_labels.trained import networks
from meta_pseudo_labels.trained import trained_models

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The training run\'s directory (config.json, inputs.json, checkpoints/).')
flags.DEFINE_string('images', None, 'A directory of .png / .jpg images (searched recursively).')
flags.DEFINE_string('npz', None, "A .npz file with the inputs under 'x' (or 'x_test', or its only array).")
flags.DEFINE_string('model', None, f'The network: one of {list(networks.NETWORKS)} that the run trained; '
                    'default: its final network.')
flags.DEFINE_string('output', None, 'The CSV file to write.')
flags.DEFINE_integer('batch_size', None, 'Inputs per batch (default: the run\'s eval_batch_size), a multiple of '
                     'the local device count.')

TOP_K = 5
NPZ_KEYS = ('x', 'x_test')
_PROGRESS_EVERY = 10   # batches between progress lines when tqdm is not installed


# ---- inputs ---------------------------------------------------------------------------------------------------


def image_paths(directory):
  if not os.path.isdir(directory):
    raise errors.DataError(f'--images={directory}: no such directory')
  paths = sorted(os.path.join(root, name) for root, _, names in os.walk(directory) for name in names
                 if name.lower().endswith(data_sources.IMAGE_EXTENSIONS))
  if not paths:
    raise errors.DataError(f'--images={directory}: no .png / .jpg / .jpeg files in it or below it')
  return paths


def _npz_array(path):
  try:
    with np.load(path) as npz:
      keys = [key for key in NPZ_KEYS if key in npz.files] or (npz.files if len(npz.files) == 1 else [])
      if not keys:
        raise errors.DataError(f"--npz={path}: no array 'x' or 'x_test' (arrays: {npz.files}); store the inputs as x")
      return npz[keys[0]]
  except (OSError, ValueError) as e:
    raise errors.DataError(f'--npz={path}: not a readable .npz file ({e})') from None


def _check_npz_shape(x, spec, path):
  """Raises a one-line DataError unless `x` holds inputs of the kind and size the network takes."""
  takes_vectors = len(spec.input_shape) == 1
  if takes_vectors and x.ndim == 2 and np.issubdtype(x.dtype, np.floating):
    if x.shape[1] != spec.input_shape[0]:
      raise errors.DataError(f'--npz={path}: vectors of {x.shape[1]} values, the network takes '
                             f'{spec.input_shape[0]}')
    return
  if not takes_vectors and x.ndim == 4 and x.dtype == np.uint8 and x.shape[-1] in (1, 3) and min(x.shape[1:3]):
    return
  wanted = (f'float vectors [N, {spec.input_shape[0]}]' if takes_vectors
            else 'uint8 images [N, H, W, 1|3] (any size: they are fitted as in training)')
  raise errors.DataError(f'--npz={path}: {x.dtype} {x.shape} is not an input this network takes; it takes {wanted}')


def read_inputs(spec):
  """(names, prepare) where prepare(i) is the model input of input i (float32 numpy), from --images or --npz."""
  if bool(FLAGS.images) == bool(FLAGS.npz):
    raise errors.ConfigError('give exactly one of --images=DIR and --npz=FILE')
  if FLAGS.images:
    if len(spec.input_shape) == 1:
      raise errors.DataError(f'--images: the network takes vectors of {spec.input_shape[0]} values, not images; '
                             'pass them with --npz')
    paths = image_paths(FLAGS.images)
    return paths, lambda i: input_pipeline.eval_input(data_sources.read_image(paths[i]), spec)
  x = _npz_array(FLAGS.npz)
  _check_npz_shape(x, spec, FLAGS.npz)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return [f'{FLAGS.npz}[{i}]' for i in range(len(x))], lambda i: input_pipeline.eval_input(x[i], spec)


def _progress(num_batches):
  """An iterator over batch indices showing progress (tqdm when installed, else a log line every few batches)."""
  try:
    import tqdm  # pylint: disable=g-import-not-at-top  # optional
    return iter(tqdm.tqdm(range(num_batches), desc='predict', unit='batch', disable=num_batches < 2))
  except ImportError:
    def logged():
      for index in range(num_batches):
        if index % _PROGRESS_EVERY == 0:
          logging.info('batch %d/%d', index + 1, num_batches)
        yield index
    return logged()


# ---- prediction -------------------------------------------------------------------------------------------------


def _top_k(apply_fn, variables, x):
  probabilities = jax.nn.softmax(apply_fn(variables, x, train=False).astype(jnp.float32))
  return tuple(jax.lax.top_k(probabilities, min(TOP_K, probabilities.shape[-1])))


def predict(network, names, prepare, batch_size):
  """Top-k (probabilities, labels) [N, k] of every input, in batches split over the local devices."""
  devices = jax.local_devices()
  mesh = sharding.create_mesh(types.SimpleNamespace(data=-1, fsdp=1, spatial=1), devices=devices)
  if batch_size % len(devices):
    raise errors.ConfigError(f'--batch_size={batch_size} is not a multiple of the {len(devices)} local devices')
  batch_size = min(batch_size, -(-len(names) // len(devices)) * len(devices))   # few inputs: less padding
  module = network.module()
  variables = jax.device_put(network.variables, sharding.replicated(mesh))
  batch_sharding = jax.sharding.NamedSharding(
      mesh, sharding.batch_spec((batch_size, *network.inputs.input_shape), mesh, 'inputs'))
  step = jax.jit(functools.partial(_top_k, module.apply), out_shardings=(batch_sharding, batch_sharding))
  num_batches = -(-len(names) // batch_size)
  probabilities, labels = [], []
  for index in _progress(num_batches):
    rows = range(index * batch_size, min((index + 1) * batch_size, len(names)))
    batch = np.stack([prepare(i) for i in rows]).astype(np.float32)
    batch = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), np.float32)])  # pad
    top_p, top_i = jax.device_get(step(variables, jax.device_put(batch, batch_sharding)))
    probabilities.append(top_p[:len(rows)])
    labels.append(top_i[:len(rows)])
  return np.concatenate(probabilities), np.concatenate(labels)


def write_csv(path, names, probabilities, labels, class_names):
  """Writes the CSV to `path` (a local path or a URL) atomically."""
  class_name = (lambda label: class_names[label]) if class_names else str
  rows = io.StringIO(newline='')
  writer = csv.writer(rows)
  writer.writerow(['path', 'class', 'probability', 'top5_classes', 'top5_probabilities'])
  for name, p, k in zip(names, probabilities, labels):
    writer.writerow([name, class_name(k[0]), f'{p[0]:.6f}', ';'.join(class_name(label) for label in k),
                     ';'.join(f'{value:.6f}' for value in p)])
  path = run_directory.as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  run_directory.write_bytes(path, rows.getvalue())


def run():
  """The program (flags parsed); raises MplError for the user's mistakes."""
  network = trained_models.restore(FLAGS.workdir, FLAGS.model)
  logging.info('predicting with %s (%s) from %s', network.name, network.architecture, network.source)
  names, prepare = read_inputs(network.inputs)
  batch_size = FLAGS.batch_size or trained_models.run_config(FLAGS.workdir)['eval_batch_size']
  probabilities, labels = predict(network, names, prepare, batch_size)
  write_csv(FLAGS.output, names, probabilities, labels, network.inputs.class_names)
  print(f'{len(names)} predictions of {network.name} written to {FLAGS.output}', flush=True)


if __name__ == '__main__':
  app.run(cli.absl_main(run, required_flags=('workdir', 'output')))
