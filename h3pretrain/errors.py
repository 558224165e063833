"""The one error path for expected failures.

Anything a user can get wrong (a setting, a file, a directory made by another run) raises a
`UserError` subclass with one line that names the setting or file. The CLI prints it as
`h3pretrain <command>: error: <message>` and exits with EXIT_USAGE; any other exception is a bug
and keeps its traceback. This module imports nothing so that every layer can use it.
"""
from __future__ import annotations

EXIT_USAGE = 2


class UserError(ValueError):
    """An expected failure caused by an input; its message is shown to the user as it is."""


class InputFileError(UserError):
    """A file or directory given by the user is missing, of the wrong kind, or damaged."""
