"""User-facing errors.

A ``UserError`` is bad input the user can fix: the CLI prints ``error: <message>`` on one line and
exits with status 2, never a traceback. The message names the file, line or key and the fix.
"""


class UserError(Exception):
    """Bad input the user can fix; printed as one ``error:`` line, exit status 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config key, value or override is wrong."""


class DataError(UserError):
    """A dataset file, row or field is wrong."""


class CheckpointError(UserError):
    """A checkpoint or run directory is missing or unusable."""


class LaunchError(UserError):
    """A hostfile, DeepSpeed config or launch setting is wrong."""


class WriteError(UserError):
    """A file mtpeft writes could not be written: the disk is full, a quota or size limit was
    reached, or the place is read-only. Not bad input as such, but the user's to fix."""
