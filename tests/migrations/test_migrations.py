"""Alembic migrations on empty SQLite and PostgreSQL databases: upgrade, no drift, downgrade.

The models (boss/models.py) and the migrations (migrations/versions) must
describe the same schema; ``compare_metadata`` is what ``alembic check`` runs.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from boss import db
from boss.models import Base
from tests import pg

_counter = itertools.count()

TABLES = {"tasks", "task_edges", "task_outputs", "attempts", "workers", "context", "events",
          "task_state_counts"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a brand-new, empty database (no template, no tables)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/empty.db"
    else:
        server: pg.PgServer = request.getfixturevalue("pg_server")
        name = f"mig{os.getpid()}_{next(_counter)}"
        server.psql(f"CREATE DATABASE {name}")
        url = server.url(name)
    engine = db.make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def drift(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True})
        return list(compare_metadata(ctx, Base.metadata))


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def alembic(engine: Engine, action: str, target: str) -> None:
    """Run ``alembic upgrade|downgrade target`` on the engine, as boss.db.upgrade does."""
    cfg = db.alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, target)


def head() -> str:
    heads = ScriptDirectory.from_config(db.alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1, f"the migrations have several heads: {heads}"
    return heads[0]


def test_upgrade_head_matches_the_models(empty_engine: Engine) -> None:
    assert tables(empty_engine) == set()
    db.upgrade(empty_engine)
    assert tables(empty_engine) == set(Base.metadata.tables) == TABLES
    assert revision(empty_engine) == head()
    assert db.is_initialised(empty_engine)
    assert drift(empty_engine) == []


def test_upgrade_is_idempotent(empty_engine: Engine) -> None:
    db.upgrade(empty_engine)
    db.upgrade(empty_engine)
    assert revision(empty_engine) == head()
    assert drift(empty_engine) == []


def test_downgrade_to_base_then_upgrade_again(empty_engine: Engine) -> None:
    db.upgrade(empty_engine)
    alembic(empty_engine, "downgrade", "base")
    assert tables(empty_engine) == set()
    assert revision(empty_engine) is None
    assert not db.is_initialised(empty_engine)
    db.upgrade(empty_engine)
    assert revision(empty_engine) == head()
    assert drift(empty_engine) == []


def test_each_revision_steps_up_and_down(empty_engine: Engine) -> None:
    """Walk the history one revision at a time, both ways."""
    script = ScriptDirectory.from_config(db.alembic_config("sqlite://"))
    chain = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert chain and chain[-1] == head()
    for rev in chain:
        alembic(empty_engine, "upgrade", "+1")
        assert revision(empty_engine) == rev
    for rev in reversed(chain):
        assert revision(empty_engine) == rev
        alembic(empty_engine, "downgrade", "-1")
    assert revision(empty_engine) is None and tables(empty_engine) == set()


def test_constraints_are_named(empty_engine: Engine) -> None:
    """SQLite batch migrations can only alter constraints that have names."""
    db.upgrade(empty_engine)
    insp = inspect(empty_engine)
    for table in TABLES:
        assert insp.get_pk_constraint(table)["name"] or empty_engine.dialect.name == "sqlite"
        for fk in insp.get_foreign_keys(table):
            assert fk["name"], f"{table}: unnamed foreign key {fk}"
        for uq in insp.get_unique_constraints(table):
            assert uq["name"], f"{table}: unnamed unique constraint {uq}"


def test_0002_counts_existing_tasks_and_follows_changes(empty_engine: Engine) -> None:
    """Upgrading a database with tasks seeds the counts; the trigger moves them after."""
    from sqlalchemy import text

    alembic(empty_engine, "upgrade", "0001")
    states = ["ready", "ready", "waiting", "succeeded", "failed"]
    with empty_engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO tasks (id, name, state, priority, document, max_tries, tries, lost, "
            "pending_parents, created_at, updated_at) VALUES (:id, :name, :state, 0, '{}', 1, "
            "0, 0, 0, 0, 0)"),
            [{"id": i + 1, "name": f"t{i}", "state": s} for i, s in enumerate(states)])
    alembic(empty_engine, "upgrade", "head")

    def counts() -> dict[str, int]:
        with empty_engine.connect() as conn:
            return {s: int(n) for s, n in conn.execute(text(
                "SELECT state, n FROM task_state_counts")) if n}

    assert counts() == {"ready": 2, "waiting": 1, "succeeded": 1, "failed": 1}
    with empty_engine.begin() as conn:
        conn.execute(text("UPDATE tasks SET state = 'running' WHERE state = 'ready'"))
        conn.execute(text("UPDATE tasks SET priority = 5"))  # no state change: no move
    assert counts() == {"running": 2, "waiting": 1, "succeeded": 1, "failed": 1}
