"""What the fault tests read from a SQLite boss database, and the late report they send.

A killed or cut-off worker's attempt is requeued; these check that its report,
sent afterwards with its own token, is refused and changes no row.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from protocol.errors import ProtocolError
from protocol.messages import Result
from worker.client import BossClient
from worker.transport import TcpTransport

Rows = list[tuple[Any, ...]]


def query(db: Path, sql: str, *args: Any) -> Rows:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as c:
        return list(c.execute(sql, args).fetchall())


def attempts_and_tasks(db: Path) -> tuple[Rows, Rows]:
    """Every attempt row, and each task's state and counters: what a late report must
    leave unchanged."""
    return (query(db, "SELECT * FROM attempts ORDER BY id"),
            query(db, "SELECT id, state, tries, lost FROM tasks ORDER BY id"))


def late_complete(port: int, token: str, attempt_id: int) -> str:
    """Send ``complete`` (succeeded) for ``attempt_id`` as the worker ``token``: the error
    code the boss answered with, or "accepted"."""
    client = BossClient(TcpTransport("127.0.0.1", port), token, slots=1, give_up_after=10)
    try:
        client.call("complete", Result(attempt_id, "succeeded", exit_status=0,
                                       metrics={"wall": 0.1}).to_wire())
    except ProtocolError as exc:
        return str(exc.code)
    finally:
        client.close()
    return "accepted"
