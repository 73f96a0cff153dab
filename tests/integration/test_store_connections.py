"""The store's write transactions share one held connection, on both engines."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Connection, event, text

from boss import store as store_module
from boss.errors import DatabaseError
from boss.service import Boss

BOUND = 30.0  # seconds; a bound on every wait


def checkouts(boss: Boss) -> list[object]:
    """Every connection the store's pool hands out from now on."""
    out: list[object] = []

    @event.listens_for(boss.store.engine, "checkout")
    def _out(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        out.append(dbapi_conn)

    return out


def test_write_transactions_share_one_connection(boss: Boss,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "HELD_IDLE_SECONDS", 3600.0)  # a slow machine too
    taken = checkouts(boss)
    for k in range(50):
        with boss.store.tx() as conn:
            conn.execute(text("INSERT INTO context (key, value) VALUES (:k, 'v')"),
                         {"k": f"k{k}"})
    assert len(taken) <= 1  # none at all if the held one predates the listener
    with boss.store.ro() as conn:
        assert conn.execute(text("SELECT count(*) FROM context WHERE key LIKE 'k%'")
                            ).scalar() == 50


def test_a_thread_that_finds_the_connection_in_use_gets_its_own(boss: Boss) -> None:
    inside, release = threading.Event(), threading.Event()
    seen: list[Connection] = []

    def first() -> None:
        with boss.store.tx() as conn:
            seen.append(conn)
            conn.execute(text("INSERT INTO context (key, value) VALUES ('a', '1')"))
            inside.set()
            release.wait(BOUND)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(BOUND)
        # on SQLite this one's BEGIN waits for the first's commit; on PostgreSQL it runs
        threading.Timer(0.2, release.set).start()
        with boss.store.tx() as conn:
            seen.append(conn)
            conn.execute(text("INSERT INTO context (key, value) VALUES ('b', '2')"))
    finally:
        release.set()
        thread.join(BOUND)
    assert not thread.is_alive()
    assert seen[0] is not seen[1]
    with boss.store.ro() as conn:
        assert dict(conn.execute(text("SELECT key, value FROM context WHERE key IN ('a', 'b')"
                                      )).all()) == {"a": "1", "b": "2"}


def _kill_held(boss: Boss) -> None:
    """End the held connection's server process, as a restart of the server would."""
    with boss.store.tx() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    with boss.store.engine.connect() as other:
        assert other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_held_connection_the_server_dropped_is_replaced(
        boss: Boss, monkeypatch: pytest.MonkeyPatch) -> None:
    def insert(key: str) -> None:
        with boss.store.tx() as conn:
            conn.execute(text("INSERT INTO context (key, value) VALUES (:k, 'v')"), {"k": key})

    # under load (no quiet second): the next transaction fails, the one after it works
    monkeypatch.setattr(store_module, "HELD_IDLE_SECONDS", 3600.0)
    _kill_held(boss)
    with pytest.raises(DatabaseError):
        insert("lost")
    insert("after")
    # after a quiet spell the pool's ping finds it gone first: nothing fails
    monkeypatch.setattr(store_module, "HELD_IDLE_SECONDS", 0.0)
    _kill_held(boss)
    insert("quiet")
    with boss.store.ro() as conn:
        keys = conn.execute(text("SELECT key FROM context WHERE key IN "
                                 "('lost', 'after', 'quiet')")).scalars().all()
    assert sorted(keys) == ["after", "quiet"]
