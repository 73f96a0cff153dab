"""SQLite's write-ahead log checkpoints, on a thread of their own in ``boss serve``.

By default the connection whose commit takes the log past 1,000 pages copies
the log into the database there and then, with an fsync of both files: every
thirty-odd group-commit transactions one of them took milliseconds longer,
which was the whole of a single call's p99 (benchmarks/RESULTS.md, benchmark
3). In ``boss serve`` this thread runs a PASSIVE checkpoint every ``every``
seconds on a connection of its own: it never blocks the writer, which goes on
appending to the log meanwhile, and it releases the GIL while it copies and
syncs. The first write after a checkpoint that caught up with the log starts
the log again from its beginning.

A checkpoint that runs while the writer appends does not catch up with it,
and under steady commits it might never: once the log holds RESTART pages, the
thread runs a RESTART checkpoint, which holds the writer back while it copies
what the passive ones left (little) and syncs, and lets the next write start
the log again. The engine's own connections still checkpoint by themselves
past BACKSTOP pages, should the thread fall behind. Other processes (``boss
push-tasks``, the admin commands) keep SQLite's default.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

if TYPE_CHECKING:
    from boss.store import Store

log = logging.getLogger(__name__)

EVERY = 0.1  # seconds between checkpoints
RESTART = 4_000  # pages (16 MB) of log past which the thread makes the log start again
BACKSTOP = 10_000  # pages (40 MB) past which a commit checkpoints by itself after all
RESTART_WAIT = 0.1  # seconds a RESTART checkpoint waits for the writer at most


class Checkpointer:
    """Checkpoint the SQLite database of ``store`` from a thread (start, then stop)."""

    def __init__(self, store: Store, every: float = EVERY) -> None:
        self.store = store
        self.engine = store.engine
        self.every = every
        self.path = store.engine.url.database
        self.runs = 0  # checkpoints that ran (the tests read it)
        self._failing = False  # said once, not every round
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wal-checkpoints",
                                        daemon=True)

    def start(self) -> None:
        """From now on the engine's new connections leave checkpoints to this thread."""
        event.listen(self.engine, "connect", _backstop)
        self.store.close()  # its connections are made again, with the setting
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        event.remove(self.engine, "connect", _backstop)
        self.store.close()  # connections made from now on checkpoint by themselves

    def _loop(self) -> None:
        assert self.path is not None
        # A RESTART checkpoint waits this long at most for a moment without a writer,
        # then goes on as a passive one. While it waits it holds the checkpoint lock,
        # and a commit's own backstop checkpoint finds that lock taken and does
        # nothing: the likely way the log outgrew the backstop once in a test run (48
        # MB against 40, back-to-back commits, when the wait was 1 s; not reproduced).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=RESTART_WAIT)
        try:
            while not self._stop.wait(self.every):
                log_pages = self._checkpoint(conn, "PASSIVE")
                if log_pages > RESTART:
                    self._checkpoint(conn, "RESTART")
            self._checkpoint(conn, "PASSIVE")  # what the last transactions left
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection, mode: str) -> int:
        """Run one checkpoint; the pages in the log (0 when it failed)."""
        try:
            _busy, log_pages, _done = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.Error as exc:  # busy, or the disk: the next round tries again
            if not self._failing:
                log.warning("checkpoint of %s failed (retrying every %g s): %s", self.path,
                            self.every, exc)
            self._failing = True
            return 0
        if self._failing:
            log.warning("checkpoints of %s work again", self.path)
        self._failing = False
        self.runs += 1
        return int(log_pages)


def _backstop(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP}")
