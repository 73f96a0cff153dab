"""Event rows, written in the same transaction as what they describe."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, insert

from boss.models import Event


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
    conn.execute(
        insert(Event),
        {"ts": ts or time.time(), "kind": kind, "task_id": task_id, "attempt_id": attempt_id,
         "worker_id": worker_id, "data": json.dumps(data) if data else None},
    )


def record_many(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert many events; each row has kind and optional ids and data."""
    if not rows:
        return
    now = time.time()
    conn.execute(
        insert(Event),
        [{"ts": r.get("ts", now), "kind": r["kind"], "task_id": r.get("task_id"),
          "attempt_id": r.get("attempt_id"), "worker_id": r.get("worker_id"),
          "data": json.dumps(r["data"]) if r.get("data") else None} for r in rows],
    )
