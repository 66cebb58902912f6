"""Errors that reach the user as one sentence and an exit code."""


class GrowError(Exception):
    """A failure the user can fix; the message names the file, tensor or option at fault."""

    exit_code = 1


class UsageError(GrowError):
    """An option or combination of options that cannot work."""

    exit_code = 2


class VerificationFailed(GrowError):
    """An exact method produced a target that does not match its source."""

    exit_code = 3


class GrowWarning(UserWarning):
    """Something the user should know about a result that still went through (shown on stderr, not with --quiet)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what stays on disk (the message completes "interrupted; ...")."""
