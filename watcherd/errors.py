"""The exceptions watcherd raises on purpose.

Every error a person can act on is a :class:`WatcherdError`; the CLI prints its message as one line
and exits with its ``exit_status``. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class WatcherdError(Exception):
    """Base class: a message that names the key, file or URL at fault and what to do."""

    exit_status = 1


class ConfigError(WatcherdError):
    """The configuration (file, environment or command line) is not usable."""

    exit_status = 2


class UsageError(WatcherdError):
    """The command line asks for something that cannot be done."""

    exit_status = 2


class GitError(WatcherdError):
    """A git command failed; the message carries the command and git's own words."""


class StoreError(WatcherdError):
    """The store could not be read or written (unreachable, denied, misconfigured)."""


class StoreUnavailable(StoreError):
    """A transient store failure: the same call may succeed later (network, 5xx, throttling)."""


class PreconditionFailed(StoreError):
    """A conditional write lost: the object exists, or changed since it was read."""


class ObjectMissing(StoreError):
    """An object the store was asked for does not exist."""


class IntegrityError(WatcherdError):
    """Stored data is corrupt: wrong checksum or size, unparsable manifest, unclonable bundle."""


class BundleTooLarge(WatcherdError):
    """A bundle is above ``store.max_bundle_size``; it is not uploaded."""


class ConflictError(WatcherdError):
    """A save was not a fast-forward of the stored history; it was kept under ``conflicts/``."""

    exit_status = 3

    def __init__(self, message: str, conflict_name: str | None = None,
                 snapshot: str | None = None) -> None:
        super().__init__(message)
        self.conflict_name = conflict_name
        self.snapshot = snapshot


class RestoreError(WatcherdError):
    """The workspace could not be restored."""


class WorkspaceError(WatcherdError):
    """The workspace path is missing, not a directory, or otherwise unusable."""


class WorkspaceNotFound(WorkspaceError):
    """``workspace.path`` does not exist, or is not a directory, when a command starts.

    Exit status 2, unlike the other workspace errors: a person must fix the config or the
    mounts, and a supervisor that restarts the command would only loop.
    """

    exit_status = 2
