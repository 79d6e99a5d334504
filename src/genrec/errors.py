"""The user-error type every layer raises for bad input, so the CLI can print it as one line.

A :class:`UserError` says what is wrong in words a user can act on: the file (and line), the field
or the value to blame, and what was expected. The CLI exits with code 2 and prints the message
alone; any other exception is a bug and keeps its traceback. The data layer's ``DataError``, the
config's ``ConfigError`` and the checkpoints' ``CheckpointError`` are its subclasses.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a file, a setting, a command-line value); the message says where."""


class ConfigError(UserError):
    """A setting that is unknown, of the wrong type or outside its range; the message names the source
    (a YAML file or ``--set``), the field and the value."""
