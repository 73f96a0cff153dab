"""Worker tokens at the RPC server, over real TCP: no token, no answer; one worker's
token cannot touch another worker's attempt.

Every refusal is checked three ways: the error code, the connection closed
(for authentication), and a snapshot of every table taken before and after,
so that a refused call that still read or wrote something would show.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from boss.models import Base
from boss.service import Boss
from boss.transitions import hash_token
from tests.bossd import serving
from tests.integration.test_server import Line, hello
from tests.integration.test_transitions import push, states, task

Snapshot = dict[str, list[tuple[Any, ...]]]

# a plausible request for every call a worker may make, given an attempt id
CALLS: dict[str, Any] = {
    "pop": lambda aid: {"n": 1},
    "heartbeat": lambda aid: {"attempts": [aid]},
    "event": lambda aid: {"events": [{"attempt_id": aid, "kind": "execution.started"}]},
    "complete": lambda aid: {"attempt_id": aid, "outcome": "succeeded", "exit_status": 0},
    "goodbye": lambda aid: {"reason": "bye"},
}


def snapshot(boss: Boss) -> Snapshot:
    """Every row of every table, through the boss's own engine (SQLite or PostgreSQL)."""
    with boss.store.engine.connect() as conn:
        return {t.name: sorted((tuple(r) for r in conn.execute(select(t))), key=repr)
                for t in Base.metadata.sorted_tables}


@pytest.fixture
def served(boss: Boss, tmp_path: Path) -> Iterator[tuple[Boss, int]]:
    push(boss, tmp_path, [task("a"), task("b")])
    with serving(boss) as server:
        yield boss, server.port


def refused_and_closed(c: Line, reply: dict[str, Any], token: str | None = None) -> str:
    """Assert an `unauthorized` error that echoes no secret, then a closed connection."""
    assert "error" in reply and "result" not in reply, reply
    assert reply["error"]["code"] == "unauthorized", reply
    message = str(reply["error"]["message"])
    if token:
        assert token not in message and hash_token(token) not in message
    assert c.closed(), "the connection stayed open after a refusal"
    c.close()
    return message


def test_every_call_before_hello_is_refused_and_changes_nothing(
        served: tuple[Boss, int]) -> None:
    boss, port = served
    _, _, token = boss.add_worker(name="w1")
    before = snapshot(boss)
    messages = set()
    for name, args in CALLS.items():
        c = Line(port)
        messages.add(refused_and_closed(c, c.call(name, args(1)), token))
    # hello with anything but a string token is malformed, and gets no further
    for args in ({}, {"token": None}, {"token": 12345}, {"token": [token]}):
        c = Line(port)
        r = c.call("hello", args)
        assert r["error"]["code"] in ("malformed", "unauthorized"), r
        assert c.call("pop", {"n": 1})["error"]["code"] == "unauthorized"
        assert c.closed()
        c.close()
    after = snapshot(boss)
    assert after == before
    # one fixed text, whatever was asked: no task, worker or table name in it
    assert messages == {"say hello (with your token) first"}
    print(f"\n{len(CALLS)} calls before hello and 4 malformed hellos refused; "
          f"{sum(len(v) for v in before.values())} rows unchanged")


def test_wrong_tokens_are_refused_and_change_nothing(served: tuple[Boss, int]) -> None:
    boss, port = served
    _, _, token = boss.add_worker(name="w1")
    _, _, other = boss.add_worker(name="w2")
    before = snapshot(boss)
    wrong = ["", "wrong", token[:-1], token + "x", token.upper() if token.upper() != token
             else token.lower(), " " + token, token + "\n", hash_token(token),
             token[: len(token) // 2], "x" * 10_000, token + other]
    for bad in wrong:
        c = Line(port)
        reply = c.call("hello", {"token": bad, "slots": 1})
        message = refused_and_closed(c, reply, bad if len(bad) >= 8 else None)
        assert "w1" not in message and "w2" not in message
    assert snapshot(boss) == before
    assert states(boss) == {"a": "ready", "b": "ready"}
    print(f"\n{len(wrong)} wrong tokens refused (incl. the stored hash itself); "
          "no row changed")


def test_only_the_hash_of_a_token_is_stored(served: tuple[Boss, int]) -> None:
    boss, port = served
    _, _, token = boss.add_worker(name="w1")
    hello(port, token).close()  # a hello writes the worker row too
    dump = json.dumps(snapshot(boss), default=str)
    assert token not in dump
    assert hash_token(token) in dump


def test_tokens_of_ended_workers_are_refused(served: tuple[Boss, int]) -> None:
    boss, port = served
    _, _, gone = boss.add_worker(name="gone")
    _, _, stopped = boss.add_worker(name="stopped")
    c = hello(port, gone)  # said goodbye: its token is dead
    assert c.call("goodbye", {"reason": "done"})["result"] == {}
    assert c.closed()
    c.close()
    held = hello(port, stopped)  # still connected when the admin terminates it
    assert held.call("pop", {"n": 1})["result"]["tasks"]
    boss.terminate(["stopped"], providers=lambda name: pytest.fail(f"provider {name} used"))
    before = snapshot(boss)
    for token in (gone, stopped):
        c = Line(port)
        refused_and_closed(c, c.call("hello", {"token": token}), token)
    # the connection that was open gets no more work, and cannot revive itself
    assert held.call("pop", {"n": 1})["result"] == {"drain": True}
    assert held.call("heartbeat", {"attempts": [1, 2]})["result"]["cancel"] == [1, 2]
    assert snapshot(boss)["attempts"] == before["attempts"]
    assert states(boss) == {"a": "ready", "b": "ready"}
    held.close()


def test_one_workers_token_cannot_touch_another_workers_attempt(
        served: tuple[Boss, int]) -> None:
    """A's attempt, reported on by B through every attempt-scoped call: nothing moves."""
    boss, port = served
    _, _, ta = boss.add_worker(name="wa")
    _, _, tb = boss.add_worker(name="wb")
    a, b = hello(port, ta), hello(port, tb)
    (mine,) = a.call("pop", {"n": 1})["result"]["tasks"]
    aid = mine["attempt_id"]
    before = snapshot(boss)
    tries = 0
    for outcome in ("succeeded", "failed", "cancelled", "timeout"):
        r = b.call("complete", {"attempt_id": aid, "outcome": outcome, "exit_status": 0,
                                "pop": 1, "events": [{"attempt_id": aid,
                                                      "kind": "stage-out.finished"}]})
        assert r["error"]["code"] == "not_current", r
        tries += 1
    r = b.call("heartbeat", {"attempts": [aid]})
    assert r["result"]["cancel"] == [aid]  # "not yours": B is told to drop it, A is not
    r = b.call("event", {"events": [{"attempt_id": aid, "kind": k} for k in
                                    ("execution.started", "execution.finished",
                                     "stage-in.started")]})
    assert r["result"]["not_current"] == [aid]
    tries += 2
    after = snapshot(boss)
    # B's calls changed nothing of A's: not the lease (heartbeat), not the events
    # table, not the attempt or the task; only B's own last_seen moved
    for table in before:
        if table != "workers":
            assert after[table] == before[table], table
    assert states(boss)["a" if mine["name"] == "a" else "b"] == "running"
    # the control: A's own report on the same attempt is taken
    r = a.call("complete", {"attempt_id": aid, "outcome": "succeeded", "exit_status": 0})
    assert r["result"]["accepted"] is True, r
    a.close()
    b.close()
    print(f"\n{tries} foreign reports on one attempt refused; the owner's accepted")
