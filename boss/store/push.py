"""Pass two of a push: resolve names against the database and insert.

Everything happens in the caller's single transaction, so a push is all or
nothing. Rows go in through the driver's bulk path (executemany on SQLite,
COPY on PostgreSQL): a million tasks and a million edges take seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from sqlalchemy import Connection, func, select, text

from boss import graph
from boss.errors import PushError
from boss.lifecycle import TaskState, initial_state
from boss.models import Task, TaskOutput
from boss.push import Plan, documents
from boss.store import events

CHUNK = 900  # bound parameters per IN (...) lookup; SQLite allows 32766
BATCH = 20_000


@dataclass
class PushResult:
    pushed: int
    skipped: int
    edges: int
    ready: int
    first_id: int | None


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _lookup_names(conn: Connection, names: Iterable[str]) -> dict[str, tuple[int, str]]:
    found: dict[str, tuple[int, str]] = {}
    for chunk in _chunks(list(names)):
        rows = conn.execute(select(Task.name, Task.id, Task.state).where(Task.name.in_(chunk)))
        for name, id_, state in rows:
            found[name] = (id_, state)
    return found


def _lookup_writers(conn: Connection, keys: Iterable[str]) -> dict[str, list[tuple[int, str]]]:
    found: dict[str, list[tuple[int, str]]] = {}
    for chunk in _chunks(list(keys)):
        rows = conn.execute(
            select(TaskOutput.path, Task.id, Task.state)
            .join(Task, Task.id == TaskOutput.task_id)
            .where(TaskOutput.path.in_(chunk))
        )
        for path, id_, state in rows:
            found.setdefault(path, []).append((id_, state))
    return found


def insert_plan(conn: Connection, plan: Plan, skip_existing: bool = False) -> PushResult:
    """Insert a planned push; raise PushError (and insert nothing) on a conflict."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        # pushes take ids as max(id)+1...; serialise them (claims are unaffected)
        conn.execute(text("SELECT pg_advisory_xact_lock(7878001)"))
    problems: list[str] = []
    n = len(plan)
    any_tasks = conn.execute(select(Task.id).limit(1)).first() is not None

    existing: dict[int, tuple[int, str]] = {}  # plan index -> (db id, state) for skipped
    if any_tasks:
        dupes = _lookup_names(conn, plan.names)
        for name, found in dupes.items():
            if skip_existing:
                existing[plan.index[name]] = found
            else:
                problems.append(f"task {name!r}, field 'name': a task with this name already "
                                "exists (use --skip-existing to keep it and push the rest)")

    external: dict[int, list[tuple[int, str]]] = {}
    if plan.after:
        wanted = {a for names in plan.after.values() for a in names}
        found = _lookup_names(conn, wanted) if any_tasks else {}
        for idx, names in plan.after.items():
            for a in names:
                if a in found:
                    external.setdefault(idx, []).append(found[a])
                else:
                    problems.append(f"task {plan.names[idx]!r}, field 'after': no task named "
                                    f"{a!r} in the file or the database")
    if plan.inputs and any_tasks:
        keys = {k for paths in plan.inputs.values() for p in paths
                for k in (graph.key(p), *graph.ancestors(p))}
        writers = _lookup_writers(conn, keys)
        if writers:
            for idx, paths in plan.inputs.items():
                for p in paths:
                    for k in (graph.key(p), *graph.ancestors(p)):
                        external.setdefault(idx, []).extend(writers.get(k, []))
    if problems:
        raise PushError(plan.source, problems[:50], len(problems))

    base = (conn.execute(select(func.coalesce(func.max(Task.id), 0))).scalar_one()) + 1
    ids = [existing[i][0] if i in existing else base + i for i in range(n)]
    states = _states(plan, existing, external)
    now = time.time()
    pending = [
        sum(1 for pa in plan.parents[i] if states[pa] != TaskState.SUCCEEDED)
        + sum(1 for _, st in external.get(i, ()) if st != TaskState.SUCCEEDED)
        for i in range(n)
    ]

    def task_rows() -> Iterator[tuple[Any, ...]]:
        for i, doc in enumerate(documents(plan)):
            if i in existing:
                continue
            yield (ids[i], plan.names[i], str(states[i]), plan.priority[i], doc,
                   plan.max_tries[i], 0, 0, pending[i], now, now)

    def edge_rows() -> Iterator[tuple[int, int]]:
        for i in range(n):
            if i in existing:
                continue
            seen: set[int] = set()
            for pa in plan.parents[i]:
                seen.add(ids[pa])
            for pid, _ in external.get(i, ()):
                seen.add(pid)
            for pid in seen:
                yield (pid, ids[i])

    pushed = _bulk(conn, "tasks", ("id", "name", "state", "priority", "document", "max_tries",
                                   "tries", "lost", "pending_parents", "created_at",
                                   "updated_at"), task_rows)
    edge_count = _bulk(conn, "task_edges", ("parent_id", "child_id"), edge_rows)
    _bulk(conn, "task_outputs", ("path", "task_id"),
          lambda: ((k, ids[i]) for i, k in plan.outputs if i not in existing))
    if dialect == "postgresql":
        conn.execute(text(
            "SELECT setval(pg_get_serial_sequence('tasks', 'id'), "
            "(SELECT coalesce(max(id), 1) FROM tasks))"))
    ready = sum(1 for i in range(n) if i not in existing and states[i] == TaskState.READY)
    events.record(conn, "tasks.pushed", data={"source": plan.source, "tasks": pushed,
                                               "edges": edge_count, "skipped": len(existing)})
    return PushResult(pushed, len(existing), edge_count, ready, base if pushed else None)


def _states(plan: Plan, existing: dict[int, tuple[int, str]],
            external: dict[int, list[tuple[int, str]]]) -> list[TaskState]:
    """Initial state of every task, parents before children (Kahn's order)."""
    n = len(plan)
    children = graph.invert(plan.parents)
    indegree = [len(ps) for ps in plan.parents]
    states: list[TaskState] = [TaskState.WAITING] * n
    todo = [i for i in range(n) if indegree[i] == 0]
    while todo:
        i = todo.pop()
        if i in existing:
            states[i] = TaskState(existing[i][1])
        else:
            parent_states = [states[p] for p in plan.parents[i]]
            parent_states += [TaskState(st) for _, st in external.get(i, ())]
            states[i] = initial_state(parent_states)
        for c in children.get(i, ()):
            indegree[c] -= 1
            if indegree[c] == 0:
                todo.append(c)
    return states


def _bulk(conn: Connection, table: str, columns: Sequence[str], rows: Any) -> int:
    """Insert rows through the driver's fastest path; return how many."""
    raw = conn.connection.driver_connection
    cols = ", ".join(columns)
    count = 0
    if conn.dialect.name == "postgresql":
        cur: Any = raw.cursor()  # type: ignore[union-attr]
        with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
            for row in rows():
                copy.write_row(row)
                count += 1
        return count
    marks = ", ".join("?" for _ in columns)
    cur = raw.cursor()  # type: ignore[union-attr]
    it = iter(rows())
    while batch := list(islice(it, BATCH)):
        cur.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", batch)
        count += len(batch)
    return count
