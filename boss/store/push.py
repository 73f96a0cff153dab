"""Pushing a file: check, plan and insert a chunk at a time, in one transaction.

The file is read once. Each chunk is checked (by helper processes for a large
file, see :mod:`boss.push`), planned, and inserted straight away, so that
checking and inserting overlap. A task's row goes in with the state its
parents known so far give it; the few whose parents turn up later (an
``after`` naming a later task, an input a later task writes, a task already
in the database) are corrected before the commit. The first problem in the
file rolls the transaction back and the rest of the file is only checked, so
that every problem is reported; nothing is half-pushed.

Rows go in through the driver's bulk path (executemany on SQLite, COPY on
PostgreSQL), in primary-key order. Into an empty SQLite queue the secondary
indexes are dropped first and built again before the commit, inside the same
transaction.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, bindparam, func, select, text, update

from boss import graph
from boss.errors import DatabaseError, PushError
from boss.lifecycle import TaskState, initial_state
from boss.models import Task, TaskOutput, TaskStateCount
from boss.push import Chunk, Plan, Planner, document_text
from boss.store import events

if TYPE_CHECKING:
    from boss.store import Store

CHUNK = 900  # bound parameters per IN (...) lookup; SQLite allows 32766

TASK_COLUMNS = ("id", "name", "state", "priority", "document", "max_tries", "tries", "lost",
                "pending_parents", "created_at", "updated_at")
WAITING, READY = str(TaskState.WAITING), str(TaskState.READY)


@dataclass
class PushResult:
    pushed: int
    skipped: int
    edges: int
    ready: int
    first_id: int | None


class _Stop(Exception):
    """The file has a problem: roll back, then only check the rest."""


def push_file(store: Store, path: Path, source: str, default_bucket: str = "default",
              skip_existing: bool = False) -> PushResult:
    """Push every task of a file, or none; raise PushError with every problem."""
    if not path.is_file():
        raise PushError(source, ["no such file"])
    planner = Planner(path, source, default_bucket)
    chunks = planner.chunks()
    collecting = gc.isenabled()
    gc.disable()  # millions of small long-lived objects: collections would only cost time
    try:
        first = next(chunks, None)
        if first is not None:
            planner.add(first)
        if first is not None and planner.clean:
            try:
                with store.bulk_tx() as conn:
                    return _Insert(conn, planner, skip_existing).run(first, chunks)
            except _Stop:
                pass
            except DatabaseError as exc:  # locked, down: say that the push left no trace
                raise DatabaseError(f"{exc}; nothing was pushed (try again)") from exc
        for chunk in chunks:  # something is wrong: find every problem, insert nothing
            planner.add(chunk)
        planner.finish()
        raise AssertionError("a push with problems was not refused")  # pragma: no cover
    finally:
        chunks.close()
        if collecting:
            gc.enable()


class _Insert:
    """One push inside one transaction."""

    def __init__(self, conn: Connection, planner: Planner, skip_existing: bool) -> None:
        self.conn = conn
        self.planner = planner
        self.plan = planner.plan
        self.skip_existing = skip_existing
        self.dialect = conn.dialect.name
        self.existing: dict[int, tuple[int, str]] = {}  # plan index -> (db id, state), skipped
        self.db_problems: list[str] = []
        self.pushed = 0
        self.edges = 0
        self.now = time.time()
        if self.dialect == "postgresql":
            # pushes take ids as max(id)+1...; serialise them (claims are unaffected)
            conn.execute(text("SELECT pg_advisory_xact_lock(7878001)"))
        self.any_tasks = conn.execute(select(Task.id).limit(1)).first() is not None
        self.base = conn.execute(select(func.coalesce(func.max(Task.id), 0))).scalar_one() + 1
        self.first_ready = 0  # rows inserted as ready (before _correct_states)
        # into an empty queue on SQLite the secondary indexes are dropped and built again
        # after the rows: one sort each instead of a b-tree insert per row, and DDL is
        # part of the transaction, so a crash or a refusal rolls the drop back too
        self.rebuild: list[str] = []
        if self.dialect == "sqlite" and not self.any_tasks:
            self.rebuild = _drop_indexes(conn, ("tasks", "task_edges", "task_outputs"))

    def run(self, first: Chunk, rest: Iterator[Chunk]) -> PushResult:
        planner, p = self.planner, self.plan
        self._insert_chunk(0, first)
        for chunk in rest:
            start = planner.add(chunk)
            if not planner.clean:
                raise _Stop
            self._insert_chunk(start, chunk)
        planner.finish()
        external = self._external()
        if self.db_problems:
            raise PushError(p.source, self.db_problems[:50], len(self.db_problems))
        self._insert_late(external)
        self._count(self.first_ready, self.pushed - self.first_ready)
        ready = self._correct_states(external)
        for sql in self.rebuild:  # after the corrections, which then touch no index
            self.conn.exec_driver_sql(sql)
        if self.dialect == "postgresql":
            self.conn.execute(text(
                "SELECT setval(pg_get_serial_sequence('tasks', 'id'), "
                "(SELECT coalesce(max(id), 1) FROM tasks))"))
        # one event per push, not per task: a million rows more would double the push
        events.record(self.conn, "jobs.pushed",
                      data={"source": p.source, "tasks": self.pushed, "edges": self.edges,
                            "skipped": len(self.existing), "ready": ready,
                            "first_id": self.base if self.pushed else None,
                            "last_id": self.base + self.pushed - 1 if self.pushed else None})
        return PushResult(self.pushed, len(self.existing), self.edges, ready,
                          self.base if self.pushed else None)

    # --- a chunk ------------------------------------------------------------------------

    def _insert_chunk(self, start: int, chunk: Chunk) -> None:
        p, base = self.plan, self.base
        end = len(p)
        if self.any_tasks:
            self._against_database(start, end)
        if self.db_problems:
            return  # refused at the end; keep planning to find the file's problems
        texts = chunk.texts()
        if p.generated:
            texts = [document_text(p, start + k, t) if start + k in p.generated else t
                     for k, t in enumerate(texts)]
        more, existing = p.more_parents, self.existing
        # parents known so far: the row's first guess (corrected at the end if need be)
        pending = [0 if pa < 0 else 1 + len(more[i]) if i in more else 1
                   for i, pa in enumerate(p.parent[start:end], start)]
        states = [READY if n == 0 else WAITING for n in pending]
        # the counts take each row as inserted; the corrections go through the trigger
        self.first_ready += sum(1 for k, st in enumerate(states, start)
                                if st == READY and k not in self.existing)
        now = repeat(self.now)
        rows: Iterable[tuple[Any, ...]] = zip(
            range(base + start, base + end), p.names[start:end], states,
            p.priority[start:end], texts, p.max_tries[start:end], repeat(0), repeat(0),
            pending, now, now)
        if not existing:
            extra = [(base + pm, base + i) for i in range(start, end) if i in more
                     for pm in more[i]]
            self.pushed += self._bulk("tasks", TASK_COLUMNS, rows)
            self.edges += self._first_parents(start, end)
            self.edges += self._bulk("task_edges", ("parent_id", "child_id"), extra)
        else:  # some tasks are kept from the database: skip them, point at their ids
            self.pushed += self._bulk("tasks", TASK_COLUMNS,
                                      (r for r in rows if r[0] - base not in existing))
            self.edges += self._bulk("task_edges", ("parent_id", "child_id"), [
                (self._id(pa), base + i) for i in range(start, end) if i not in existing
                for pa in p.parents_of(i)])
        outs = p.outputs
        k = len(outs)
        while k > 0 and outs[k - 1][0] >= start:
            k -= 1
        self._bulk("task_outputs", ("path", "task_id"),
                   [(key, base + i) for i, key in outs[k:] if i not in existing])

    def _first_parents(self, start: int, end: int) -> int:
        """Insert the edge from each task of a chunk to its first parent; return how many."""
        parent, base = self.plan.parent, self.base
        if self.dialect != "sqlite":
            return self._bulk("task_edges", ("parent_id", "child_id"), [
                (base + pa, base + i) for i, pa in enumerate(parent[start:end], start)
                if pa >= 0])
        # one statement over the chunk's parent array as JSON, not a bound row per edge:
        # executemany spends about 1.2 us of Python per row binding and stepping, this
        # 0.6 us in all (benchmark 4); -1 is "no parent"
        raw: Any = self.conn.connection.driver_connection
        cur = raw.cursor()
        try:
            cur.execute("INSERT INTO task_edges (parent_id, child_id) "
                        "SELECT value + ?, key + ? FROM json_each(?) WHERE value >= 0",
                        (base, base + start, json.dumps(parent[start:end].tolist())))
            return int(cur.rowcount)
        finally:
            cur.close()

    def _against_database(self, start: int, end: int) -> None:
        """Names of this chunk already in the database: kept, or a problem each."""
        p = self.plan
        found_names = _lookup_names(self.conn, p.names[start:end])
        for name in sorted(found_names, key=p.index.__getitem__):  # in file order
            found = found_names[name]
            if self.skip_existing:
                self.existing[p.index[name]] = found
            else:
                self.db_problems.append(
                    f"task {name!r}, field 'name': a task with this name already exists "
                    "(use --skip-existing to keep it and push the rest)")

    def _id(self, i: int) -> int:
        found = self.existing.get(i)
        return found[0] if found is not None else self.base + i

    # --- the end: what only the whole file tells ------------------------------------------

    def _external(self) -> dict[int, list[tuple[int, str]]]:
        """Parents in the database: 'after' names and inputs not found in the file."""
        p, conn = self.plan, self.conn
        external: dict[int, list[tuple[int, str]]] = {}
        if p.after:
            wanted = {a for names in p.after.values() for a in names}
            known = _lookup_names(conn, wanted) if self.any_tasks else {}
            for idx, names in p.after.items():
                for a in names:
                    if a in known:
                        external.setdefault(idx, []).append(known[a])
                    else:
                        self.db_problems.append(
                            f"task {p.names[idx]!r}, field 'after': no task named {a!r} in "
                            "the file or the database")
        if p.inputs and self.any_tasks:
            keys = {k for paths in p.inputs.values() for q in paths
                    for k in (graph.key(q), *graph.ancestors(q))}
            writers = _lookup_writers(conn, keys)
            if writers:
                for idx, paths in p.inputs.items():
                    for q in paths:
                        for k in (graph.key(q), *graph.ancestors(q)):
                            external.setdefault(idx, []).extend(writers.get(k, []))
        return external

    def _insert_late(self, external: dict[int, list[tuple[int, str]]]) -> None:
        """Edges found after their child's row went in, and edges into the database."""
        p, existing, base = self.plan, self.existing, self.base
        rows: list[tuple[int, int]] = []
        for child, parents in p.late.items():
            if child not in existing:
                rows.extend((self._id(pa), base + child) for pa in parents)
        for child, found in external.items():
            if child in existing:
                continue
            seen = {self._id(pa) for pa in p.parents_of(child)}
            for pid, _ in found:
                if pid not in seen:
                    seen.add(pid)
                    rows.append((pid, base + child))
        self.edges += self._bulk("task_edges", ("parent_id", "child_id"), rows)

    def _correct_states(self, external: dict[int, list[tuple[int, str]]]) -> int:
        """Fix the rows whose first guess was wrong; return how many tasks are ready."""
        p, existing = self.plan, self.existing
        fixes: list[dict[str, Any]] = []
        if not existing and not external:
            # every parent is a new task, so a task waits for all its parents
            for child, parents in p.late.items():
                if parents:  # its row went in with fewer parents
                    fixes.append({"id": self.base + child, "state": WAITING,
                                  "pending": len(p.parents_of(child))})
            ready = p.parent.count(-1)
        else:
            states = _states(p, existing, external)
            ready = 0
            for i in range(len(p)):
                if i in existing:
                    continue
                parents = p.parents_of(i)
                pending = (sum(1 for pa in parents if states[pa] != TaskState.SUCCEEDED)
                           + sum(1 for _, st in external.get(i, ())
                                 if st != TaskState.SUCCEEDED))
                guess = len(parents) - len(p.late.get(i, ()))
                if states[i] == TaskState.READY:
                    ready += 1
                if pending != guess or str(states[i]) != (READY if guess == 0 else WAITING):
                    fixes.append({"id": self.base + i, "state": str(states[i]),
                                  "pending": pending})
        if fixes:
            self.conn.execute(text("UPDATE tasks SET state = :state, pending_parents = :pending "
                                   "WHERE id = :id"), fixes)
        return ready

    def _count(self, ready: int, waiting: int) -> None:
        """Add the inserted rows to task_state_counts (no trigger on insert: too slow)."""
        self.conn.execute(
            update(TaskStateCount).where(TaskStateCount.state == bindparam("s"))
            .values(n=TaskStateCount.n + bindparam("k")),
            [{"s": READY, "k": ready}, {"s": WAITING, "k": waiting}])

    # --- rows ---------------------------------------------------------------------------

    def _bulk(self, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> int:
        """Insert rows through the driver's fastest path; return how many."""
        raw: Any = self.conn.connection.driver_connection
        cols = ", ".join(columns)
        if self.dialect == "postgresql":
            count = 0
            with raw.cursor() as cur, cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    count += 1
            return count
        marks = ", ".join("?" for _ in columns)
        cur = raw.cursor()
        try:
            # executemany takes the rows one at a time: nothing piles up
            cur.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", rows)
            return int(cur.rowcount)
        finally:
            cur.close()


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _drop_indexes(conn: Connection, tables: Sequence[str]) -> list[str]:
    """Drop the tables' secondary indexes; return the statements that make them again.

    Indexes behind a constraint (primary keys, UNIQUE) have no SQL of their own in
    sqlite_master and stay.
    """
    marks = ", ".join("?" for _ in tables)
    rows = conn.exec_driver_sql(
        f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
        f"AND tbl_name IN ({marks}) ORDER BY name", tuple(tables)).all()
    for name, _ in rows:
        conn.exec_driver_sql(f'DROP INDEX "{name}"')
    return [sql for _, sql in rows]


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


def _states(plan: Plan, existing: dict[int, tuple[int, str]],
            external: dict[int, list[tuple[int, str]]]) -> list[TaskState]:
    """Initial state of every task, parents before children."""
    n = len(plan)
    states: list[TaskState] = [TaskState.WAITING] * n

    def decide(i: int) -> None:
        if i in existing:
            states[i] = TaskState(existing[i][1])
        else:
            parent_states = [states[p] for p in plan.parents_of(i)]
            parent_states += [TaskState(st) for _, st in external.get(i, ())]
            states[i] = initial_state(parent_states)

    if not plan.forward:  # every parent comes before its child: file order will do
        for i in range(n):
            decide(i)
        return states
    parents = plan.parent_lists()
    children = graph.invert(parents)  # Kahn's order
    indegree = [len(ps) for ps in parents]
    todo = [i for i in range(n) if indegree[i] == 0]
    while todo:
        i = todo.pop()
        decide(i)
        for c in children.get(i, ()):
            indegree[c] -= 1
            if indegree[c] == 0:
                todo.append(c)
    return states
