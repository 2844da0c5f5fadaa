"""The errors a user can fix, as one family.

``fedtrain``'s command line prints a :class:`UserError` as one line and exits
with code 2; any other exception is a bug (ours or a plug-in's) and keeps its
traceback, exit code 1. Each subclass also derives from the builtin it
refines, so ``except ValueError`` / ``except FileNotFoundError`` still work.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can correct: the message names the parameter, the
    value and what is allowed."""


class UsageError(UserError, ValueError):
    """A command line that does not make sense (flags that exclude each other, a missing one)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ExistingFileError(UserError, FileExistsError):
    """A file or folder the user named exists and would be overwritten."""


class DataError(UserError, ValueError):
    """A data set (a file or a plug-in's arrays) that cannot be used as it is."""
