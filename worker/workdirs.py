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
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
import uuid
from pathlib import Path


class Janitor:
    """Removes finished attempts' work directories on a thread of its own.

    Removing a tree costs milliseconds per directory on some filesystems; off
    the slot's path, the next task starts at once. :meth:`flush` (at worker exit)
    waits for the queue to empty.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Path] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def remove(self, path: Path) -> None:
        self._queue.put(path)
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
            path = self._queue.get()
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                self._queue.task_done()


JANITOR = Janitor()


class WorkTrees:
    """The trees of one worker's attempts, with the clean ones kept for reuse.

    Kept trees are per worker (their names are unique to it), so workers that
    share a workdir root never take each other's; :meth:`close` removes them
    when the worker leaves. At most as many are kept as ran at once.
    """

    def __init__(self, janitor: Janitor = JANITOR) -> None:
        self._janitor = janitor
        self._kept: list[Path] = []
        self._lock = threading.Lock()
        self._closed = False
        self._fresh: _Shape | None = None  # a new tree's, to compare a used one with

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
                kept = self._kept.pop()
            try:
                os.rename(kept, root)
                return
            except OSError:  # removed under us (a cleaned-up temporary root): make one
                self._janitor.remove(kept)
        (root / "logs").mkdir(parents=True)
        (root / "work").mkdir()
        if self._fresh is None:
            self._fresh = _shape(root)

    def done(self, root: Path, *, reusable: bool) -> None:
        """``root``'s attempt has ended: keep its tree if ``reusable`` and clean, else remove it."""
        if reusable and self._fresh is not None and _clean(root, self._fresh):
            kept = root.with_name(f".kept-{uuid.uuid4().hex[:16]}")
            try:
                os.rename(root, kept)
            except OSError:
                pass
            else:
                with self._lock:
                    if not self._closed:
                        self._kept.append(kept)
                        return
                root = kept
        self._janitor.remove(root)

    def close(self) -> None:
        """At worker exit: remove every kept tree, and wait until the janitor has removed
        every tree handed to it; a tree that ends later goes to the janitor too."""
        with self._lock:
            kept, self._kept, self._closed = self._kept, [], True
        for path in kept:
            self._janitor.remove(path)
        self._janitor.flush()


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
