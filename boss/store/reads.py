"""Read-only queries: status counts, task listings, one task in full."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, func, select

from boss.errors import NotFound
from boss.lifecycle import TaskState
from boss.models import Attempt, Task, TaskEdge


def task_counts(conn: Connection) -> dict[str, int]:
    counts = {str(s): 0 for s in TaskState}
    for state, n in conn.execute(select(Task.state, func.count()).group_by(Task.state)):
        counts[state] = int(n)
    return counts


def tasks(conn: Connection, state: str | None, after_id: int, limit: int) -> list[dict[str, Any]]:
    """A page of tasks in id order, after ``after_id`` (keyset paging stays fast)."""
    q = (select(Task.id, Task.name, Task.state, Task.priority, Task.tries, Task.lost,
                Task.max_tries, Task.updated_at, Task.reason)
         .where(Task.id > after_id).order_by(Task.id).limit(limit))
    if state:
        q = q.where(Task.state == state)
    return [dict(r._mapping) for r in conn.execute(q)]


def task(conn: Connection, name: str) -> dict[str, Any]:
    row = conn.execute(select(Task).where(Task.name == name)).first()
    if row is None:
        raise NotFound(f"no task named {name!r} (see `boss tasks`)")
    attempts = conn.execute(
        select(Attempt).where(Attempt.task_id == row.id).order_by(Attempt.id)).all()
    parents = conn.execute(
        select(Task.name, Task.state).join(TaskEdge, TaskEdge.parent_id == Task.id)
        .where(TaskEdge.child_id == row.id).order_by(Task.id)).all()
    children = conn.execute(
        select(Task.name, Task.state).join(TaskEdge, TaskEdge.child_id == Task.id)
        .where(TaskEdge.parent_id == row.id).order_by(Task.id).limit(100)).all()
    return {
        "id": row.id, "name": row.name, "state": row.state, "priority": row.priority,
        "tries": row.tries, "max_tries": row.max_tries, "lost": row.lost,
        "pending_parents": row.pending_parents, "reason": row.reason,
        "created_at": row.created_at, "updated_at": row.updated_at,
        "document": json.loads(row.document),
        "parents": [{"name": n, "state": s} for n, s in parents],
        "children": [{"name": n, "state": s} for n, s in children],
        "attempts": [
            {"id": a.id, "number": a.number, "worker_id": a.worker_id, "state": a.state,
             "started_at": a.started_at, "finished_at": a.finished_at,
             "lease_expires_at": a.lease_expires_at, "exit_status": a.exit_status,
             "reason": a.reason, "metrics": json.loads(a.metrics) if a.metrics else {},
             "stdout_tail": a.stdout_tail, "stderr_tail": a.stderr_tail}
            for a in attempts
        ],
    }
