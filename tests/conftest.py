"""Shared fixtures: a clean environment, fresh databases on both dialects."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from boss.service import Boss
from boss.store import Store, reads
from protocol.settings import Settings, absolutize
from tests import pg

_counter = itertools.count()


@pytest.fixture(autouse=True)
def _scrub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's ECLOUD_ variables."""
    for key in list(os.environ):
        if key.startswith("ECLOUD_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.PgServer]:
    server, why = pg.start()
    if server is None:
        print(f"\nSKIPPING PostgreSQL tests: {why}")
        pytest.skip(why)
    template = "ecloud_template"
    server.psql(f"CREATE DATABASE {template}")
    store = Store.open(server.url(template))
    store.upgrade()
    store.close()
    try:
        yield server
    finally:
        server.stop()


def fresh_pg_url(server: pg.PgServer) -> str:
    name = f"t{os.getpid()}_{next(_counter)}"
    server.psql(f"CREATE DATABASE {name} TEMPLATE ecloud_template")
    return server.url(name)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, migrated database: SQLite file or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/boss.db"
    return fresh_pg_url(request.getfixturevalue("pg_server"))


def make_settings(tmp_path: Path, db_url: str) -> Settings:
    s = Settings.model_validate({
        "boss": {"database_url": db_url, "lease_seconds": 30},
        "datastore": {"default": f"file://{tmp_path}/data",
                      "buckets": {"data": f"file://{tmp_path}/data"}},
        "worker": {"workdir": str(tmp_path / "work"), "cache_dir": str(tmp_path / "cache")},
    })
    return absolutize(s, tmp_path)


@pytest.fixture
def boss(tmp_path: Path, db_url: str) -> Iterator[Boss]:
    b = Boss(make_settings(tmp_path, db_url))
    b.init()
    try:
        yield b
        # whatever the test did, the trigger-kept counts equal a real count
        with b.store.ro() as conn:
            assert reads.task_counts(conn) == reads.task_counts_exact(conn)
    finally:
        b.close()
