"""Exceptions that map onto the CLI's exit codes.

`BadInputError` means the user can fix the call (exit code 2); every message is one line that names the
problem and the fix. Anything else that escapes a command is a runtime failure (exit code 1).
"""

from __future__ import annotations


class MimprobeError(Exception):
    """Base class of mimprobe's own errors: a one-line message, no traceback needed."""

    exit_code = 1


class BadInputError(MimprobeError, ValueError):
    """The input (a path, a name, an option, a file's content) is wrong; the message says how to fix it."""

    exit_code = 2


class CheckpointError(BadInputError):
    """A checkpoint cannot be read safely or does not fit the model."""


class BadImageError(BadInputError):
    """An image file cannot be decoded."""


class DownloadError(BadInputError):
    """Pretrained weights could not be fetched (no network, unknown tag): the user fixes it by giving the file or
    network access (exit code 2)."""
