"""A trained teacher's stored targets for Reduced Meta Pseudo Labels (Pham et al., App. E): files, loading, the join.

`experiments/precompute_targets.py` writes them once; a run with `mpl.teacher='reduced'` reads them
(`reduced.targets_dir`), and `joined_batches` hands the reduced teacher T_R each unlabeled example's targets.

A targets directory (any `etils.epath` path, so gs:// works) holds
  targets.json            what was stored: the teacher (its source and network), class count, top-k, the number of
                          unlabeled examples, the chunk size, the dataset fields that define the unlabeled pool;
  chunk-<c>.npz           chunk c: the unlabeled pool's examples [c S, (c+1) S) in pool order (S = chunk_size):
                          ids (int64, `Pipeline.unlabeled_ids`), top_log_probs (float16 [S, k]), top_classes (uint16
                          when C <= 65536, else int32) and rest_mass (float16 [S]): models/reduced_teacher.py's form,
                          4k + 2 bytes per image (k = 8: 34 bytes; 130M images: 4.4 GB).
On n hosts, host i writes the chunks c = i mod n (each host its own shard of the pool). Each file is written to a
temporary name and renamed, so a file that exists is complete: a killed precompute, rerun, keeps every finished
chunk and writes only the others (the same bytes: the teacher's forward is deterministic in evaluation mode).

The join: the ids of the unlabeled pool are increasing (pool order), so an example's targets are found by binary
search of its id; the batch of step s carries the ids the pipeline drew for s (a pure function of seed and s), so
the joined batch is the same in a resumed run as in an uninterrupted one. The targets are held in host memory
(4k + 2 bytes per image, int64 id included: 4k + 10).
"""

import io
import json
import zipfile
from typing import Any, Iterator

from etils import epath
import numpy as np

from meta_pseudo_labels import errors
from meta_pseudo_labels.models import reduced_teacher

METADATA_FILENAME = 'targets.json'
FORMAT_VERSION = 1
# The dataset fields that define the unlabeled pool and its ids: a precompute and a training run must agree on them.
POOL_FIELDS = ('source', 'name', 'data_dir', 'train_split', 'num_labeled', 'num_validation', 'num_unlabeled',
               'split_seed', 'unlabeled_source')


def chunk_path(directory, chunk) -> epath.Path:
  return epath.Path(directory) / f'chunk-{chunk:06d}.npz'


def num_chunks(num_examples, chunk_size) -> int:
  return -(-num_examples // chunk_size)


def pool_description(dataset_config) -> dict:
  return {field: getattr(dataset_config, field) for field in POOL_FIELDS}


def write_atomically(path: epath.Path, data: bytes):
  """`data` to `path` through a temporary name and a rename: `path` exists only once complete."""
  partial = path.parent / f'{path.name}.partial'
  partial.write_bytes(data)
  partial.replace(path)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
  """An .npz (np.load reads it) whose bytes depend on the arrays alone: np.savez stamps each member with the
  current time, so a resumed precompute would not reproduce a file byte for byte."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as archive:
    for name, array in arrays.items():
      member = io.BytesIO()
      np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
      archive.writestr(zipfile.ZipInfo(f'{name}.npy', date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
  return buffer.getvalue()


def write_chunk(directory, chunk, ids, targets):
  """Chunk `chunk`: `ids` [S] and the stored targets (reduced_teacher.top_k_targets, numpy) of those examples."""
  classes = np.asarray(targets['top_classes'])
  class_dtype = np.uint16 if classes.max(initial=0) < 2**16 else np.int32
  write_atomically(chunk_path(directory, chunk), npz_bytes({
      'ids': np.asarray(ids, np.int64), 'top_log_probs': np.asarray(targets['top_log_probs'], np.float16),
      'top_classes': classes.astype(class_dtype), 'rest_mass': np.asarray(targets['rest_mass'], np.float16)}))


def read_metadata(directory) -> dict:
  if not directory:
    raise errors.DataError('reduced.targets_dir: empty; mpl.teacher=reduced reads a trained teacher\'s stored '
                           'targets: write them with --config.experiment=precompute_targets --workdir=DIR, then set '
                           '--config.reduced.targets_dir=DIR')
  path = epath.Path(directory) / METADATA_FILENAME
  if not path.exists():
    raise errors.DataError(f'reduced.targets_dir={directory}: no stored targets there ({METADATA_FILENAME} is '
                           'missing); write them first with --config.experiment=precompute_targets '
                           f'--workdir={directory}')
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise errors.DataError(f'{path}: unreadable ({e}); run the precompute again into a new directory') from None


def write_metadata(directory, metadata):
  """Writes targets.json, or checks that the one there describes the same targets (a resumed precompute)."""
  path = epath.Path(directory) / METADATA_FILENAME
  if path.exists():
    existing = json.loads(path.read_text())
    changed = sorted(key for key in set(existing) | set(metadata) if existing.get(key) != metadata.get(key))
    if changed:
      raise errors.ConfigError(f'{directory} holds targets of another precompute (differing: {", ".join(changed)}); '
                               'use a new --workdir, or the same teacher and config to resume')
    return
  write_atomically(path, json.dumps(metadata, indent=2, sort_keys=True).encode())


class StoredTargets:
  """All stored targets of the unlabeled pool, in pool order, and their lookup by example id."""

  def __init__(self, ids, arrays):
    self.ids = ids                 # int64 [N], increasing
    self.arrays = arrays           # {key of reduced_teacher.TARGET_KEYS: [N, ...]}

  def lookup(self, ids) -> dict[str, np.ndarray]:
    """The targets of examples `ids` (any shape [M]), as the MPL batch carries them (top_classes as int32)."""
    ids = np.asarray(ids, np.int64)
    rows = np.searchsorted(self.ids, ids)
    found = (rows < len(self.ids)) & (self.ids[np.minimum(rows, len(self.ids) - 1)] == ids)
    if not found.all():
      raise errors.DataError(f'stored targets: no targets for unlabeled example id(s) {ids[~found][:5].tolist()}; '
                             'the targets were computed for another unlabeled split: run the precompute again')
    return {'top_log_probs': self.arrays['top_log_probs'][rows],
            'top_classes': self.arrays['top_classes'][rows].astype(np.int32),
            'rest_mass': self.arrays['rest_mass'][rows]}


def load(directory, *, pool_ids, num_classes, top_k) -> StoredTargets:
  """The targets in `directory`, checked against the run: its unlabeled pool (`pool_ids`, in pool order), class
  count and top-k. Every mismatch is a one-line DataError naming the difference and the fix."""
  metadata = read_metadata(directory)
  if metadata.get('format') != FORMAT_VERSION:
    raise errors.DataError(f'{directory}: targets format {metadata.get("format")!r}, this version reads '
                           f'{FORMAT_VERSION}; run the precompute again')
  if metadata['num_classes'] != num_classes:
    raise errors.DataError(f'{directory}: the stored targets have {metadata["num_classes"]} classes, '
                           f'dataset.num_classes is {num_classes}; use targets of a teacher of this dataset')
  if metadata['top_k'] != top_k:
    raise errors.DataError(f'{directory}: the stored targets keep the top {metadata["top_k"]} classes, '
                           f'reduced.top_k is {top_k}; set --config.reduced.top_k={metadata["top_k"]}')
  if metadata['num_examples'] != len(pool_ids):
    raise errors.DataError(f'{directory}: targets of {metadata["num_examples"]} unlabeled examples, this run\'s '
                           f'unlabeled split has {len(pool_ids)}; use the dataset fields of the precompute '
                           f'({metadata.get("pool")}) or precompute for this split')
  total = num_chunks(metadata['num_examples'], metadata['chunk_size'])
  missing = [c for c in range(total) if not chunk_path(directory, c).exists()]
  if missing:
    raise errors.DataError(f'{directory}: {len(missing)} of {total} target files missing (first: '
                           f'{chunk_path(directory, missing[0]).name}); the precompute did not finish: rerun it')
  parts = {key: [] for key in ('ids',) + reduced_teacher.TARGET_KEYS}
  for c in range(total):
    with chunk_path(directory, c).open('rb') as f:
      with np.load(io.BytesIO(f.read())) as chunk:
        for key in parts:
          parts[key].append(chunk[key])
  arrays = {key: np.concatenate(values) for key, values in parts.items()}
  ids = arrays.pop('ids')
  if not np.array_equal(ids, np.asarray(pool_ids, np.int64)):
    first = int(np.flatnonzero(ids != pool_ids)[0])
    raise errors.DataError(f'{directory}: the stored example ids differ from this run\'s unlabeled split (first at '
                           f'position {first}: {ids[first]} vs {pool_ids[first]}); the dataset fields differ from the '
                           f'precompute\'s ({metadata.get("pool")}): use those, or precompute for this split')
  return StoredTargets(ids, arrays)


def joined_batches(batches: Iterator[dict[str, Any]], targets: StoredTargets) -> Iterator[dict[str, Any]]:
  """Reduced MPL batches from MPL batches with `unlabeled_index`: the index replaced by the stored targets of those
  examples (`unlabeled_targets`), the weak view dropped (T_R reads no image)."""
  for batch in batches:
    batch = dict(batch)
    ids = batch.pop('unlabeled_index')
    del batch['unlabeled_weak']
    batch['unlabeled_targets'] = targets.lookup(ids)
    yield batch
