"""User-facing errors: each carries one line naming the field or path at fault and how to fix it.

`main` catches these and exits non-zero with the message alone (no traceback), before anything in the workdir is
touched where possible.
"""


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
