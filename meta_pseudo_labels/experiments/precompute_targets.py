r"""Precomputes a trained teacher's targets on the unlabeled pool, for Reduced Meta Pseudo Labels (App. E, step 2).

    python -m meta_pseudo_labels.main --config=CONFIG --config.experiment=precompute_targets \
        --config.reduced.teacher=TEACHER_WORKDIR[:network] --workdir=TARGETS_DIR

CONFIG is the Reduced MPL run's own config: its dataset fields define the unlabeled pool whose images the teacher
labels (the training run checks that they match). The teacher is any network `trained/trained_models.py` loads: a
workdir's final network ('W'), a named one ('W:model_ema', 'W:teacher', 'W:student_finetuned', ...) or an exported
directory; it must have the config's classes and input shape. Each image is seen once, without augmentation, in
evaluation mode; its distribution is stored in the compact form of models/reduced_teacher.py.

Files, resume and hosts: trained/teacher_targets.py. Rerunning the same command after a kill skips the finished
chunks (their images are still read by the input pipeline, but not run through the teacher). A progress line with
the rate, the time left and the stored form's measured error (total variation against the teacher's full
distribution, mean and max so far) is logged after every chunk, and the error of the whole run printed at the end.
The teacher runs on one device per host.
"""

import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from meta_pseudo_labels import errors
from meta_pseudo_labels.data import input_pipeline
from meta_pseudo_labels.models import reduced_teacher
from meta_pseudo_labels.trained import teacher_targets
from meta_pseudo_labels.trained import trained_models


def _check_inputs(network, config, pipeline):
  if tuple(network.inputs.input_shape) != tuple(pipeline.input_shape):
    raise errors.ConfigError(f'reduced.teacher={config.reduced.teacher}: the teacher takes inputs of shape '
                             f'{tuple(network.inputs.input_shape)}, this config makes {tuple(pipeline.input_shape)}; '
                             'set dataset.image_size to the teacher\'s')
  if (network.inputs.mean, network.inputs.std) != (pipeline.input_spec.mean, pipeline.input_spec.std):
    logging.warning('The teacher was trained with channel statistics %s / %s, this config\'s images are normalised '
                    'with %s / %s (another split of the same data?)', network.inputs.mean, network.inputs.std,
                    pipeline.input_spec.mean, pipeline.input_spec.std)


def run(config, workdir):
  """Writes the targets of `config.reduced.teacher` on `config`'s unlabeled pool into `workdir`; returns the
  number of chunks this host computed (0 when all of its chunks were already there)."""
  if not config.reduced.teacher:
    raise errors.ConfigError('reduced.teacher: empty; name the trained teacher, e.g. '
                             '--config.reduced.teacher=/path/to/workdir:model_ema')
  top_k, chunk_size = int(config.reduced.top_k), int(config.reduced.chunk_size)
  if not 1 <= top_k <= config.dataset.num_classes or chunk_size < 1:
    raise errors.ConfigError(f'reduced.top_k={top_k} must be in [1, dataset.num_classes] and reduced.chunk_size='
                             f'{chunk_size} at least 1')
  network = trained_models.load(config.reduced.teacher)
  if network.num_classes != config.dataset.num_classes:
    raise errors.ConfigError(f'reduced.teacher={config.reduced.teacher}: the teacher has {network.num_classes} '
                             f'classes, dataset.num_classes is {config.dataset.num_classes}; use a teacher of this '
                             'dataset')
  host, hosts = jax.process_index(), jax.process_count()
  pipeline = input_pipeline.create(config, process_index=host, process_count=hosts)
  _check_inputs(network, config, pipeline)
  pool_ids = pipeline.unlabeled_ids()
  total = teacher_targets.num_chunks(len(pool_ids), chunk_size)
  directory = teacher_targets.epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  metadata = {'format': teacher_targets.FORMAT_VERSION, 'teacher': network.source, 'network': network.name,
              'num_classes': network.num_classes, 'top_k': top_k, 'num_examples': len(pool_ids),
              'chunk_size': chunk_size, 'pool': teacher_targets.pool_description(config.dataset)}
  if host == 0:
    teacher_targets.write_metadata(directory, metadata)

  module, device = network.module(), jax.local_devices()[0]
  variables = jax.device_put(network.variables, device)

  @jax.jit
  def predict(variables, images):
    """The stored form of the teacher's distributions, and its error: TV(p_T, p_hat) per image."""
    logits = module.apply(variables, images, train=False)
    targets = reduced_teacher.top_k_targets(logits, top_k)
    stored = reduced_teacher.stored_distribution(targets, network.num_classes)
    return targets, 0.5 * jnp.abs(jax.nn.softmax(logits, axis=-1) - stored).sum(-1)

  mine = [c for c in range(host, total, hosts)]
  todo = [c for c in mine if not teacher_targets.chunk_path(directory, c).exists()]
  logging.info('precompute: %d unlabeled images, %d chunks of %d; this host (%d of %d) has %d, %d left to compute',
               len(pool_ids), total, chunk_size, host, hosts, len(mine), len(todo))
  start, done, worst_tv, tv_sum, tv_count = time.monotonic(), 0, 0.0, 0.0, 0
  batches = pipeline.unlabeled_eval_batches(chunk_size * hosts)
  for batch_index, batch in enumerate(batches):
    chunk = batch_index * hosts + host
    if chunk >= total or teacher_targets.chunk_path(directory, chunk).exists():
      continue
    keep = batch['mask'] > 0
    ids = batch['index'][keep]
    expected = pool_ids[chunk * chunk_size:(chunk + 1) * chunk_size]
    if not np.array_equal(ids, expected):   # the pipeline's pool order is what the join relies on
      raise errors.DataError(f'precompute: chunk {chunk} holds ids {ids[:3]}..., the pool order says '
                             f'{expected[:3]}...; the input pipeline is not deterministic here')
    targets, tv = jax.device_get(predict(variables, jax.device_put(batch['image'], device)))
    teacher_targets.write_chunk(directory, chunk, ids, {key: value[keep] for key, value in targets.items()})
    done += 1
    worst_tv = max(worst_tv, float(tv[keep].max()))
    tv_sum, tv_count = tv_sum + float(tv[keep].sum()), tv_count + len(ids)
    elapsed = time.monotonic() - start
    rate = done * chunk_size / elapsed
    logging.info('precompute: chunk %d (%d/%d of this host), %.0f images/s, %.0f s left; stored form vs T\'s full '
                 'distribution: total variation mean %.2g, max %.2g', chunk, done, len(todo), rate,
                 (len(todo) - done) * chunk_size / rate, tv_sum / tv_count, worst_tv)
  error = (f'; total variation of the stored form vs the full distribution: mean {tv_sum / tv_count:.2g}, max '
           f'{worst_tv:.2g}' if tv_count else '')
  print(f'Targets of {network.source} ({network.name}) for {len(pool_ids)} unlabeled images: {directory} '
        f'({done} chunk(s) computed by this host, {len(mine) - len(todo)} kept{error})', flush=True)
  return done
