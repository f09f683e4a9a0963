"""User-facing errors: each carries one line naming the field or path at fault and how to fix it.

The programs (`main`, `predict`, `export`) catch these and exit with `USER_ERROR_EXIT_CODE` and the message alone (no
traceback), before anything in the workdir is touched where possible.
"""

import sys

USER_ERROR_EXIT_CODE = 2


def exit_with_one_line(message):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_EXIT_CODE)


class MplError(Exception):
  """Base class of the errors a user can fix without reading a traceback."""


class ConfigError(MplError):
  """A config field is unknown, of the wrong type, out of range, or contradicts another."""


class DataError(MplError):
  """A dataset, folder or file is missing, empty, unreadable or inconsistent with the config."""


class CheckpointError(MplError):
  """A checkpoint in the workdir cannot be used with this config."""


class TrainingError(MplError):
  """Training cannot go on (a non-finite loss or gradient, a lost peer)."""


class Preempted(Exception):
  """The run saved a checkpoint and stopped early on SIGTERM / a preemption notice; rerunning resumes it.

  Not an `MplError`: nothing is wrong with the user's input; `main` exits with 128 + SIGTERM (143).
  """
