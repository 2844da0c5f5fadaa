"""The deployment's own error, and the check every one of its command lines
shares.

:class:`DeployError` is a :class:`~fedtrain.errors.UserError`: a deployment
that cannot start (Flower missing or untested, a refused key, an unreachable
coordinator) or whose run did not complete is told to the user in one line,
with what to do about it, never as a traceback.
"""

from __future__ import annotations

from fedtrain.errors import UsageError, UserError


class DeployError(UserError, RuntimeError):
    """A deployment could not start or its run did not complete."""


def check_positive(parameter: str, value: float) -> None:
    """:class:`~fedtrain.errors.UsageError` unless ``value`` (seconds, of ``parameter``) is positive."""
    if not value > 0:
        raise UsageError(f"{parameter} {value}: must be a positive number of seconds")
