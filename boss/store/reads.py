"""Read-only queries: status counts, task listings, one task in full."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, func, select

from boss.errors import NotFound
from boss.lifecycle import TaskState
from boss.models import Attempt, Task, TaskEdge, TaskStateCount


def task_counts(conn: Connection) -> dict[str, int]:
    """Tasks by state, from the seven rows the triggers keep (not a count of the tasks)."""
    counts = {str(s): 0 for s in TaskState}
    for state, n in conn.execute(select(TaskStateCount.state, TaskStateCount.n)):
        counts[state] = int(n)
    return counts


def task_counts_exact(conn: Connection) -> dict[str, int]:
    """Tasks by state, counted (what :func:`task_counts` must always equal)."""
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


def queue_ahead(conn: Connection, task_id: int, priority: int) -> int:
    """Ready tasks a worker would take before this one (the claim's order)."""
    return int(conn.execute(
        select(func.count()).select_from(Task).where(
            Task.state == TaskState.READY,
            (Task.priority > priority) | ((Task.priority == priority) & (Task.id < task_id)))
    ).scalar_one())


def failed_ancestors(conn: Connection, task_id: int, limit: int = 10) -> list[dict[str, Any]]:
    """The failed or cancelled tasks upstream of ``task_id`` (what made it upstream_failed)."""
    seed = select(TaskEdge.parent_id.label("id")).where(TaskEdge.child_id == task_id)
    tree = seed.cte("up", recursive=True)
    tree = tree.union(select(TaskEdge.parent_id).where(TaskEdge.child_id == tree.c.id))
    rows = conn.execute(
        select(Task.name, Task.state, Task.reason)
        .where(Task.id.in_(select(tree.c.id)),
               Task.state.in_([TaskState.FAILED, TaskState.CANCELLED]))
        .order_by(Task.id).limit(limit)).all()
    return [{"name": n, "state": s, "reason": r} for n, s, r in rows]


def recent_failures(conn: Connection, limit: int = 5) -> list[dict[str, Any]]:
    """The latest failed attempts, newest first (for `boss watch`)."""
    rows = conn.execute(
        select(Task.name, Attempt.number, Attempt.finished_at, Attempt.reason,
               Attempt.exit_status)
        .join(Task, Task.id == Attempt.task_id)
        .where(Attempt.state == "failed").order_by(Attempt.id.desc()).limit(limit)).all()
    return [dict(r._mapping) for r in rows]


def running_by_worker(conn: Connection, limit: int = 8) -> dict[int, list[str]]:
    """Names of the tasks each worker runs (at most ``limit`` each)."""
    rows = conn.execute(
        select(Attempt.worker_id, Task.name).join(Task, Task.id == Attempt.task_id)
        .where(Attempt.state == "running").order_by(Attempt.id)).all()
    out: dict[int, list[str]] = {}
    for wid, name in rows:
        names = out.setdefault(int(wid or 0), [])
        if len(names) < limit:
            names.append(name)
    return out


def task_names(conn: Connection, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    rows = conn.execute(select(Task.id, Task.name).where(Task.id.in_(sorted(ids)))).all()
    return {int(i): str(n) for i, n in rows}
