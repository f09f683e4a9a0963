"""What the small programs that use a trained run (`predict`, `export`) share: absl's main, one-line errors."""

from absl import app
from absl import flags

from meta_pseudo_labels import errors
from meta_pseudo_labels.rundir import checkpoint


def absl_main(run, required_flags):
  """An absl `main(argv)` calling `run()` once the `required_flags` are given; a user's mistake (an MplError)
  ends the program with one line and exit code 2, as `main` does for training."""

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {argv[1:]}')
    checkpoint.quiet_orbax_logs()
    try:
      for flag in required_flags:
        if not flags.FLAGS[flag].value:
          raise errors.ConfigError(f'--{flag} is required')
      run()
    except errors.MplError as e:
      errors.exit_with_one_line(str(e))
  return main
