"""The per-host input cache: bounded, LRU, safe across threads and processes.

SimpleTasks kept downloaded inputs in a directory that was "not safe". This one
is shared by every slot (thread) of every worker process on a host:

    ROOT/entries/KEY                  a complete cached file (read-only)
    ROOT/keys.lock                    the keys' locks: one byte each (see below),
                                      shared while in use, exclusive while
                                      downloading or evicting
    ROOT/tmp/KEY.UNIQUE.SIZE.part     a download in progress, or room reserved for a
                                      batch of them; the name carries the size it
                                      reserves against the bound
    ROOT/tmp/KEY.UNIQUE.part          a download inside room a batch reserved
    ROOT/index.lock                   flock held while space is counted and reserved
    ROOT/usage                        an upper bound of the bytes held (entries plus
                                      reservations), updated under index.lock
    ROOT/boot                         the boot during which entries were added
                                      without an fsync

KEY is a hash of the source (protocol, host, path) and its version as reported
by ``fs.info()`` (size plus mtime / ETag / generation), so a changed remote
file is a new entry and the old one ages out. A download goes to a temporary
name and is renamed into place, so a crash never leaves a partial entry; its
leftover temporary file is swept by the next count of the space. Two slots
needing the same input at once download it once: the second waits for the
first one's exclusive lock and then finds the entry. A reservation that fits
under the ``usage`` bound adds to it and counts nothing; only one that does not
counts the entries (and sweeps and evicts), then writes the true figure back.
Inside :meth:`Cache.batch` (a directory input) downloads draw on room reserved
a chunk at a time, so a directory of many small inputs takes the index lock a
few times, not once per file; what a batch leaves unused is given back when it
ends. The bound only ever errs high (a crashed download's reservation stays in
it until the next count), never lets the cache overgrow. Eviction only takes
entries whose lock it can take exclusively without waiting, so an entry being
read is never removed.

A key's lock is a Linux open-file-description lock on one byte of
ROOT/keys.lock, at an offset hashed from the key: a cold directory of 10,000
inputs creates no lock file per input, each holder uses its own open file
description (so threads of one process exclude each other as processes do),
and a dead process's locks go with it. Two keys on one byte (56-bit offsets)
would only wait for each other.

An entry is renamed into place without an fsync (one per small file cost more
than its download). Until the kernel stops, the page cache keeps such a file
whole whatever has reached the disk; only a crash of the machine can leave one
partial, and after a crash the kernel has a new boot id. So the first entry
added without an fsync in a boot first records that boot in ROOT/boot (with an
fsync), and a cache that finds another boot recorded there drops every entry
and reservation before anything uses them: after a reboot the cache starts
empty, never with an entry that may be partial. Where the boot id cannot be
read, every entry is fsynced before it is renamed in.

Callers always get a copy (``fetch``), never the cache file itself, because a
command may modify its inputs: a clone of the entry's blocks (FICLONE) where
the filesystem shares blocks copy-on-write, else an in-kernel copy
(copy_file_range). A hard link would let a command write through to the entry.

The cache directory must be on a local filesystem (locks over NFS are not
reliable).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.datastore import FileSystem, check_file, get_file, stat, translated
from worker.errors import CacheError, CancelledError, DatastoreError
from worker.key_locks import KeyLocks

# fields of fs.info() that change when a remote file changes, per backend
_VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified",
                   "last_modified", "updated")
# storage options that say *which* server a path is on (never secrets)
_WHERE_OPTIONS = ("port", "username", "endpoint_url", "project")
CHUNK_BYTES = 64 << 20  # room a batch reserves at once, at most (a 16th of the bound at most)
BOOT_ID = "/proc/sys/kernel/random/boot_id"
_FICLONE = 0x40049409  # linux/fs.h: make the target share the source's blocks
_NO_CLONE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
             errno.EBADF, errno.EPERM)


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
        self._tmp = self.root / "tmp"
        self._counter_lock = threading.Lock()
        self.downloads = 0  # by this Cache object: a measure for tests and metrics
        self.hits = 0
        self._chunk = max(1, min(CHUNK_BYTES, max_bytes // 16))
        self._credit = _Credit()
        self._clone = True  # until the filesystem refuses once
        self._boot = _boot_id()
        try:
            for sub in (self._entries, self._tmp):
                sub.mkdir(parents=True, exist_ok=True)
            self._keys = KeyLocks(self.root / "keys.lock")
            with self._index():
                self._check_boot()
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
        with self._hold(fs, path, cancel) as entry:
            if entry is not None:
                try:
                    return self._copy(entry, dest)
                except OSError as exc:
                    raise CacheError(f"copying cached {path} to {dest}: {exc}") from exc
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

    @contextmanager
    def batch(self, total: int) -> Iterator[None]:
        """Let the downloads inside the block, from any thread, reserve room together.

        ``total`` is the most the batch may download (a directory's listed
        bytes); room is reserved a chunk at a time as downloads need it, and
        what is left unused goes back to the bound when the last batch ends.
        """
        with self._credit.mutex:
            self._credit.batches += 1
            self._credit.left += max(0, total)
        try:
            yield
        finally:
            with self._credit.mutex:
                self._credit.batches -= 1
                if self._credit.batches == 0:
                    self._credit.left = 0
                    if self._credit.pending == 0:
                        self._give_back()

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
              ) -> Iterator[str | None]:
        """Yield the entry for ``path`` under a lock that keeps it from eviction."""
        with translated(f"reading metadata of {path}"):
            info = stat(fs, path)  # a directory copy's listing spares the round trip
        check_file(info, path)
        size = int(info.get("size") or 0)
        key = self._key(fs, path, info)
        if key is None or size > self.max_bytes:
            yield None
            return
        entry = os.path.join(self._entries, key)
        # a complete entry is read under a shared lock; a missing one is filled under an
        # exclusive one (locks cannot be upgraded atomically: drop, take, look again)
        exclusive = _size_of(entry) != size
        fd: int | None = self._lock(key, exclusive, cancel, path)
        try:
            while True:
                found = _size_of(entry)
                if found == size:
                    self._count(download=False)
                    now = time.time_ns()
                    os.utime(entry, ns=(now, now))  # mtime is the LRU clock
                    yield entry
                    return
                if exclusive:
                    break
                assert fd is not None
                self._keys.unlock(fd, key)  # evicted or damaged since the look
                fd = None
                exclusive = True
                fd = self._lock(key, True, cancel, path)
            if found is not None:  # wrong size: a stale or damaged entry
                _unlink(entry)
            if not self._download(fs, path, key, size):
                yield None
                return
            yield entry  # just written: its mtime is already now
        finally:
            if fd is not None:
                self._keys.unlock(fd, key)

    def _download(self, fs: FileSystem, path: str, key: str, size: int) -> bool:
        """Download into the cache (exclusive lock held); False when there is no room."""
        unique = uuid.uuid4().hex
        drawn = self._draw(size)
        if drawn:
            temp = self._tmp / f"{key}.{unique}.part"  # the batch's room file counts it
        else:
            with self._index():
                if not self._reserve(size):
                    return False
                temp = self._tmp / f"{key}.{unique}.{size}.part"
                temp.touch()  # the reservation, visible to the next _make_room
        try:
            got = get_file(fs, path, temp, in_place=True)
            if got != size:
                raise DatastoreError(f"{path} changed while being downloaded ({size} bytes "
                                     f"announced, {got} received); retry the task")
            if self._boot is None:
                with open(temp, "rb") as f:
                    os.fsync(f.fileno())  # a renamed-in entry must be complete after a crash
            os.chmod(temp, 0o444)
            os.rename(temp, os.path.join(self._entries, key))
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        finally:
            if drawn:
                self._settle(size)  # after the rename: counted twice a moment, never missed
        self._count(download=True)
        return True

    def _copy(self, entry: str, dest: Path) -> int:
        """Copy ``entry`` to ``dest``: a clone of its blocks where the filesystem can, else
        in the kernel. Returns the bytes copied."""
        src = os.open(entry, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(src).st_size
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            try:
                out = os.open(dest, flags, 0o666)
            except FileNotFoundError:  # the first file of its directory
                dest.parent.mkdir(parents=True, exist_ok=True)
                out = os.open(dest, flags, 0o666)
            try:
                if size and self._clone:
                    try:
                        fcntl.ioctl(out, _FICLONE, src)
                        return size
                    except OSError as exc:
                        if exc.errno not in _NO_CLONE:
                            raise
                        self._clone = False  # ext4, tmpfs, or across filesystems
                return _copy_range(src, out, size)
            finally:
                os.close(out)
        finally:
            os.close(src)

    # ---- space -------------------------------------------------------------

    def _draw(self, size: int) -> bool:
        """Take ``size`` bytes from the batches' reserved room, reserving a chunk if needed;
        False outside a batch or when no chunk fits (the caller reserves alone)."""
        credit = self._credit
        with credit.mutex:
            if credit.batches == 0:
                return False
            if credit.room < size:
                chunk = max(size - credit.room, min(credit.left, self._chunk))
                if credit.lock is None:
                    credit.key = uuid.uuid4().hex  # a fresh key: nobody else locks it
                    credit.lock = self._keys.try_lock(credit.key, True)
                    if credit.lock is None:
                        return False
                with self._index():
                    if not self._reserve(chunk):
                        if credit.pending == 0 and credit.room == 0:
                            self._give_back()
                        return False
                    if credit.fd is None:
                        credit.fd = os.open(self._tmp / f"{credit.key}.room",
                                            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                    credit.room += chunk
                    os.ftruncate(credit.fd, credit.room + credit.pending)  # before the count
            credit.room -= size
            credit.pending += size
            credit.left = max(0, credit.left - size)
            return True

    def _settle(self, size: int) -> None:
        """A download drawn from the room is over (its entry is counted, or it failed)."""
        credit = self._credit
        with credit.mutex:
            credit.pending -= size
            if credit.batches == 0 and credit.pending == 0:
                self._give_back()
            elif credit.fd is not None:
                os.ftruncate(credit.fd, credit.room + credit.pending)

    def _give_back(self) -> None:
        """Drop the room file and take its undrawn room off the bound (credit mutex held,
        no batch running, no drawn download in progress)."""
        credit = self._credit
        try:
            if credit.fd is not None:
                with self._index():
                    (self._tmp / f"{credit.key}.room").unlink(missing_ok=True)
                    bound = self._usage_bound()
                    if bound is not None:
                        self._set_usage_bound(max(0, bound - credit.room))
                os.close(credit.fd)
        finally:
            if credit.lock is not None:
                self._keys.unlock(credit.lock, credit.key)
            credit.fd = credit.lock = None
            credit.room = 0

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
            if rest == "room":  # a batch's room: its length is what it still holds
                try:
                    reserved += temp.stat().st_size
                except FileNotFoundError:
                    pass  # given back meanwhile (its room went off the bound then)
            else:
                reserved += int(size) if size.isdigit() else 0
        return reserved

    def _try_remove(self, key: str, entry_too: bool = True) -> bool:
        """Remove a key's files if nobody holds its lock; never waits."""
        fd = self._keys.try_lock(key, True)
        if fd is None:
            return False
        try:
            for temp in self._tmp.glob(f"{key}.*"):
                temp.unlink(missing_ok=True)
            if entry_too:
                _unlink(os.path.join(self._entries, key))
        finally:
            self._keys.unlock(fd, key)
        return True

    # ---- boots -------------------------------------------------------------

    def _check_boot(self) -> None:
        """Drop everything added without an fsync in an earlier boot, and record this one
        (index lock held)."""
        recorded = _read_text(self.root / "boot")
        if recorded == self._boot:
            return
        if recorded is not None:
            self._purge()
        if self._boot is not None:
            # durably before any entry of this boot: an fsync here, with no download's
            # data dirty yet, does not wait for one (ext4 commits ordered data first)
            temp = self.root / f"boot.{uuid.uuid4().hex}"
            with open(temp, "w", encoding="ascii") as f:
                f.write(self._boot)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.root / "boot")
            _fsync_dir(self.root)

    def _purge(self) -> None:
        """Remove every entry and reservation nobody holds (index lock held)."""
        # the machine restarted since entries were added unsynced: any of them may be
        # partial on disk (no process of this boot holds one yet; the locks keep any
        # that does, should the boot id have been unreadable then)
        for item in self._scan(self._entries):
            self._try_remove(item.name)
        for item in self._scan(self._tmp):
            self._try_remove(item.name.partition(".")[0], entry_too=False)
        _fsync_dir(self._entries)
        (self.root / "usage").unlink(missing_ok=True)
        (self.root / "boot").unlink(missing_ok=True)
        _fsync_dir(self.root)

    # ---- locks and helpers -------------------------------------------------

    def _lock(self, key: str, exclusive: bool, cancel: threading.Event | None,
              path: str) -> int:
        """Lock ``key``; poll so that a cancel or the wait bound can interrupt."""
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.005
        while True:
            fd = self._keys.try_lock(key, exclusive)
            if fd is not None:
                return fd
            if cancel is not None and cancel.is_set():
                raise CancelledError("cancelled while waiting for a cached input")
            if time.monotonic() > deadline:
                raise CacheError(f"waited {self.wait_seconds:.0f} s for {path} (another "
                                 "slot's download of the same input); retry the task")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    @contextmanager
    def _index(self) -> Iterator[None]:
        fd = os.open(self.root / "index.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a directory scan only
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _key(fs: FileSystem, path: str, info: Mapping[str, Any]) -> str | None:
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


class _Credit:
    """The room this process's batches reserved: ROOT/tmp/KEY.room, a sparse file whose
    length is the room not yet filled (undrawn, plus drawn by downloads in progress)."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.batches = 0  # running
        self.left = 0  # bytes the running batches may still download
        self.room = 0  # reserved and not drawn
        self.pending = 0  # drawn by downloads in progress
        self.key = ""
        self.lock: int | None = None  # on ``key``: keeps the room file from the sweep
        self.fd: int | None = None  # the room file


def _copy_range(src: int, out: int, size: int) -> int:
    """Copy ``size`` bytes in the kernel (copy_file_range), else through a buffer."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, out, size - done)
            if n == 0:
                return done
            done += n
        return done
    except OSError as exc:
        if done or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                     errno.EOPNOTSUPP):
            raise
    while done < size:  # an old kernel, or filesystems it cannot copy between
        chunk = os.read(src, min(size - done, 1 << 20))
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view):]
        done += len(chunk)
    return done


def _boot_id() -> str | None:
    value = _read_text(Path(BOOT_ID))
    return value or None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_of(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
