"""The hot path's statements, run on the DB-API cursor of the caller's transaction.

Through SQLAlchemy Core even a prebuilt statement costs 40-50 µs of Python per
execution (execution context, parameter processing, result wrapping), ten
times what SQLite takes to run it, and one task's cycle runs about fifteen
(see benchmarks/RESULTS.md). Here a statement is compiled once per dialect
(and per set of inserted columns) to its SQL text, and then runs straight on
the cursor of the connection the transaction already holds, so savepoints,
commit and rollback stay SQLAlchemy's.

Only statements whose parameters need no type processing belong here: ids,
numbers, strings and enums of strings; JSON is dumped by the caller. Errors
are raised as SQLAlchemy's, so :class:`boss.store.Store` translates them as
it does every other.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Executable

# SQLAlchemy's pysqlite dialect binds by position; named binds let one dict serve
_SQLITE_NAMED = sqlite.dialect(paramstyle="named")

Params = Mapping[str, Any]


@dataclass
class _Compiled:
    stmt: Executable  # held, so that its id is not reused while cached
    sql: str
    fixed: dict[str, Any]  # values bound when the statement was built (literals)


_cache: dict[tuple[int, str, tuple[str, ...]], _Compiled] = {}


def _compiled(stmt: Executable, dialect: Dialect, keys: tuple[str, ...]) -> _Compiled:
    cache_key = (id(stmt), dialect.name, keys)
    found = _cache.get(cache_key)
    if found is None:
        target = _SQLITE_NAMED if dialect.name == "sqlite" else dialect
        # an INSERT names exactly the columns given; IN (literals) gets one bind each
        compiled = stmt.compile(dialect=target, column_keys=list(keys) or None,  # type: ignore[attr-defined]
                                compile_kwargs={"render_postcompile": True})
        fixed = {k: v for k, v in compiled.params.items() if k not in keys}
        found = _cache[cache_key] = _Compiled(stmt, compiled.string, fixed)
    return found


def execute(conn: Connection, stmt: Executable, params: Params | None = None) -> list[Any]:
    """Run one statement; return its rows (named tuples), if it returns any."""
    params = params or {}
    c = _compiled(stmt, conn.dialect, tuple(params) if _is_insert(stmt) else ())
    values = {**c.fixed, **params} if c.fixed else params
    cur = _cursor(conn)
    try:
        cur.execute(c.sql, values)
        return _answer(conn, cur, c.sql)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, c.sql, values, exc, cur) from exc
    finally:
        cur.close()


_row_types: dict[str, Any] = {}  # SQL -> the named tuple of its result rows, once seen


def _answer(conn: Connection, cur: Any, sql: str) -> list[Any]:
    """The rows of the statement ``sql`` just run on ``cur`` (named tuples), if any."""
    if cur.description is None and _PIPELINE in conn.info and cur.pgresult is None:
        conn.info[_PIPELINE].sync()  # its answer has not come yet
    if cur.description is None:
        return []
    row: Any = _row_types.get(sql)
    if row is None:
        row = _row_types[sql] = namedtuple("Row", [d[0] for d in cur.description],
                                           rename=True)
    make = row._make
    return [make(r) for r in cur.fetchall()]


def execute_many(conn: Connection, stmt: Executable, rows: Sequence[Params]) -> None:
    """Run one statement (returning nothing) for each of ``rows``, all with the same keys."""
    if not rows:
        return
    c = _compiled(stmt, conn.dialect, tuple(rows[0]) if _is_insert(stmt) else ())
    values = [{**c.fixed, **r} for r in rows] if c.fixed else rows
    cur = _cursor(conn)
    try:
        cur.executemany(c.sql, values)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, c.sql, values, exc, cur) from exc
    finally:
        cur.close()


@dataclass(frozen=True)
class Many:
    """A change made once per row of a batch (:func:`run_many`).

    ``sql`` is plain SQL with ``?`` placeholders, run once per row. ``unnest``,
    when given, is the same change on PostgreSQL as one statement that takes
    each column of the rows as an array (``%s::TYPE[]``, through ``unnest``):
    each statement is a round of the server's protocol and executor (40,000
    single-row event inserts were a sixth of its statement time for 20,000
    tasks), and a
    statement per row on a table with a statement-level trigger (tasks) fires
    it per row, rewriting the same counts rows, whose versions pile up within
    the transaction.
    """

    sql: str
    unnest: str | None = None


def run_many(conn: Connection, stmt: Many, rows: Sequence[Sequence[Any]]) -> None:
    """Run ``stmt`` for each row of ``rows`` (tuples, in the order of its placeholders).

    For the statements a group-commit batch runs once per task: binding a tuple by
    position costs a third of binding a dict by name, and building the tuple less
    than building the dict. Values must be plain (``str``, not a ``StrEnum``:
    adapting a subclass is a lookup per value). The SQL must hold no other ``?``
    or ``%``: on PostgreSQL each ``?`` becomes psycopg's ``%s``.
    """
    if not rows:
        return
    cur = _cursor(conn)
    sql = stmt.sql
    try:
        if conn.dialect.name == "sqlite":
            cur.executemany(sql, rows)
        elif stmt.unnest is not None and len(rows) > 1:
            sql = stmt.unnest
            _execute_arrays(cur, sql, rows)
        else:
            sql = _pyformat(sql)
            cur.executemany(sql, rows)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, sql, rows, exc, cur) from exc
    finally:
        cur.close()


def returning_arrays(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]
                     ) -> list[Any]:
    """PostgreSQL: run ``sql`` once, its ``%s::TYPE[]`` binds the columns of ``rows``;
    return its rows (named tuples)."""
    cur = _cursor(conn)
    try:
        _execute_arrays(cur, sql, rows)
        return _answer(conn, cur, sql)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, sql, rows, exc, cur) from exc
    finally:
        cur.close()


def _execute_arrays(cur: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    # never prepared: the plan is made for this array and the table as it is. A
    # prepared statement's generic plan, made while attempts was small and kept until
    # an analyze, read the whole table to update a batch's rows (0.5 ms a batch after
    # 20,000 tasks, growing; benchmark 3)
    cur.execute(sql, [pg_array(column) for column in zip(*rows, strict=True)], prepare=False)


def pg_array(values: Iterable[Any]) -> str:
    """``values`` (ints, floats, strings, None) as a PostgreSQL array literal, for a
    ``%s::TYPE[]`` bind.

    psycopg adapts a list in Python, looking up a dumper per element: for a group
    commit's batch of 50 tasks that was a fifth of the database thread's time on
    PostgreSQL (benchmark 3); this builds the same text four times faster. Strings
    are always quoted (so "NULL" stays a string), with backslash and ``"`` escaped.
    """
    out = []
    for v in values:
        if v is None:
            out.append("NULL")
        elif isinstance(v, str):
            out.append('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"')
        elif type(v) is int or type(v) is float:
            out.append(repr(v))  # a float's repr reads back exactly (float8in)
        elif isinstance(v, bool):
            out.append("t" if v else "f")
        elif isinstance(v, int):  # an IntEnum's repr is not its number
            out.append(str(int(v)))
        elif isinstance(v, float):
            out.append(repr(float(v)))
        else:
            raise TypeError(f"no array literal for {type(v).__name__}: {v!r}")
    return "{" + ",".join(out) + "}"


@lru_cache(maxsize=64)
def _pyformat(sql: str) -> str:
    return sql.replace("?", "%s")


_PIPELINE = "ecloud.pipeline"


@contextmanager
def pipelined(conn: Connection) -> Iterator[None]:
    """On PostgreSQL, send the statements of the block without waiting for each one's
    answer: a statement whose rows are needed (:func:`execute`) waits for the answers
    of everything sent before it, so the writes before it share its round trip.

    A group-commit transaction made some eleven round trips to the server, and each
    is a wake-up of the server's process and of the database thread: on two busy
    cores that wait, not either side's work, set the pace of one task per call
    (benchmark 3). An error of a write is raised by the next statement that waits,
    or at the end of the block; either way the transaction is rolled back whole.
    SQLite has no round trips: nothing changes there.
    """
    if conn.dialect.name == "sqlite":
        yield
        return
    with conn.connection.dbapi_connection.pipeline() as pipeline:  # type: ignore[union-attr]
        conn.info[_PIPELINE] = pipeline
        try:
            yield
        finally:
            del conn.info[_PIPELINE]


def serve_pipelines(engine: Engine) -> None:
    """Let statements run through SQLAlchemy (``conn.execute``) inside a
    :func:`pipelined` block wait for their answer, as :func:`execute` does: SQLAlchemy
    reads the cursor's description right after sending, and in a pipeline it is not
    there yet (a rare path of the batch, a cascade, took its rows for none)."""

    @event.listens_for(engine, "after_cursor_execute")
    def _answered(conn: Connection, *_: Any) -> None:
        pipeline = conn.info.get(_PIPELINE)
        if pipeline is not None:
            pipeline.sync()


@contextmanager
def savepoint(conn: Connection, name: str = "ecloud_call") -> Iterator[None]:
    """What ``conn.begin_nested()`` does, for one call of a group commit, at a tenth of
    the cost: on an exception the call's changes are rolled back and it is re-raised."""
    _run(conn, f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        if not conn.invalidated:
            _run(conn, f"ROLLBACK TO SAVEPOINT {name}")
            _run(conn, f"RELEASE SAVEPOINT {name}")
        raise
    _run(conn, f"RELEASE SAVEPOINT {name}")


def _run(conn: Connection, sql: str) -> None:
    cur = _cursor(conn)
    try:
        cur.execute(sql)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, sql, None, exc, cur) from exc
    finally:
        cur.close()


def _is_insert(stmt: Executable) -> bool:
    return getattr(stmt, "is_insert", False) is True


def _cursor(conn: Connection) -> Any:
    # the DB-API connection of the transaction this Connection has begun
    return conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]


def _wrapped(conn: Connection, sql: str, params: Any, exc: Any, cur: Any) -> Exception:
    dialect = conn.dialect
    gone = bool(dialect.is_disconnect(exc, conn.connection.dbapi_connection, cur))
    if gone:
        conn.invalidate(exc)  # as SQLAlchemy does: the pool must not hand it out again
    err: Exception = DBAPIError.instance(sql, params, exc, dialect.loaded_dbapi.Error,
                                         connection_invalidated=gone, dialect=dialect)
    return err
