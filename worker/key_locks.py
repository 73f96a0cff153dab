"""Shared and exclusive locks on many keys (strings), across threads and processes.

The input cache (worker/cache.py) locks every input it holds: shared while a
slot reads it, exclusive while one downloads or evicts it. A lock file per key
cost a create and an open per input of a cold directory of 10,000; here a key's
lock is a Linux open-file-description lock on one byte of a single file, at an
offset hashed from the key (two keys on one byte, a chance of one in 2**56,
would only wait for each other). A dead process's locks go with it. Linux only
(F_OFD_SETLK), on a local filesystem.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import threading
import weakref
from pathlib import Path

_FLOCK = struct.Struct("@hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid


class KeyLocks:
    """Shared and exclusive locks on keys: Linux open-file-description locks on one
    byte each of one file. Each holder takes its own open file description from a
    pool, so that holders in one process exclude each other as processes do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._free: list[int] = []
        self._mutex = threading.Lock()
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
        weakref.finalize(self, _close_all, self._free)

    def try_lock(self, key: str, exclusive: bool) -> int | None:
        """The descriptor holding ``key``'s lock, or None if a conflicting one is held."""
        with self._mutex:
            fd = self._free.pop() if self._free else None
        if fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                        _flock(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, key))
        except OSError as exc:
            self._release(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        except BaseException:
            self._release(fd)
            raise
        return fd

    def unlock(self, fd: int, key: str) -> None:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, key))
        except OSError:
            os.close(fd)  # closing the last descriptor of a description drops its locks
            return
        self._release(fd)

    def _release(self, fd: int) -> None:
        with self._mutex:
            self._free.append(fd)


def _flock(kind: int, key: str) -> bytes:
    offset = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "big")
    return _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())
