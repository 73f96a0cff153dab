"""One transaction for a batch of calls: a failing call is rolled back alone.

The RPC server applies every call that arrived together in one transaction,
each under its own savepoint (boss/store/fast.py); these check that a call
that fails half-way leaves nothing behind while its neighbours commit, on
SQLite and on a real PostgreSQL server.
"""

from __future__ import annotations

from pathlib import Path

from boss import calls
from boss.errors import DatabaseError
from boss.service import Boss, PopAnswer
from protocol.messages import Result
from tests.integration.test_transitions import push, states, task, worker

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
