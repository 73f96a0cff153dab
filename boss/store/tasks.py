"""Task and attempt transitions, each inside the caller's one transaction.

The running attempt row is the lock and the fence: every ending (complete,
cancel, lease expiry) is an ``UPDATE attempts ... WHERE state = 'running'``,
so exactly one of several racing endings wins, and a report for an attempt
that is no longer running is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Executable, Select, bindparam, exists, insert, select, update
from sqlalchemy.orm import aliased

from boss.errors import InvalidState, NotFound
from boss.lifecycle import RETRYABLE, AttemptState, Outcome, TaskState, after_attempt
from boss.models import Attempt, Task, TaskEdge
from boss.store import events, fast
from protocol.messages import Result

A = AttemptState
T = TaskState


@dataclass(frozen=True)
class Ended:
    """An attempt that ended, and what it did to its task."""

    attempt_id: int
    task_id: int
    task_state: TaskState


@dataclass(frozen=True)
class Claimed:
    """A task handed to a worker (what it gets as a ``messages.Assignment``), with its
    document as the JSON text the push stored: spliced into the reply as it is,
    never decoded and encoded again on the way (benchmark 3)."""

    attempt_id: int
    task_id: int
    name: str
    number: int  # 1 for the first try
    document_json: str

    @property
    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.document_json)
        return doc

    def to_wire(self) -> dict[str, Any]:
        return {"attempt_id": self.attempt_id, "task_id": self.task_id, "name": self.name,
                "number": self.number, "document": self.document}

    def wire_json(self) -> str:
        """:meth:`to_wire` as JSON text, on one line."""
        doc = self.document_json
        if "\n" in doc:  # a line break between tokens (stored documents have none)
            doc = json.dumps(self.document, separators=(",", ":"), ensure_ascii=False)
        return (f'{{"attempt_id":{self.attempt_id},"task_id":{self.task_id},"name":'
                f'{json.dumps(self.name, ensure_ascii=False)},"number":{self.number},'
                f'"document":{doc}}}')


# The hot path's statements are built once, with bind parameters: building one
# (and computing its cache key) cost more than running it, per task.
CLAIM = (
    update(Task)
    .where(Task.id.in_(
        select(Task.id).where(Task.state == T.READY)
        .order_by(Task.priority.desc(), Task.id)
        .limit(bindparam("p_n"))
        .with_for_update(skip_locked=True)
        .scalar_subquery()))
    .values(state=T.RUNNING, updated_at=bindparam("p_now"))
    .returning(Task.id, Task.name, Task.document, Task.tries, Task.lost, Task.priority)
)
_OPENS: dict[int, Executable] = {}


def _open(n: int) -> Executable:
    """INSERT of n attempts in one statement (RETURNING gives each its task: order is free)."""
    stmt = _OPENS.get(n)
    if stmt is None:
        stmt = _OPENS[n] = insert(Attempt).values([
            {"task_id": bindparam(f"p_task{k}"), "number": bindparam(f"p_number{k}"),
             "worker_id": bindparam("p_worker"), "state": A.RUNNING,
             "started_at": bindparam("p_now"), "lease_expires_at": bindparam("p_lease")}
            for k in range(n)]).returning(Attempt.id, Attempt.task_id)
    return stmt


def claim(conn: Connection, worker_id: int, n: int, lease: float, now: float) -> list[Claimed]:
    """Atomically move up to ``n`` ready tasks to running and open their attempts."""
    if n <= 0:
        return []
    rows = fast.execute(conn, CLAIM, {"p_n": n, "p_now": now})
    if not rows:
        return []
    # RETURNING order is unspecified: hand them out in claim order
    rows = sorted(rows, key=lambda r: (-r.priority, r.id))
    values: dict[str, object] = {"p_worker": worker_id, "p_now": now,
                                 "p_lease": now + lease}
    for k, r in enumerate(rows):
        values[f"p_task{k}"] = r.id
        values[f"p_number{k}"] = r.tries + r.lost + 1
    attempts = fast.execute(conn, _open(len(rows)), values)
    by_task = {r.id: r for r in rows}
    out = []
    for attempt_id, task_id in attempts:
        r = by_task[task_id]
        out.append(Claimed(attempt_id, task_id, r.name, r.tries + r.lost + 1, r.document))
    events.record_many(conn, [{"kind": "job.started", "task_id": a.task_id,
                               "attempt_id": a.attempt_id, "worker_id": worker_id,
                               "data": {"attempt": a.number}, "ts": now} for a in out])
    return out


def heartbeat(conn: Connection, worker_id: int, attempt_ids: Sequence[int], lease: float,
              now: float) -> list[int]:
    """Renew the leases of the worker's running attempts; return those to cancel."""
    if not attempt_ids:
        return []
    renewed = conn.execute(
        update(Attempt)
        .where(Attempt.id.in_(attempt_ids), Attempt.state == A.RUNNING,
               Attempt.worker_id == worker_id)
        .values(lease_expires_at=now + lease)
        .returning(Attempt.id)
    ).scalars().all()
    return sorted(set(attempt_ids) - set(renewed))


def unheard(conn: Connection, worker_id: int, known: Sequence[int], started_before: float
            ) -> list[Claimed]:
    """The worker's running attempts that it did not list, claimed before ``started_before``.

    A claim whose reply never reached the worker (the boss killed, or the link
    broken, after the commit) leaves such attempts: handing them over again
    lets the worker run them, instead of their leases expiring into lost
    attempts. A worker holds few attempts, so they are filtered here, not in SQL.
    """
    mine = set(known)
    rows = fast.execute(conn, _RUNNING_OF, {"p_worker": worker_id})
    ids = [r.id for r in rows if r.id not in mine and r.started_at < started_before]
    if not ids:
        return []
    found = conn.execute(
        select(Attempt.id, Attempt.task_id, Attempt.number, Task.name, Task.document)
        .join(Task, Task.id == Attempt.task_id).where(Attempt.id.in_(ids))
        .order_by(Attempt.id)).all()
    return [Claimed(r.id, r.task_id, r.name, r.number, r.document) for r in found]


_FINISH = {
    mine: update(Attempt)
    .where(Attempt.id == bindparam("p_attempt"), Attempt.state == A.RUNNING,
           *([Attempt.worker_id == bindparam("p_worker")] if mine else []))
    .values(state=bindparam("p_state"), finished_at=bindparam("p_now"),
            exit_status=bindparam("p_exit"), reason=bindparam("p_reason"),
            metrics=bindparam("p_metrics"), stdout_tail=bindparam("p_stdout"),
            stderr_tail=bindparam("p_stderr"))
    .returning(Attempt.task_id)
    for mine in (True, False)  # the worker's own attempt, or any (the CLI, tests)
}


def complete(conn: Connection, worker_id: int | None, result: Result, now: float) -> Ended | None:
    """End an attempt with the worker's result; None when it is no longer current."""
    state = {"succeeded": A.SUCCEEDED, "failed": A.FAILED, "timeout": A.TIMEOUT,
             "cancelled": A.CANCELLED}[result.outcome]
    found = fast.execute(conn, _FINISH[worker_id is not None], {
        "p_attempt": result.attempt_id, "p_worker": worker_id, "p_state": state,
        "p_now": now, "p_exit": result.exit_status, "p_reason": result.reason or None,
        "p_metrics": json.dumps(result.metrics), "p_stdout": result.stdout_tail or None,
        "p_stderr": result.stderr_tail or None})
    if not found:
        return None
    row = found[0]
    out = _end(conn, row.task_id, state, result.reason, now)
    task_state = out.task_state
    events.record(conn, "job.finished", task_id=row.task_id, attempt_id=result.attempt_id,
                  worker_id=worker_id, ts=now,
                  data={"outcome": result.outcome, "exit_status": result.exit_status,
                        "task_state": str(task_state), "reason": result.reason,
                        **result.metrics})
    _propagate(conn, row.task_id, out, now)
    return Ended(result.attempt_id, row.task_id, task_state)


def expire(conn: Connection, now: float, worker_id: int | None = None) -> list[Ended]:
    """Mark running attempts past their lease (or all of one worker's) lost; requeue."""
    cond = [Attempt.state == A.RUNNING]
    cond.append(Attempt.worker_id == worker_id if worker_id is not None
                else Attempt.lease_expires_at < now)
    reason = "worker lost" if worker_id is not None else "lease expired"
    rows = conn.execute(
        update(Attempt).where(*cond)
        .values(state=A.LOST, finished_at=now, reason=reason)
        .returning(Attempt.id, Attempt.task_id, Attempt.worker_id)
    ).all()
    ended = []
    for r in rows:
        out = _end(conn, r.task_id, A.LOST, reason, now)
        st = out.task_state
        events.record(conn, "job.lost", task_id=r.task_id, attempt_id=r.id,
                      worker_id=r.worker_id, ts=now, data={"task_state": str(st)})
        _propagate(conn, r.task_id, out, now)
        ended.append(Ended(r.id, r.task_id, st))
    return ended


_TASK_COUNTS = select(Task.tries, Task.lost, Task.max_tries).where(Task.id == bindparam("p_task"))
# positional (boss.store.fast.run_many): the group commit runs it once per task ended
END_TASK = fast.Many(
    "UPDATE tasks SET state = ?, tries = ?, lost = ?, updated_at = ?, reason = ? WHERE id = ?",
    "UPDATE tasks AS t SET state = v.state, tries = v.tries, lost = v.lost, "
    "updated_at = v.updated_at, reason = v.reason FROM unnest(%s::text[], %s::integer[], "
    "%s::integer[], %s::float8[], %s::text[], %s::integer[]) "
    "AS v(state, tries, lost, updated_at, reason, id) WHERE t.id = v.id")


def end_task_row(task_id: int, out: Outcome, reason: str | None, now: float
                 ) -> tuple[Any, ...]:
    """END_TASK's values: the task's state after its attempt, and why if not succeeded."""
    return (out.task_state.value, out.tries, out.lost, now,
            None if out.task_state is T.SUCCEEDED else (reason or None), task_id)


def _end(conn: Connection, task_id: int, attempt: AttemptState, reason: str | None,
         now: float) -> Outcome:
    task = fast.execute(conn, _TASK_COUNTS, {"p_task": task_id})[0]
    out = after_attempt(attempt, task.tries, task.lost, task.max_tries)
    fast.run_many(conn, END_TASK, [end_task_row(task_id, out, reason, now)])
    return out


def _propagate(conn: Connection, task_id: int, out: Outcome, now: float) -> None:
    """After the task's own event: release its children, or fail them (the cascade)."""
    if out.task_state is T.SUCCEEDED:
        release(conn, [task_id], now)
    if out.cascade:
        cascade(conn, [task_id], now)


_KIDS = select(TaskEdge.child_id).where(TaskEdge.parent_id == bindparam("p_parent"))
_ONE_PARENT_LESS = (update(Task).where(Task.id.in_(_KIDS.scalar_subquery()))
                    .values(pending_parents=Task.pending_parents - 1))
_FREED = (update(Task)
          .where(Task.id.in_(_KIDS.scalar_subquery()), Task.state == T.WAITING,
                 Task.pending_parents <= 0)
          .values(state=T.READY, updated_at=bindparam("p_now"))
          .returning(Task.id))


def release(conn: Connection, parent_ids: Iterable[int], now: float) -> None:
    """Parents succeeded: decrement their children's counters, make the free ones ready."""
    for pid in parent_ids:
        fast.execute(conn, _ONE_PARENT_LESS, {"p_parent": pid})
        ready = [r[0] for r in fast.execute(conn, _FREED, {"p_parent": pid, "p_now": now})]
        events.record_many(conn, [{"kind": "job.ready", "task_id": i, "ts": now,
                                   "data": {"released_by": pid}} for i in ready])


def _descendants(roots: Sequence[int]) -> Select[tuple[int]]:
    seed = select(TaskEdge.child_id.label("id")).where(TaskEdge.parent_id.in_(roots))
    tree = seed.cte("tree", recursive=True)
    edge = aliased(TaskEdge)
    tree = tree.union(select(edge.child_id).where(edge.parent_id == tree.c.id))
    return select(tree.c.id)


def cascade(conn: Connection, roots: Sequence[int], now: float) -> int:
    """Every waiting or ready descendant of ``roots`` becomes upstream_failed."""
    # count by RETURNING: pysqlite reports rowcount -1 for a statement that starts with WITH
    failed = conn.execute(
        update(Task)
        .where(Task.id.in_(_descendants(roots)), Task.state.in_([T.WAITING, T.READY]))
        .values(state=T.UPSTREAM_FAILED, updated_at=now)
        .returning(Task.id)
    ).scalars().all()
    events.record_many(conn, [{"kind": "job.upstream-failed", "task_id": i, "ts": now,
                               "data": {"because_of": list(roots)[:10]}} for i in failed])
    return len(failed)


def find(conn: Connection, name: str) -> tuple[int, TaskState]:
    row = conn.execute(select(Task.id, Task.state).where(Task.name == name)).first()
    if row is None:
        raise NotFound(f"no task named {name!r} (see `boss tasks`)")
    return row.id, TaskState(row.state)


def cancel(conn: Connection, name: str, now: float) -> TaskState:
    """Cancel a task (a running attempt is told at its next heartbeat)."""
    task_id, state = find(conn, name)
    if state not in (T.WAITING, T.READY, T.RUNNING):
        raise InvalidState(f"task {name!r} is {state}; only waiting, ready or running "
                           "tasks can be cancelled")
    conn.execute(update(Attempt).where(Attempt.task_id == task_id, Attempt.state == A.RUNNING)
                 .values(state=A.CANCELLED, finished_at=now, reason="cancelled by the user"))
    conn.execute(update(Task).where(Task.id == task_id)
                 .values(state=T.CANCELLED, updated_at=now, reason="cancelled by the user"))
    # the cause before its effects (each upstream-failed descendant has its own event)
    events.record(conn, "job.cancelled", task_id=task_id, ts=now, data={"was": str(state)})
    cascade(conn, [task_id], now)
    return state


def retry(conn: Connection, names: Sequence[str] | None, now: float) -> int:
    """Put failed / upstream_failed / cancelled tasks back in the queue.

    ``names=None`` retries every failed task. Descendants that were
    upstream_failed only because of these tasks go back to waiting.
    """
    if names is None:
        ids = list(conn.execute(select(Task.id).where(Task.state == T.FAILED)).scalars())
    else:
        ids = []
        for name in names:
            task_id, state = find(conn, name)
            if state not in RETRYABLE:
                raise InvalidState(f"task {name!r} is {state}; only failed, upstream_failed "
                                   "or cancelled tasks can be retried")
            ids.append(task_id)
    if not ids:
        return 0
    parent = aliased(Task)
    bad_parent = exists().where(
        TaskEdge.child_id == Task.id, TaskEdge.parent_id == parent.id,
        parent.state.in_([T.FAILED, T.UPSTREAM_FAILED, T.CANCELLED]),
    )
    moved = 0
    for chunk in (ids[i : i + 900] for i in range(0, len(ids), 900)):
        conn.execute(update(Task).where(Task.id.in_(chunk))
                     .values(state=T.WAITING, tries=0, lost=0, reason=None, updated_at=now))
        # a retried task may itself wait on a failed parent: it stays upstream_failed
        conn.execute(update(Task).where(Task.id.in_(chunk), bad_parent)
                     .values(state=T.UPSTREAM_FAILED))
        moved += len(chunk)
        # level by level, descendants with no failed parent left return to waiting
        for _ in range(100_000):
            back = conn.execute(
                update(Task)
                .where(Task.id.in_(_descendants(chunk)), Task.state == T.UPSTREAM_FAILED,
                       ~bad_parent)
                .values(state=T.WAITING, updated_at=now)
                .returning(Task.id)
            ).all()
            if not back:
                break
        # waiting tasks whose parents all succeeded are ready
        ready = conn.execute(update(Task)
                             .where(Task.state == T.WAITING, Task.pending_parents <= 0,
                                    Task.id.in_(select(Task.id).where(Task.id.in_(chunk))
                                                .union(_descendants(chunk))))
                             .values(state=T.READY)
                             .returning(Task.id)).scalars().all()
        events.record_many(conn, [{"kind": "job.ready", "task_id": i, "ts": now}
                                  for i in ready])
    events.record_many(conn, [{"kind": "job.retried", "task_id": i, "ts": now} for i in ids])
    return moved



def busy(conn: Connection) -> bool:
    """Is any task still waiting, ready or running (so a worker should not drain)?"""
    return bool(fast.execute(conn, _ANY_LEFT))


_ANY_LEFT = select(Task.id).where(Task.state.in_([T.WAITING, T.READY, T.RUNNING])).limit(1)


def running_tasks_of(conn: Connection, worker_id: int, attempt_ids: set[int]
                     ) -> dict[int, int]:
    """attempt id -> task id, for those of ``attempt_ids`` the worker runs now."""
    if not attempt_ids:
        return {}
    # a worker runs a few attempts: all of them, filtered here, make one statement to cache
    rows = fast.execute(conn, _RUNNING_OF, {"p_worker": worker_id})
    return {int(r.id): int(r.task_id) for r in rows if r.id in attempt_ids}


_RUNNING_OF = select(Attempt.id, Attempt.task_id, Attempt.started_at).where(
    Attempt.worker_id == bindparam("p_worker"), Attempt.state == A.RUNNING)
