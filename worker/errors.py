"""Errors raised by the worker's execution side.

    EcloudError (protocol.errors)
    └── WorkerError              base of every worker error; the message is for the user
        ├── DatastoreError       a bucket is unknown, a URL cannot be opened, a copy failed
        │   ├── MissingExtraError    s3:// or gs:// without s3fs / gcsfs installed
        │   └── RemoteNotFoundError  the remote object or directory does not exist
        ├── CacheError           the input cache directory is unusable or a wait timed out
        ├── StagingError         stage-in or stage-out of one task failed (task, path, cause)
        ├── PathError            an internal path is invalid or escapes the work directory
        ├── ExecutionError       a command could not be started
        ├── ContainerError       the container runtime is missing or failed
        └── CancelledError       the attempt was cancelled while waiting or copying

Foreign errors (OSError, paramiko and fsspec errors) are translated where they
happen and chained (``raise DatastoreError(...) from exc``), so the cause stays
in the traceback for debugging while the message stays readable.
"""

from __future__ import annotations

from protocol.errors import EcloudError


class WorkerError(EcloudError):
    """Base of every worker error; its message names what, where and what to do."""


class DatastoreError(WorkerError):
    """A bucket is unknown, a datastore URL cannot be opened, or a transfer failed."""


class MissingExtraError(DatastoreError):
    """The URL scheme needs an optional package (``pip install ecloud[s3]`` / ``[gs]``)."""


class RemoteNotFoundError(DatastoreError):
    """The remote file or directory does not exist."""


class CacheError(WorkerError):
    """The input cache directory is unusable, or waiting for another download timed out."""


class StagingError(WorkerError):
    """Staging one task's inputs in or outputs out failed."""


class PathError(WorkerError):
    """An internal path is not valid here, or resolves outside the work directory."""


class ExecutionError(WorkerError):
    """A command could not be started (program not found, not executable, bad cwd)."""


class ContainerError(WorkerError):
    """The container runtime is missing, misconfigured, or failed to run the image."""


class CancelledError(WorkerError):
    """The attempt was cancelled (by the boss or the worker shutting down)."""
