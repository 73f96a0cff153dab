"""The store: the only place that holds queries.

:class:`Store` owns the engine and hands out transactions; the modules beside
it (``tasks``, ``push``, ``workers``, ``reads``, ``events``) are functions over
a connection inside one such transaction. Database errors are translated
here into :class:`boss.errors.DatabaseError`, never leaked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from boss import db
from boss.errors import DatabaseError, NotInitialised
from boss.store import fast

# a held connection idle this long goes back through the pool before its next
# transaction, and the pool pings it (PostgreSQL): a server restarted while the boss
# was quiet costs no failed transaction
HELD_IDLE_SECONDS = 1.0


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._held: Connection | None = None  # the write transactions' connection
        self._held_lock = threading.Lock()
        self._held_since = 0.0  # time.monotonic() at the end of its last transaction
        if self.dialect == "postgresql":
            fast.serve_pipelines(engine)

    @classmethod
    def open(cls, url: str) -> Store:
        return cls(db.make_engine(url))

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One write transaction: committed on success, rolled back on any error.

        The write transactions run on one connection held open between them
        (the boss's database thread runs nearly all of them), not on one checked
        out of the pool for each: the checkout, a new ``Connection`` and its
        return to the pool were a sixth of the boss's Python time per group commit
        (benchmark 3). A thread that finds it in use gets a connection of its own.
        Under load a server restart fails one transaction on it (the RPC server retries
        it); after a quiet second the pool's ping finds the connection gone first.
        """
        if not self._held_lock.acquire(blocking=False):
            with self._translate(), self.engine.begin() as conn:
                yield conn
            return
        try:
            with self._translate():
                held = self._held
                if (held is None or held.invalidated or held.closed
                        or time.monotonic() - self._held_since > HELD_IDLE_SECONDS):
                    self._drop_held()
                    held = self._held = self.engine.connect()
                try:
                    with held.begin():
                        yield held
                finally:
                    self._held_since = time.monotonic()
        finally:
            self._held_lock.release()

    def _drop_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            try:
                held.close()
            except SQLAlchemyError:  # a connection that died: nothing left to close
                pass

    @contextmanager
    def bulk_tx(self) -> Iterator[Connection]:
        """A write transaction for a push: :meth:`tx` with SQLite tuned for bulk inserts.

        The push's edges only name tasks it inserts or has just looked up under
        the same write lock, so SQLite's per-row foreign key lookups are
        skipped. That is a connection setting that SQLite ignores inside a
        transaction, hence set before it begins and reset after. (A larger page
        cache was tried too: 270 MB more memory at 1M tasks for no measurable gain.)
        The commit syncs the write-ahead log (synchronous=FULL): a push that was
        reported done survives a power cut. It costs one fsync, which the checkpoint
        right after a large commit would do anyway.
        """
        with self._translate(), self.engine.connect() as conn:
            raw: Any = conn.connection.driver_connection if self.dialect == "sqlite" else None
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=OFF")
                raw.execute("PRAGMA synchronous=FULL")
            try:
                with conn.begin():
                    yield conn
            finally:
                if raw is not None:
                    raw.execute("PRAGMA foreign_keys=ON")
                    raw.execute("PRAGMA synchronous=NORMAL")

    @contextmanager
    def ro(self) -> Iterator[Connection]:
        """A read-only transaction (takes no write lock on SQLite)."""
        with (
            self._translate(),
            self.engine.connect().execution_options(readonly=True) as conn,
            conn.begin(),
        ):
            yield conn

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            text = str(exc.orig)
            if "no such table" in text or ("does not exist" in text and "relation" in text):
                if db.is_initialised(self.engine):  # made by an older ecloud
                    raise NotInitialised(
                        f"the database {self.engine.url!r} has an older schema ({text}): "
                        "run `boss db upgrade`") from exc
                raise NotInitialised(
                    f"the database {self.engine.url!r} has no ecloud tables: run `boss init`"
                ) from exc
            raise DatabaseError(f"database {self.engine.url!r}: {text}") from exc
        except DBAPIError as exc:
            raise DatabaseError(f"database {self.engine.url!r}: {exc.orig}") from exc
        except SQLAlchemyError as exc:
            raise DatabaseError(f"database {self.engine.url!r}: {exc}") from exc

    def check(self) -> None:
        """Raise NotInitialised unless `boss init` has created the tables."""
        if not db.is_initialised(self.engine):
            raise NotInitialised(
                f"the database {self.engine.url!r} has no ecloud tables: run `boss init`")

    def upgrade(self) -> None:
        db.upgrade(self.engine)

    def close(self) -> None:
        """Close every connection (a store used again opens new ones)."""
        # a transaction still running on another thread ends before its connection closes
        locked = self._held_lock.acquire(timeout=30)
        try:
            self._drop_held()
        finally:
            if locked:
                self._held_lock.release()
        self.engine.dispose()
