"""Test-only launcher: `python tests/fake_gcs.py <module> <flags>` runs a program with `gs://` served from a folder.

`gs://bucket/path` is the file FAKE_GCS_ROOT/bucket/path, reachable only through the URL: the program is given
`gs://` workdirs and never the folder, so any code that turned the URL into a local path (`os.path.abspath`,
`open`, `os.path.*` on 'gs://...') would write under its working directory instead, or fail, and the test sees it.
The folder outlives every process, so a run killed with SIGKILL is resumed by the next process, as a preempted
TPU pod resumes from its bucket.

Why it stands for GCS: the code under test runs its gs:// branches, not its local ones.
- `etils.epath` resolves `gs://` to its fsspec backend (EPATH_USE_TF=false; with TensorFlow installed it would use
  `tf.io.gfile`, whose GCS client cannot be pointed at a fake) and fsspec's 'gs' / 'gcs' protocols are registered
  to `FolderBucket`: every `epath.Path('gs://...')` call of this package and of orbax goes there.
- orbax keeps its GCS logic (no atomic rename on an object store: a step is finalised by `commit_success.txt`, as
  on a real bucket); only the bytes below it move elsewhere: TensorStore's `gcs` kvstore spec is replaced by a
  `file` kvstore on the same folder (`gcs_utils.get_kvstore_for_gcs`), and the bucket reports a flat namespace
  (`is_hierarchical_namespace_enabled`, which would ask the GCS API).
- TensorBoard event files are written by TensorFlow's C++ file systems: `tf.summary.create_file_writer` is given
  the folder for a gs:// logdir.

What it cannot prove: GCS's consistency and latency, authentication and permissions, TensorFlow's and TensorStore's
own GCS clients, the behaviour of a rename on a real bucket (copy + delete), and several hosts writing one checkpoint
at once (multi-host runs are tests/test_multihost.py's, on local folders).
"""

import os
import runpy
import sys

import fsspec
from fsspec.implementations import dirfs
from fsspec.implementations import local

ROOT_ENV = 'FAKE_GCS_ROOT'
PREFIXES = ('gs://', 'gcs://')


def _root():
  return os.environ[ROOT_ENV]


def local_path(url):
  """The folder's file behind `url` (for the test's own checks, never for the program)."""
  for prefix in PREFIXES:
    if url.startswith(prefix):
      return os.path.join(_root(), url[len(prefix):])
  raise ValueError(f'{url} is not a gs:// URL')


class FolderBucket(dirfs.DirFileSystem):
  """fsspec's 'gs' protocol over the folder FAKE_GCS_ROOT (paths are returned as 'bucket/...', as gcsfs does)."""
  protocol = ('gs', 'gcs')

  def __init__(self, *args, finalize_on_close=None, **kwargs):
    del args, finalize_on_close, kwargs   # gcsfs options epath passes
    super().__init__(path=_root(), fs=local.LocalFileSystem(auto_mkdir=True))

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in PREFIXES:
      if path.startswith(prefix):
        return path[len(prefix):]
    return path


def install():
  os.environ['EPATH_USE_TF'] = 'false'
  for protocol in FolderBucket.protocol:
    fsspec.register_implementation(protocol, FolderBucket, clobber=True)

  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top

  def file_kvstore(ckpt_path):
    return {'driver': 'file', 'path': local_path(os.fspath(ckpt_path))}
  gcs_utils.get_kvstore_for_gcs = file_kvstore
  gcs_utils.is_hierarchical_namespace_enabled = lambda path: False

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  create_file_writer = tf.summary.create_file_writer

  def create_file_writer_on_the_folder(logdir, *args, **kwargs):
    logdir = os.fspath(logdir)
    return create_file_writer(local_path(logdir) if logdir.startswith(PREFIXES) else logdir, *args, **kwargs)
  tf.summary.create_file_writer = create_file_writer_on_the_folder


if __name__ == '__main__':
  install()
  module = sys.argv[1]
  sys.argv = [module, *sys.argv[2:]]
  runpy.run_module(module, run_name='__main__', alter_sys=True)
