"""User-facing errors.

A :class:`UserError` is a mistake in what the user asked for (a bad ``--gpus``
string, an unknown tier, a missing model folder, malformed YAML).  The CLI turns
it into one line on stderr and exit code 2, before anything is written.
"""


class UserError(Exception):
    """Bad input from the user; reported as one line, exit code 2."""

    exit_code = 2  # ExitCode.USAGE (dsplan.codes)
