"""Read-only queries for ``boss report``: workers, attempt totals, recent attempts,
failures and the slowest tasks.

Aggregates are computed in SQL so that a run of a million attempts is read
in a few scans; only the capped lists (recent attempts, failures) come back
row by row. ``now`` stands in for the end of attempts still running.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Float, func, literal, select

from boss.lifecycle import AttemptState
from boss.models import Attempt, Task, Worker

A = AttemptState
# attempt outcomes listed in the report's failures table
FAILURES = (A.FAILED, A.TIMEOUT, A.LOST)


def _duration(now: float) -> Any:
    return func.coalesce(Attempt.finished_at, literal(now, Float)) - Attempt.started_at


def workers(conn: Connection) -> list[dict[str, Any]]:
    """Every worker ever registered, in id order (terminated ones too: they cost)."""
    q = select(Worker.id, Worker.name, Worker.provider, Worker.state, Worker.slots,
               Worker.created_at, Worker.last_seen).order_by(Worker.id)
    return [dict(r._mapping) for r in conn.execute(q)]


def attempt_totals(conn: Connection, now: float) -> dict[str, Any]:
    """Count, first start, last end (``now`` if one runs) and tasks that ran at all."""
    row = conn.execute(select(
        func.count(), func.min(Attempt.started_at),
        func.max(func.coalesce(Attempt.finished_at, literal(now, Float))),
        func.count(func.distinct(Attempt.task_id)),
    )).one()
    return {"count": int(row[0]), "first_start": row[1], "last_end": row[2],
            "tasks_run": int(row[3])}


def attempts_by_state(conn: Connection) -> dict[str, int]:
    q = select(Attempt.state, func.count()).group_by(Attempt.state)
    return {state: int(n) for state, n in conn.execute(q)}


def busy_by_worker(conn: Connection, now: float) -> dict[int | None, float]:
    """Seconds of attempts per worker id (None: the worker row was deleted)."""
    q = select(Attempt.worker_id, func.sum(_duration(now))).group_by(Attempt.worker_id)
    return {wid: float(s or 0.0) for wid, s in conn.execute(q)}


def attempts_by_worker(conn: Connection) -> dict[int | None, int]:
    q = select(Attempt.worker_id, func.count()).group_by(Attempt.worker_id)
    return {wid: int(n) for wid, n in conn.execute(q)}


def _attempt_dict(r: Any) -> dict[str, Any]:
    d = dict(r._mapping)
    try:
        metrics = json.loads(d["metrics"]) if d["metrics"] else {}
    except ValueError:  # written by a worker: a bad blob must not break the report
        metrics = {}
    d["metrics"] = metrics if isinstance(metrics, dict) else {}
    return d


def recent_attempts(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` most recently started attempts, oldest first, with task names."""
    q = (select(Attempt.id, Attempt.task_id, Task.name.label("task"), Attempt.number,
                Attempt.worker_id, Attempt.state, Attempt.started_at, Attempt.finished_at,
                Attempt.exit_status, Attempt.reason, Attempt.metrics)
         .join(Task, Task.id == Attempt.task_id)
         .order_by(Attempt.started_at.desc(), Attempt.id.desc()).limit(limit))
    rows = [_attempt_dict(r) for r in conn.execute(q)]
    rows.reverse()
    return rows


def failures(conn: Connection, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The ``limit`` latest failed, timed out or lost attempts, and how many there are."""
    total = conn.execute(
        select(func.count()).select_from(Attempt).where(Attempt.state.in_(FAILURES))
    ).scalar_one()
    q = (select(Attempt.id, Task.name.label("task"), Attempt.number, Attempt.worker_id,
                Attempt.state, Attempt.started_at, Attempt.finished_at, Attempt.exit_status,
                Attempt.reason, Attempt.stderr_tail)
         .join(Task, Task.id == Attempt.task_id)
         .where(Attempt.state.in_(FAILURES))
         .order_by(Attempt.finished_at.desc(), Attempt.id.desc()).limit(limit))
    return [dict(r._mapping) for r in conn.execute(q)], int(total)


def slowest_tasks(conn: Connection, now: float, limit: int) -> list[dict[str, Any]]:
    """Tasks with the longest single attempt: name, state, attempts, longest and total."""
    dur = _duration(now)
    per_task = (select(Attempt.task_id, func.max(dur).label("longest"),
                       func.sum(dur).label("total"), func.count().label("attempts"))
                .group_by(Attempt.task_id).subquery())
    q = (select(Task.id, Task.name, Task.state, per_task.c.attempts, per_task.c.longest,
                per_task.c.total)
         .join(per_task, per_task.c.task_id == Task.id)
         .order_by(per_task.c.longest.desc(), Task.id).limit(limit))
    return [dict(r._mapping) for r in conn.execute(q)]


def busy_by_task_worker(conn: Connection, task_ids: Sequence[int], now: float
                        ) -> dict[int, dict[int | None, float]]:
    """Attempt seconds of these tasks per worker: what their cost is made of."""
    if not task_ids:
        return {}
    q = (select(Attempt.task_id, Attempt.worker_id, func.sum(_duration(now)))
         .where(Attempt.task_id.in_(list(task_ids)))
         .group_by(Attempt.task_id, Attempt.worker_id))
    out: dict[int, dict[int | None, float]] = {}
    for tid, wid, seconds in conn.execute(q):
        out.setdefault(int(tid), {})[wid] = float(seconds or 0.0)
    return out
