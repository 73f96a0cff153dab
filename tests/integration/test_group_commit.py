"""One transaction for a batch of calls: a failing call is rolled back alone.

The RPC server applies every call that arrived together in one transaction:
its pops and completes set-based, and when that fails, call by call, each
under its own savepoint (boss/store/fast.py); these check that a call that
fails half-way leaves nothing behind while its neighbours commit, on SQLite
and on a real PostgreSQL server.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event

from boss import calls
from boss.errors import DatabaseError
from boss.service import Boss
from boss.store import fast
from boss.store import tasks as task_rows
from boss.transitions import PopAnswer
from protocol.messages import Result
from tests.conftest import fresh_pg_url, make_settings
from tests.integration.test_transitions import bad, ok, push, states, task, worker

NO_SUCH_WORKER = 999_999


def test_a_call_failing_half_way_is_undone_and_its_neighbours_commit(
        boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("a"), task("b"), task("c")])
    w = worker(boss)
    # a pop for a worker row that does not exist moves a task to running, then
    # fails on the attempt's foreign key: that task must be ready again
    first, broken, last = boss.apply([calls.Pop(w, 1), calls.Pop(NO_SUCH_WORKER, 1),
                                      calls.Pop(w, 1)])
    assert isinstance(first, PopAnswer) and isinstance(last, PopAnswer)
    assert isinstance(broken, DatabaseError)
    assert [a.name for a in first.tasks + last.tasks] == ["a", "b"]
    assert states(boss) == {"a": "running", "b": "running", "c": "ready"}
    started = boss.events(kinds=["job.started"])
    assert sorted(e["task_id"] for e in started) == sorted(
        a.task_id for a in first.tasks + last.tasks)


def test_a_call_failing_alone_in_its_batch_is_answered_and_undone(
        boss: Boss, tmp_path: Path) -> None:
    """A batch of one has no savepoint: its failure rolls back the whole transaction."""
    push(boss, tmp_path, [task("a")])
    (broken,) = boss.apply([calls.Pop(NO_SUCH_WORKER, 1)])
    assert isinstance(broken, DatabaseError) and "Pop" in str(broken)
    assert states(boss) == {"a": "ready"}
    assert boss.events(kinds=["job.started"]) == []
    (popped,) = boss.apply([calls.Pop(worker(boss), 1)])
    assert [t.name for t in popped.tasks] == ["a"]


def test_the_batch_goes_on_after_a_failed_call(boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("a"), task("b")])
    w = worker(boss)
    (a,) = boss.claim(w, 1)
    done, broken, popped = boss.apply([
        calls.Complete(w, Result(a.attempt_id, "succeeded", exit_status=0)),
        calls.Pop(NO_SUCH_WORKER, 1),
        calls.Pop(w, 1)])
    assert done is not None and done.task_state == "succeeded"
    assert isinstance(broken, DatabaseError)
    assert [t.name for t in popped.tasks] == ["b"]
    assert states(boss) == {"a": "succeeded", "b": "running"}


def test_a_duplicate_a_late_and_a_foreign_complete_in_one_batch_change_nothing(
        boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("a"), task("b"), task("c"), task("d")])
    w, other = worker(boss), worker(boss)
    (a,) = boss.claim(w, 1)
    boss.claim(other, 1)  # b
    (c,) = boss.claim(other, 1)
    boss.goodbye(other)  # b and c are lost: their results come too late
    (b2,) = boss.claim(w, 1)  # b's second attempt (c waits behind it in the queue)
    first, again, late, foreign, popped = boss.apply([
        calls.Complete(w, ok(a.attempt_id)),
        calls.Complete(w, bad(a.attempt_id)),       # the same attempt twice: refused
        calls.Complete(other, ok(c.attempt_id)),    # lost already
        calls.Complete(other, ok(b2.attempt_id)),   # not that worker's attempt
        calls.Pop(w, 5)])
    assert first is not None and first.task_state == "succeeded"
    assert (again, late, foreign) == (None, None, None)
    assert isinstance(popped, PopAnswer) and [t.name for t in popped.tasks] == ["c", "d"]
    shown = boss.show("a")["attempts"]
    assert [(x["state"], x["exit_status"]) for x in shown] == [("succeeded", 0)]
    assert states(boss) == {"a": "succeeded", "b": "running", "c": "running",
                            "d": "running"}
    finished = boss.events(kinds=["job.finished"])
    assert [e["attempt_id"] for e in finished] == [a.attempt_id]


def test_parents_finishing_in_one_batch_release_their_child_once(
        boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("p1"), task("p2"), task("kid", after=["p1", "p2"]),
                          task("solo", after=["p2"])])
    w = worker(boss)
    p1, p2 = boss.claim(w, 2)
    ends = boss.apply([calls.Complete(w, ok(p1.attempt_id)),
                       calls.CompleteAndPop(w, ok(p2.attempt_id), (), 5)])
    assert ends[0] is not None and ends[0].task_state == "succeeded"
    ended, popped = ends[1]
    assert ended is not None and ended.task_state == "succeeded"
    # the pops come after every complete of the batch: the released children are there
    assert popped is not None and sorted(t.name for t in popped.tasks) == ["kid", "solo"]
    ready = boss.events(kinds=["job.ready"])
    assert sorted((e["task"], e["data"]["released_by"]) for e in ready) == [
        ("kid", p2.task_id), ("solo", p2.task_id)]
    finished = {e["task"]: e["id"] for e in boss.events(kinds=["job.finished"])}
    assert all(e["id"] > finished["p2"] for e in ready)  # the cause before its effects


def test_an_event_for_an_attempt_another_call_completes_is_applied_in_call_order(
        boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("a"), task("b")])
    w = worker(boss)
    a, b = boss.claim(w, 2)

    def staged(attempt_id: int) -> calls.Event:
        return calls.Event(w, attempt_id, "stage-out.finished", {"bytes": 1})

    # one by one: the first call's event (for b) is stored, the second's (for a, which
    # the first call completed) comes too late and is dropped
    ends = boss.apply([calls.CompleteAndPop(w, ok(a.attempt_id), (staged(b.attempt_id),)),
                       calls.CompleteAndPop(w, ok(b.attempt_id), (staged(a.attempt_id),))])
    assert [e is not None for e, _ in ends] == [True, True]
    stored = boss.events(kinds=["job.stage-out.finished"])
    assert [(e["attempt_id"], e["task_id"]) for e in stored] == [(b.attempt_id, b.task_id)]


def test_a_call_failing_in_the_database_alone_is_undone_and_its_neighbours_commit(
        boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("a"), task("b")])
    w = worker(boss)
    a, b = boss.claim(w, 2)
    # the wire allows any 64-bit exit status; PostgreSQL's column holds 32 bits
    huge = Result(a.attempt_id, "failed", exit_status=2**40, reason="odd")
    first, second = boss.apply([calls.Complete(w, huge), calls.Complete(w, ok(b.attempt_id))])
    assert second is not None and second.task_state == "succeeded"
    if boss.store.dialect == "postgresql":
        assert isinstance(first, DatabaseError) and "out of range" in str(first)
        assert states(boss) == {"a": "running", "b": "succeeded"}
    else:
        assert first is not None and first.task_state == "failed"
        assert states(boss) == {"a": "failed", "b": "succeeded"}


def test_pops_and_completes_of_a_batch_take_a_statement_per_kind_of_row(
        tmp_path: Path) -> None:
    boss = Boss(make_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db"))
    try:
        boss.init()
        push(boss, tmp_path, [task(f"t{i}") for i in range(40)])
        ws = [worker(boss) for _ in range(16)]
        held = [p.tasks[0] for p in boss.apply([calls.Pop(w, 1) for w in ws])]
        statements: list[str] = []

        @event.listens_for(boss.store.engine, "connect")
        def trace(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.set_trace_callback(statements.append)

        boss.store.close()  # every connection closed: those made from now on are traced
        out = boss.apply([calls.CompleteAndPop(w, ok(a.attempt_id), (), 1)
                          for w, a in zip(ws, held, strict=True)])
        assert all(e is not None and p is not None and len(p.tasks) == 1 for e, p in out)
        # one call at a time: a savepoint and an attempt INSERT each, among some 13
        # statements per call; together: no savepoint and one INSERT for the batch
        # (SQLite's trace shows every row of an executemany, and every trigger, as a
        # statement)
        def count(start: str) -> int:
            return sum(1 for s in statements if s.startswith(start))

        assert count("SAVEPOINT") == 0
        assert count("BEGIN") == 1  # set-based, it was not undone and applied call by call
        assert count("INSERT INTO attempts") == 1
        assert count("SELECT a.id, a.task_id") == 1  # the attempts the batch completes
        assert states(boss) == {**{f"t{i}": "succeeded" for i in range(16)},
                                **{f"t{i}": "running" for i in range(16, 32)},
                                **{f"t{i}": "ready" for i in range(32, 40)}}
    finally:
        boss.close()


def test_a_batch_of_varied_results_is_written_row_for_row(
        boss: Boss, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL a batch's attempts, tasks and events are written by one statement
    each over arrays (boss.store.fast.Many): every column of every row, NULLs too,
    must land as the call-by-call path writes it."""
    push(boss, tmp_path, [task("ok"), task("bad", retries=1), task("out"), task("gone"),
                          task("quiet")])
    w = worker(boss)
    got = {a.name: a for a in boss.claim(w, 5)}
    results = [
        Result(got["ok"].attempt_id, "succeeded", exit_status=0,
               metrics={"wall": 0.5, "max_rss_kb": 1024}, stdout_tail="out\n"),
        Result(got["bad"].attempt_id, "failed", exit_status=3, reason="exit status 3",
               stderr_tail="boom"),
        Result(got["out"].attempt_id, "timeout", reason="timed out after 1 s"),
        Result(got["gone"].attempt_id, "cancelled", reason="cancelled by the worker"),
        Result(got["quiet"].attempt_id, "succeeded", exit_status=0),
    ]

    set_based_only(monkeypatch)
    ends = boss.apply([calls.Complete(w, r) for r in results])
    assert [e.task_state if e else None for e in ends] == [
        "succeeded", "ready", "failed", "cancelled", "succeeded"]
    assert states(boss) == {"ok": "succeeded", "bad": "ready", "out": "failed",
                            "gone": "cancelled", "quiet": "succeeded"}
    shown = {n: boss.show(n) for n in got}
    assert shown["bad"]["tries"] == 1 and shown["bad"]["reason"] == "exit status 3"
    assert shown["quiet"]["reason"] is None
    rows = {n: (a["state"], a["exit_status"], a["reason"], a["metrics"], a["stdout_tail"],
                a["stderr_tail"], a["finished_at"] is not None)
            for n, s in shown.items() for a in s["attempts"]}
    assert rows == {
        "ok": ("succeeded", 0, None, {"wall": 0.5, "max_rss_kb": 1024}, "out\n", None, True),
        "bad": ("failed", 3, "exit status 3", {}, None, "boom", True),
        "out": ("timeout", None, "timed out after 1 s", {}, None, None, True),
        "gone": ("cancelled", None, "cancelled by the worker", {}, None, None, True),
        "quiet": ("succeeded", 0, None, {}, None, None, True),
    }
    finished = {e["task"]: e for e in boss.events(kinds=["job.finished"])}
    assert [finished[n]["attempt_id"] for n in got] == [r.attempt_id for r in results]
    assert all(e["worker_id"] == w for e in finished.values())
    assert finished["ok"]["data"] == {"outcome": "succeeded", "exit_status": 0,
                                      "task_state": "succeeded", "reason": "",
                                      "wall": 0.5, "max_rss_kb": 1024}
    assert finished["out"]["data"]["exit_status"] is None


def test_pops_finding_nothing_are_answered_set_based(
        boss: Boss, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether anything is left to run is asked inside the batch (on PostgreSQL, in its
    pipeline, after the claim's writes): "retry" while a task runs, then "drain"."""
    push(boss, tmp_path, [task("only")])
    w, idle, other = worker(boss), worker(boss), worker(boss)
    (only,) = boss.claim(w, 1)
    set_based_only(monkeypatch)
    first, second = boss.apply([calls.Pop(idle, 1), calls.Pop(other, 2)])
    assert isinstance(first, PopAnswer) and isinstance(second, PopAnswer)
    assert (first.tasks, second.tasks) == ([], [])
    assert first.retry_after and second.retry_after and not first.drain
    done, last = boss.apply([calls.Complete(w, ok(only.attempt_id)), calls.Pop(idle, 1)])
    assert done is not None and done.task_state == "succeeded"
    assert isinstance(last, PopAnswer) and last.drain


def test_a_batched_report_alone_in_its_batch_is_applied_set_based(
        boss: Boss, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's report of many results, alone in its batch, is many tasks: set-based
    (call by call it took a statement per row per task, each a round trip on
    PostgreSQL), with the cascades and the pop after the results."""
    push(boss, tmp_path, [task("a"), task("b"), task("c"), task("kid", after=["a"]),
                          task("later"), task("never", after=["b"])])
    w = worker(boss)
    a, b, c = boss.claim(w, 3)
    set_based_only(monkeypatch)
    (answer,) = boss.apply([calls.CompleteMany(
        w, (ok(a.attempt_id), bad(b.attempt_id), ok(c.attempt_id)), (), 5)])
    ends, popped = answer
    assert [e.task_state for e in ends] == ["succeeded", "failed", "succeeded"]
    # the pop comes after the results: a's child is ready for it, b's never will be
    assert isinstance(popped, PopAnswer)
    assert sorted(t.name for t in popped.tasks) == ["kid", "later"]
    assert states(boss) == {"a": "succeeded", "b": "failed", "c": "succeeded",
                            "kid": "running", "later": "running",
                            "never": "upstream_failed"}
    assert len(boss.events(kinds=["job.finished"])) == 3


def test_a_batched_report_alone_that_cannot_go_set_based_is_answered_alone(
        boss: Boss, tmp_path: Path) -> None:
    """The set-based path refuses a pop for a worker that is gone from the table; the
    report is then applied by itself, and fails whole (it is one call)."""
    push(boss, tmp_path, [task("a"), task("b"), task("c")])
    w = worker(boss)
    a, b = boss.claim(w, 2)
    (answer,) = boss.apply([calls.CompleteMany(
        NO_SUCH_WORKER, (ok(a.attempt_id), ok(b.attempt_id)), (), 1)])
    assert isinstance(answer, DatabaseError)  # c's attempt cannot name that worker
    assert states(boss) == {"a": "running", "b": "running", "c": "ready"}
    (answer,) = boss.apply([calls.CompleteMany(w, (ok(a.attempt_id), ok(b.attempt_id)))])
    ends, popped = answer
    assert [e.task_state for e in ends] == ["succeeded", "succeeded"] and popped is None


def set_based_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test when a batch falls back to call by call (which would hide a broken
    set-based statement behind the same answers)."""

    def not_alone(*_: Any) -> None:
        raise AssertionError("the batch fell back to call by call")

    monkeypatch.setattr(Boss, "_apply_alone", not_alone)
    monkeypatch.setattr(Boss, "_apply_only", not_alone)


@pytest.mark.postgres
def test_array_literals_read_back_as_their_values(pg_server: Any) -> None:
    """fast.pg_array builds the batch's arrays as text: every string (quotes,
    backslashes, braces, commas, "NULL", blanks), int, float and None must come back
    from PostgreSQL as it went in."""
    url = pg_server.url("postgres").replace("postgresql+psycopg", "postgresql")
    texts = st.lists(st.none() | st.text(st.characters(blacklist_characters="\x00",
                                                       blacklist_categories=("Cs",))),
                     max_size=20)
    ints = st.lists(st.none() | st.integers(-2**31, 2**31 - 1), max_size=20)
    floats = st.lists(st.none() | st.floats(allow_nan=False), max_size=20)

    with psycopg.connect(url, autocommit=True) as db:
        @settings(max_examples=300, deadline=None)
        @given(texts, ints, floats)
        def read_back(t: list[str | None], i: list[int | None], f: list[float | None]
                      ) -> None:
            row = db.execute("SELECT %s::text[], %s::integer[], %s::float8[]",
                             [fast.pg_array(t), fast.pg_array(i), fast.pg_array(f)],
                             prepare=False).fetchone()
            assert row == (t, i, f)

        read_back()
        tricky = ['', 'NULL', 'null', ' a ', '"', '\\', '\\"', '{}', 'a,b', '{"x": 1}',
                  'tab\there', 'line\nbreak', 'é ✓']
        (back,) = db.execute("SELECT %s::text[]", [fast.pg_array(tricky)]).fetchone()
        assert back == tricky


@pytest.mark.postgres
def test_a_batch_completing_an_attempt_being_cancelled_waits_and_leaves_it_cancelled(
        tmp_path: Path, pg_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fence on PostgreSQL is the attempts' UPDATE itself: a cancel not yet
    committed holds the attempt's row; the batch waits for it, then finds the attempt
    ended and answers None for it, and completes the other."""
    boss = Boss(make_settings(tmp_path, fresh_pg_url(pg_server)))
    try:
        boss.init()
        push(boss, tmp_path, [task("kept"), task("cancelled")])
        w = worker(boss)
        kept, doomed = boss.claim(w, 2)
        set_based_only(monkeypatch)
        answers: list[Any] = []
        with boss.store.tx() as conn:
            task_rows.cancel(conn, "cancelled", time.time())
            applying = threading.Thread(target=lambda: answers.append(boss.apply([
                calls.CompleteMany(w, (ok(kept.attempt_id), ok(doomed.attempt_id)))])))
            applying.start()
            applying.join(1.0)
            assert applying.is_alive() and not answers  # waiting for the cancel's row lock
        applying.join(30)
        assert not applying.is_alive()
        ((ends, _),) = answers[0]
        assert [e.task_state if e else None for e in ends] == ["succeeded", None]
        assert states(boss) == {"kept": "succeeded", "cancelled": "cancelled"}
        (attempt,) = boss.show("cancelled")["attempts"]
        assert attempt["state"] == "cancelled"
    finally:
        boss.close()
