"""The per-host input cache: bounded, LRU, safe across threads and processes.

SimpleTasks kept downloaded inputs in a directory that was "not safe". This one
is shared by every slot (thread) of every worker process on a host:

    ROOT/entries/KEY                 a complete cached file (read-only)
    ROOT/locks/KEY.lock              flock: shared while in use, exclusive while
                                     downloading or evicting
    ROOT/tmp/KEY.UNIQUE.SIZE.part    a download in progress; its name carries the
                                     size it reserves against the bound
    ROOT/index.lock                  flock held while space is counted and reserved
    ROOT/usage                       an upper bound of the bytes held (entries plus
                                     reservations), updated under index.lock

KEY is a hash of the source (protocol, host, path) and its version as reported
by ``fs.info()`` (size plus mtime / ETag / generation), so a changed remote
file is a new entry and the old one ages out. A download goes to a temporary
name and is renamed into place, so a crash never leaves a partial entry; its
leftover temporary file is swept by the next reservation. Two slots needing the
same input at once download it once: the second waits for the first one's
exclusive lock and then finds the entry. A reservation that fits under the
``usage`` bound adds to it and counts nothing; only one that does not counts
the entries (and sweeps and evicts), then writes the true figure back, so a
directory of many small inputs costs a constant per file, not a scan of the
whole cache per file. The bound only ever errs high (a crashed download's
reservation stays in it until the next count), never lets the cache overgrow.
Eviction only takes entries whose lock it can take exclusively without
waiting, so an entry being read is never removed. Callers always get a copy
(``fetch``), never the cache file itself, because a command may modify its
inputs.

The cache directory must be on a local filesystem (flock over NFS is not
reliable).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.datastore import FileSystem, check_file, get_file, stat, translated
from worker.errors import CacheError, CancelledError, DatastoreError

# fields of fs.info() that change when a remote file changes, per backend
_VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified",
                   "last_modified", "updated")
# storage options that say *which* server a path is on (never secrets)
_WHERE_OPTIONS = ("port", "username", "endpoint_url", "project")


@dataclass(frozen=True)
class CacheEntry:
    """One complete cached file."""

    key: str
    size: int
    last_used_ns: int


class Cache:
    """A bounded LRU cache of remote input files in a local directory.

    ``wait_seconds`` bounds how long a fetch waits for another slot's download
    of the same file.
    """

    def __init__(self, root: str | Path, max_bytes: int, *, wait_seconds: float = 6 * 3600.0
                 ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.wait_seconds = wait_seconds
        self._entries = self.root / "entries"
        self._locks = self.root / "locks"
        self._tmp = self.root / "tmp"
        self._counter_lock = threading.Lock()
        self.downloads = 0  # by this Cache object: a measure for tests and metrics
        self.hits = 0
        try:
            for sub in (self._entries, self._locks, self._tmp):
                sub.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cache directory {self.root} is not usable: {exc}; "
                             "check [worker] cache_dir") from exc

    # ---- public API --------------------------------------------------------

    def fetch(self, fs: FileSystem, path: str, dest: Path,
              cancel: threading.Event | None = None) -> int:
        """Place a copy of remote ``path`` at ``dest`` through the cache; returns its size.

        Files larger than the bound, or without a version in ``fs.info()``,
        bypass the cache (downloaded straight to ``dest``).
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._hold(fs, path, cancel) as entry:
            if entry is not None:
                try:
                    shutil.copyfile(entry, dest)
                except OSError as exc:
                    raise CacheError(f"copying cached {path} to {dest}: {exc}") from exc
                return dest.stat().st_size
        size = get_file(fs, path, dest)
        self._count(download=True)
        return size

    @contextmanager
    def pin(self, fs: FileSystem, path: str, cancel: threading.Event | None = None
            ) -> Iterator[bool]:
        """Keep ``path``'s entry (fetched if needed) from eviction inside the block.

        Yields False when the file bypasses the cache (too large, unversioned,
        or no room), in which case nothing is pinned.
        """
        with self._hold(fs, path, cancel) as entry:
            yield entry is not None

    def entries(self) -> list[CacheEntry]:
        """The complete entries, least recently used first."""
        out = []
        for item in self._scan(self._entries):
            try:
                st = item.stat()
            except FileNotFoundError:  # evicted meanwhile
                continue
            out.append(CacheEntry(item.name, st.st_size, st.st_mtime_ns))
        return sorted(out, key=lambda e: (e.last_used_ns, e.key))

    def usage(self) -> int:
        """Bytes held: complete entries plus downloads in progress (reserved)."""
        with self._index():
            return sum(e.size for e in self.entries()) + self._reserved()

    def evict(self, need: int = 0) -> bool:
        """Evict unused entries, oldest first, until ``need`` more bytes fit; True if they do."""
        with self._index():
            return self._make_room(need)

    # ---- entries -----------------------------------------------------------

    @contextmanager
    def _hold(self, fs: FileSystem, path: str, cancel: threading.Event | None
              ) -> Iterator[Path | None]:
        """Yield the entry for ``path`` under a lock that keeps it from eviction."""
        with translated(f"reading metadata of {path}"):
            info = dict(stat(fs, path))  # a directory copy's listing spares the round trip
        check_file(info, path)
        size = int(info.get("size") or 0)
        key = self._key(fs, path, info)
        if key is None or size > self.max_bytes:
            yield None
            return
        entry = self._entries / key
        lock = self._locks / f"{key}.lock"
        fd: int | None = self._lock(lock, fcntl.LOCK_SH, cancel)
        try:
            if not _complete(entry, size):
                # flock cannot upgrade atomically: drop the shared lock, take the
                # exclusive one, and look again (another slot may have filled it)
                _unlock(fd)
                fd = None
                fd = self._lock(lock, fcntl.LOCK_EX, cancel)
                if _complete(entry, size):
                    self._count(download=False)
                elif not self._download(fs, path, key, size):
                    yield None
                    return
            else:
                self._count(download=False)
            now = time.time_ns()
            os.utime(entry, ns=(now, now))  # mtime is the LRU clock
            yield entry
        finally:
            _unlock(fd)

    def _download(self, fs: FileSystem, path: str, key: str, size: int) -> bool:
        """Download into the cache (exclusive lock held); False when there is no room."""
        entry = self._entries / key
        entry.unlink(missing_ok=True)  # wrong size: a stale or damaged entry
        for stale in self._tmp.glob(f"{key}.*"):  # from a crashed download of this key
            stale.unlink(missing_ok=True)
        with self._index():
            if not self._reserve(size):
                return False
            temp = self._tmp / f"{key}.{uuid.uuid4().hex}.{size}.part"
            temp.touch()  # the reservation, visible to the next _make_room
        try:
            got = get_file(fs, path, temp)
            if got != size:
                raise DatastoreError(f"{path} changed while being downloaded ({size} bytes "
                                     f"announced, {got} received); retry the task")
            with open(temp, "rb") as f:
                os.fsync(f.fileno())  # a renamed-in entry must be complete after a crash
            temp.chmod(0o444)
            os.rename(temp, entry)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._count(download=True)
        return True

    def _reserve(self, size: int) -> bool:
        """Room for ``size`` more bytes, counted into the usage bound (index lock held)."""
        bound = self._usage_bound()
        if bound is not None and bound + size <= self.max_bytes:
            self._set_usage_bound(bound + size)
            return True
        return self._make_room(size, reserve=True)

    def _make_room(self, need: int, *, reserve: bool = False) -> bool:
        """Sweep stale downloads and evict LRU entries (index lock held); the usage bound
        becomes the true figure, plus ``need`` if ``reserve`` and it fits."""
        reserved = self._reserved()
        entries = self.entries()
        total = reserved + sum(e.size for e in entries)
        for e in entries:
            if total + need <= self.max_bytes:
                break
            if self._try_remove(e.key):
                total -= e.size
        fits = total + need <= self.max_bytes
        self._set_usage_bound(total + (need if reserve and fits else 0))
        return fits

    def _usage_bound(self) -> int | None:
        try:
            return int((self.root / "usage").read_text())
        except (OSError, ValueError):  # none yet, or damaged by a crash mid-write
            return None

    def _set_usage_bound(self, value: int) -> None:
        try:
            (self.root / "usage").write_text(str(value))
        except OSError:
            pass  # a missing bound only means the next reservation counts

    def _reserved(self) -> int:
        """Bytes reserved by downloads in progress; stale ones (no owner) are removed."""
        reserved = 0
        for temp in self._scan(self._tmp):
            key, _, rest = temp.name.partition(".")
            size = rest.split(".")[-2] if rest.count(".") >= 2 else "0"
            if self._try_remove(key, entry_too=False):
                continue  # nobody holds the key: a crashed download's leftover
            reserved += int(size) if size.isdigit() else 0
        return reserved

    def _try_remove(self, key: str, entry_too: bool = True) -> bool:
        """Remove a key's files if nobody holds its lock; never waits."""
        lock = self._locks / f"{key}.lock"
        fd = self._lock(lock, fcntl.LOCK_EX, None, wait=False)
        if fd is None:
            return False
        try:
            for temp in self._tmp.glob(f"{key}.*"):
                temp.unlink(missing_ok=True)
            entry = self._entries / key
            if entry_too:
                entry.unlink(missing_ok=True)
            if not entry.exists():
                lock.unlink(missing_ok=True)  # waiters notice the new inode and retry
        finally:
            _unlock(fd)
        return True

    # ---- locks and helpers -------------------------------------------------

    def _lock(self, path: Path, mode: int, cancel: threading.Event | None, *,
              wait: bool = True) -> int | None:
        """flock ``path``; poll so that a cancel or the wait bound can interrupt."""
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.005
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, mode | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if not wait:
                            os.close(fd)
                            return None
                    if cancel is not None and cancel.is_set():
                        raise CancelledError("cancelled while waiting for a cached input")
                    if time.monotonic() > deadline:
                        raise CacheError(f"waited {self.wait_seconds:.0f} s for {path} (another "
                                         "slot's download of the same input); retry the task")
                    time.sleep(delay)
                    delay = min(delay * 2, 0.25)
                held = os.fstat(fd)
                try:
                    now = os.stat(path)
                except FileNotFoundError:
                    now = None
            except BaseException:
                os.close(fd)
                raise
            if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
                return fd
            os.close(fd)  # the lock file was removed while we waited: lock the new one

    @contextmanager
    def _index(self) -> Iterator[None]:
        fd = os.open(self.root / "index.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a directory scan only
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _key(fs: FileSystem, path: str, info: dict[str, Any]) -> str | None:
        version = {k: str(info[k]) for k in _VERSION_FIELDS if info.get(k) not in (None, "")}
        if not version:
            return None  # no way to tell a changed file: do not cache it
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        options = getattr(fs, "storage_options", {}) or {}
        where = {k: str(options[k]) for k in _WHERE_OPTIONS if k in options}
        ident = [protocol, str(getattr(fs, "host", "")), where, path, info.get("size"),
                 version, info.get("ino")]
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _scan(directory: Path) -> list[Path]:
        try:
            return [Path(e.path) for e in os.scandir(directory) if e.is_file()]
        except FileNotFoundError:
            return []

    def _count(self, *, download: bool) -> None:
        with self._counter_lock:
            if download:
                self.downloads += 1
            else:
                self.hits += 1


def _complete(entry: Path, size: int) -> bool:
    try:
        return entry.stat().st_size == size
    except FileNotFoundError:
        return False


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases its flock
