"""User-facing errors: each carries one line naming the field or path at fault and how to fix it.

Every command-line program (main, predict, export, benchmark, compile_check, experiments.student_diagnosis) runs its
work inside `one_line_user_errors()`: a user's mistake ends it with `error: <the line>` on stderr and exit code
`USER_ERROR_EXIT_CODE` (no traceback), before anything in the workdir is touched where possible.
"""

import contextlib
import sys

USER_ERROR_EXIT_CODE = 2


def exit_with_one_line(message):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_EXIT_CODE)


@contextlib.contextmanager
def one_line_user_errors():
  """The programs' one convention: an `MplError` raised inside ends the program with its one line and exit 2."""
  try:
    yield
  except MplError as e:
    exit_with_one_line(str(e))


def no_positional_arguments(argv):
  """absl's `main(argv)`: the programs take flags only."""
  if len(argv) > 1:
    exit_with_one_line(f'unexpected arguments {argv[1:]}; pass settings as --flag=value')


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
