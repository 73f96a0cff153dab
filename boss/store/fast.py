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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection
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
    row: Any = field(default=None)  # the named tuple of its result rows, once seen


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
        if cur.description is None:
            return []
        if c.row is None:
            c.row = namedtuple("Row", [d[0] for d in cur.description],  # type: ignore[misc]
                               rename=True)
        make = c.row._make
        return [make(r) for r in cur.fetchall()]
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, c.sql, values, exc, cur) from exc
    finally:
        cur.close()


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


def run_many(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """Run plain SQL, written with ``?`` placeholders, once per row of ``rows`` (tuples).

    For the statements a group-commit batch runs once per task: binding a tuple by
    position costs a third of binding a dict by name, and building the tuple less
    than building the dict. Values must be plain (``str``, not a ``StrEnum``:
    adapting a subclass is a lookup per value). The SQL must hold no other ``?``
    or ``%``: on PostgreSQL each ``?`` becomes psycopg's ``%s``.
    """
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        sql = _pyformat(sql)
    cur = _cursor(conn)
    try:
        cur.executemany(sql, rows)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, sql, rows, exc, cur) from exc
    finally:
        cur.close()


@lru_cache(maxsize=64)
def _pyformat(sql: str) -> str:
    return sql.replace("?", "%s")


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
