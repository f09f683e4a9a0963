"""What the small programs that use a trained run (`predict`, `export`) share: absl's main, one-line errors."""

from absl import flags

from meta_pseudo_labels import errors
from meta_pseudo_labels.rundir import checkpoint


def absl_main(run, required_flags):
  """An absl `main(argv)` calling `run()` once the `required_flags` are given; a user's mistake (an MplError)
  ends the program with one line and exit code 2, as `main` does for training."""

  def main(argv):
    errors.no_positional_arguments(argv)
    checkpoint.quiet_orbax_logs()
    with errors.one_line_user_errors():
      for flag in required_flags:
        if not flags.FLAGS[flag].value:
          raise errors.ConfigError(f'--{flag} is required')
      run()
  return main
