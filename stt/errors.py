"""The errors stt raises for input it cannot use, and which exceptions count as such (imports nothing of stt).

A user error (bad data, bad config, bad checkpoint, bad option) ends a command with one line (stt.command):
exit status 2 for a UsageError, 130 for an InterruptedRun, 1 for the others of USER_ERRORS. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import threading

import yaml


class UsageError(ValueError):
    """A command-line option or config value outside what is accepted: exit status 2."""


class InterruptedRun(RuntimeError):
    """A long run stopped before it finished (Ctrl-C, SIGTERM): its finished work is kept."""


class StorageError(OSError):
    """An object store that cannot be reached or refuses the request (network, credentials, endpoint).

    `abandoned`: the thread of a request that never answered (stt.storage.contact). pyarrow cannot cancel
    it, and its S3 support waits at interpreter exit for requests in flight, so stt.command.run ends the
    process at once.
    """

    def __init__(self, message: str, abandoned: threading.Thread | None = None):
        super().__init__(message)
        self.abandoned = abandoned


# Raised by stt for input it cannot use; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,
    KeyError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    yaml.YAMLError,
    InterruptedRun,
    StorageError,
)
