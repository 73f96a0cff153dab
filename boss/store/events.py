"""Event rows, written in the same transaction as what they describe.

Kinds are hyperflow's (its AMQP executor's routing keys without the job id):
``job.started``, ``job.finished``, ``job.stage-in.started``, ... plus ecloud's
own (``job.ready``, ``job.lost``, ``worker.joined``, ``jobs.pushed``, ...).
:func:`routing_key` puts the task id back: ``job.42.stage-in.finished``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, delete, func, select

from boss.models import Event
from boss.store import fast

# what a worker reports about its attempt (stored as "job." + kind)
WORKER_KINDS = frozenset({
    "stage-in.started", "stage-in.finished", "execution.started", "execution.finished",
    "stage-out.started", "stage-out.finished",
})


def routing_key(kind: str, task_id: int | None) -> str:
    """hyperflow's routing key: ``job.ID.rest`` for job events, the kind otherwise."""
    if task_id is not None and kind.startswith("job."):
        return f"job.{task_id}.{kind[4:]}"
    return kind


# plain SQL with positional binds (boss.store.fast.run_many): a batch writes a few
# of these per task
INSERT = fast.Many(
    "INSERT INTO events (ts, kind, task_id, attempt_id, worker_id, data) "
    "VALUES (?, ?, ?, ?, ?, ?)",
    "INSERT INTO events (ts, kind, task_id, attempt_id, worker_id, data) "
    "SELECT * FROM unnest(%s::float8[], %s::text[], %s::integer[], %s::integer[], "
    "%s::integer[], %s::text[])")


def record(
    conn: Connection,
    kind: str,
    *,
    task_id: int | None = None,
    attempt_id: int | None = None,
    worker_id: int | None = None,
    data: dict[str, Any] | None = None,
    ts: float | None = None,
) -> None:
    fast.run_many(conn, INSERT, [(ts or time.time(), kind, task_id, attempt_id, worker_id,
                                  json.dumps(data) if data else None)])


def record_many(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert many events; each row has kind and optional ids and data."""
    if not rows:
        return
    now = time.time()
    fast.run_many(conn, INSERT, [
        (r.get("ts", now), r["kind"], r.get("task_id"), r.get("attempt_id"),
         r.get("worker_id"), json.dumps(r["data"]) if r.get("data") else None)
        for r in rows])


def since(conn: Connection, after_id: int = 0, *, limit: int = 1000,
          task_id: int | None = None, since_ts: float | None = None,
          kinds: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Events with id > ``after_id``, oldest first (the index on id makes tailing cheap)."""
    q = select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit)
    if task_id is not None:
        q = q.where(Event.task_id == task_id)
    if since_ts is not None:
        q = q.where(Event.ts >= since_ts)
    if kinds:
        q = q.where(Event.kind.in_(list(kinds)))
    return [{"id": e.id, "ts": e.ts, "kind": e.kind, "task_id": e.task_id,
             "attempt_id": e.attempt_id, "worker_id": e.worker_id,
             "data": json.loads(e.data) if e.data else {}}
            for e in conn.execute(q).all()]


def last_id(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(Event.id), 0))).scalar_one())


def prune(conn: Connection, before_ts: float) -> int:
    """Delete events older than ``before_ts``; return how many."""
    result = conn.execute(delete(Event).where(Event.ts < before_ts))
    return int(result.rowcount or 0)
