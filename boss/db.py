"""Engines and migrations.

SQLite is opened in WAL mode with a busy timeout, and every transaction
starts with ``BEGIN IMMEDIATE`` so that two writers never both read and then
fail to upgrade their lock (the classic SQLite deadlock); PostgreSQL relies
on row locks with ``FOR UPDATE SKIP LOCKED`` in the claim query.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError

from boss.errors import DatabaseError

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_MS = 30_000


def make_engine(url: str) -> Engine:
    """Create an engine for ``url`` (SQLite file, or PostgreSQL via psycopg 3)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseError(f"database_url {url!r} is not a database URL: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, parsed.database)
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20)
    raise DatabaseError(
        f"database_url {url!r}: only sqlite:///PATH and postgresql+psycopg://... are supported"
    )


def _sqlite_engine(url: str, database: str | None) -> Engine:
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # let SQLAlchemy, not pysqlite, decide when transactions begin
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        # statement journals (a savepoint's, a multi-row statement's) in memory: a large
        # group-commit batch spilled its journal to a temporary file, a third of the time
        # of its UPDATE of tasks (benchmark 3)
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # readers (status, listings) pass readonly=True and take no write lock
        readonly = conn.get_execution_options().get("readonly", False)
        sql = "BEGIN" if readonly else "BEGIN IMMEDIATE"
        # to the driver directly: through exec_driver_sql, a twentieth of the boss's
        # CPU per group commit went into SQLAlchemy's statement machinery (benchmark 3)
        try:
            conn.connection.dbapi_connection.execute(sql)
        except sqlite3.Error as exc:  # as SQLAlchemy would raise it (the store translates)
            raise DBAPIError.instance(sql, None, exc, sqlite3.Error,
                                      dialect=conn.dialect) from exc

    return engine


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` on the engine's database."""
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"migrating {engine.url!r} failed: {exc}") from exc


def is_initialised(engine: Engine) -> bool:
    try:
        return inspect(engine).has_table("tasks")
    except OperationalError as exc:
        raise DatabaseError(f"cannot open the database {engine.url!r}: {exc}") from exc
