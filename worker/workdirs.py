"""Attempts' directory trees: made, kept for the next attempt when clean, removed.

Every attempt runs in ``<workdir root>/<attempt id>/``, which holds ``logs/``
(the commands' captured output) and ``work/`` (the commands' working
directory, with the staged inputs and the outputs). Making that tree and
removing it again cost from half a millisecond to several per task on ext4
(``benchmarks/run.py work_trees``), more than the rest of a short task's
bookkeeping, so a tree an attempt left clean is kept instead: renamed aside
(``.kept-<id>``) and renamed into place for the next attempt. Clean means what
a fresh tree would be: an empty ``work/``, and in ``logs/`` only empty files,
which the next attempt truncates when it writes them (log files with content
are unlinked first, so no output of one task can show through in another's).
Anything else, an attempt in a container, or a tree that cannot be checked,
goes to the :class:`Janitor`, which removes it on a thread of its own.

A worker holds a lock (``flock``) on each of its trees, running or kept, for as
long as it has them; the kernel drops the locks when the worker dies, however
it dies. So the trees a killed worker left behind are the ones nobody can
lock, and :meth:`WorkTrees.sweep` (run by every worker when it starts and
every few minutes after) removes them, whichever worker left them in a
workdir that several share. A tree is made under a name the sweep leaves
alone (``.new-<id>``), locked, and only then renamed to its attempt, so there
is no moment at which a live tree has its name and no lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# what a sweep may remove, when no live worker holds it: an attempt's tree (if it has
# an attempt's logs/ and work/), a kept one, one a sweep was removing, and a tree still
# being made once it is MAKING_GRACE_SECONDS old
_SWEPT = re.compile(r"(?P<attempt>[0-9]+)|(?P<making>\.new-[0-9a-f]+)"
                    r"|\.kept-[0-9a-f]+|\.stale-[0-9a-f]+")
MAKING_GRACE_SECONDS = 600.0
SWEEP_SECONDS = 300.0  # how often a running worker sweeps again


class Janitor:
    """Removes finished attempts' work directories on a thread of its own.

    Removing a tree costs milliseconds per directory on some filesystems; off
    the slot's path, the next task starts at once. :meth:`flush` (at worker exit)
    waits for the queue to empty.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def remove(self, path: Path, lock: int | None = None) -> None:
        """Remove the tree at ``path``; then close ``lock``, the fd that held it."""
        self.call(lambda: _remove(path, lock))

    def call(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the janitor's thread, after the removals queued before it."""
        self._queue.put(job)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="janitor", daemon=True)
                self._thread.start()

    def flush(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:  # a bug; the janitor must go on with the next job
                log.exception("janitor")
            finally:
                self._queue.task_done()


def _remove(path: Path, lock: int | None) -> None:
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        if lock is not None:
            os.close(lock)


JANITOR = Janitor()


class WorkTrees:
    """The trees of one worker's attempts, with the clean ones kept for reuse.

    Kept trees are per worker (their names are unique to it), so workers that
    share a workdir root never take each other's; :meth:`close` removes them
    when the worker leaves. At most as many are kept as ran at once. Each tree,
    running or kept, is held by a locked fd, closed once the tree is removed.
    """

    def __init__(self, janitor: Janitor = JANITOR) -> None:
        self._janitor = janitor
        self._kept: list[tuple[Path, int | None]] = []
        self._held: dict[Path, int | None] = {}  # running attempts' trees -> their locks
        self._lock = threading.Lock()
        self._closed = False
        self._fresh: _Shape | None = None  # a new tree's, to compare a used one with
        self._swept = 0.0  # time.monotonic() of the last sweep

    def make(self, root: Path) -> None:
        """Make ``root`` with empty ``logs/`` and ``work/`` (a kept tree renamed, if any).

        Whatever is at ``root`` already (left by a crashed earlier run) is
        removed first. Raises OSError when the tree cannot be made.
        """
        shutil.rmtree(root, ignore_errors=True)
        while True:
            with self._lock:
                if not self._kept:
                    break
                kept, lock = self._kept.pop()
            try:
                os.rename(kept, root)
            except OSError:  # removed under us (a cleaned-up temporary root): make one
                self._janitor.remove(kept, lock)
                continue
            with self._lock:
                self._held[root] = lock
            return
        new = root.with_name(f".new-{uuid.uuid4().hex[:16]}")
        try:
            os.mkdir(new)
        except FileNotFoundError:  # the workdir root itself is not there yet
            root.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(new)
        lock = None
        try:
            (new / "logs").mkdir()
            (new / "work").mkdir()
            lock = _hold(new)
            os.rename(new, root)
        except OSError:
            self._janitor.remove(new, lock)
            raise
        with self._lock:
            self._held[root] = lock
        if self._fresh is None:
            self._fresh = _shape(root)

    def done(self, root: Path, *, reusable: bool) -> None:
        """``root``'s attempt has ended: keep its tree if ``reusable`` and clean, else remove it."""
        with self._lock:
            lock = self._held.pop(root, None)
        if reusable and self._fresh is not None and _clean(root, self._fresh):
            kept = root.with_name(f".kept-{uuid.uuid4().hex[:16]}")
            try:
                os.rename(root, kept)
            except OSError:
                pass
            else:
                with self._lock:
                    if not self._closed:
                        self._kept.append((kept, lock))
                        return
                root = kept
        self._janitor.remove(root, lock)

    def close(self) -> None:
        """At worker exit: remove every kept tree, and wait until the janitor has removed
        every tree handed to it; a tree that ends later goes to the janitor too."""
        with self._lock:
            kept, self._kept, self._closed = self._kept, [], True
        for path, lock in kept:
            self._janitor.remove(path, lock)
        self._janitor.flush()

    def sweep(self, workdir: Path, *, every: float = 0.0) -> None:
        """Remove, on the janitor's thread, the trees in ``workdir`` that no live worker
        holds: those of workers that died (killed, out of memory, the host rebooted).

        With ``every``, only if the last sweep is at least that many seconds ago.
        Entries that are not trees of attempts are left alone.
        """
        now = time.monotonic()
        with self._lock:
            if every and self._swept and now - self._swept < every:
                return
            self._swept = now
        self._janitor.call(lambda: _sweep(workdir))


def _lock(path: Path) -> int | None:
    """An fd on the directory ``path`` (not a symlink) holding its exclusive lock, or
    None when it cannot have it: another holds it, or the filesystem has no flock.
    Raises OSError when ``path`` cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _hold(path: Path) -> int | None:
    """The lock of a tree this worker made, or None where it cannot be locked (a
    filesystem without flock): such a tree is never swept, as no sweep can lock it."""
    fd = _lock(path)
    if fd is None:
        log.debug("cannot lock %s: a dead worker's trees here are not swept", path)
    return fd


# filesystems whose flock is this kernel's alone: on a network filesystem a lock may
# not reach the other hosts that share a workdir there (NFS mounted local_lock=flock),
# whose live trees a sweep would then remove; there, and on any other, nothing is swept
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs",
                               "bcachefs", "jfs", "reiserfs", "overlay", "zfs"})


def filesystem_of(path: Path, mountinfo: str) -> str:
    """The type of the filesystem that holds ``path`` (absolute, resolved), by the mount
    table ``mountinfo`` (/proc/self/mountinfo's text); "" if none holds it."""
    best, kind = -1, ""
    for line in mountinfo.splitlines():
        fields, sep, rest = line.partition(" - ")
        parts = fields.split()
        if not sep or len(parts) < 5 or not rest:
            continue
        # the mount point, with " ", "\t", "\n" and "\\" escaped in octal
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
        if path.is_relative_to(point) and len(point) >= best:
            best, kind = len(point), rest.split()[0]
    return kind


def filesystem_type(path: Path) -> str:
    """The type of the filesystem that holds ``path`` ("" if the mount table cannot be
    read or none holds it)."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return ""
    return filesystem_of(path.resolve(), mountinfo)


def _sweep(workdir: Path) -> None:
    kind = filesystem_type(workdir)
    if kind not in LOCAL_FILESYSTEMS:
        log.debug("%s is on %s, where a lock may not be seen by other hosts: not swept",
                  workdir, kind or "an unknown filesystem")
        return
    try:
        with os.scandir(workdir) as entries:
            names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:  # not there (yet), or unreadable: nothing to sweep
        return
    swept = 0
    for name in names:
        match = _SWEPT.fullmatch(name)
        if match:
            swept += _sweep_one(workdir / name, making=match["making"] is not None,
                                attempt=match["attempt"] is not None)
    if swept:
        log.info("removed %d work director%s left by workers that died, in %s", swept,
                 "y" if swept == 1 else "ies", workdir)


def _sweep_one(path: Path, *, making: bool, attempt: bool) -> bool:
    """Remove ``path`` if no one holds it (and, for a tree being made, it is old; for an
    attempt's, it has the ``logs/`` and ``work/`` of one: a workdir shared with other
    data may hold a directory named by a number that is none of ecloud's)."""
    try:
        fd = _lock(path)
    except OSError:  # gone meanwhile, or not a directory
        return False
    if fd is None:  # held by a live worker (or no locks here): not ours to remove
        return False
    try:
        st = os.fstat(fd)
        if making and time.time() - st.st_ctime < MAKING_GRACE_SECONDS:
            return False
        if attempt and not all(stat.S_ISDIR(os.lstat(path / d).st_mode)
                               for d in ("logs", "work")):
            return False
        # out of the way first, then checked: should the owner of an attempt id have
        # made its tree anew under this name meanwhile, that tree is put back
        gone = path.with_name(f".stale-{uuid.uuid4().hex[:16]}")
        os.rename(path, gone)
        moved = os.lstat(gone)
        if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
            os.rename(gone, path)
            return False
        shutil.rmtree(gone, ignore_errors=True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# mode, owner and group of the root, logs/ and work/, by lstat (a symlink is not a directory)
_Shape = tuple[tuple[int, int, int], ...]


def _shape(root: Path) -> _Shape:
    stats = [os.lstat(p) for p in (root, root / "logs", root / "work")]
    return tuple((st.st_mode, st.st_uid, st.st_gid) for st in stats)


def _clean(root: Path, fresh: _Shape) -> bool:
    """Whether ``root`` is as a new tree of shape ``fresh`` would be, once its log files
    with content (or with other links) are unlinked, which this does.

    A command can reach the whole tree (``..`` of its working directory): it
    may have made ``work`` a link, changed a mode or an owner, or left a file
    beside the two directories; any of that and the tree is not reused.
    """
    try:
        with os.scandir(root) as entries:
            if sorted(e.name for e in entries) != ["logs", "work"]:
                return False
        if _shape(root) != fresh:
            return False
        with os.scandir(root / "work") as entries:
            if next(entries, None) is not None:
                return False
        with os.scandir(root / "logs") as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    return False
                st = entry.stat(follow_symlinks=False)
                if st.st_size or st.st_nlink != 1:  # a hard link would be truncated through
                    os.unlink(entry.path)
    except OSError:  # gone, or unreadable: not worth keeping
        return False
    return True
