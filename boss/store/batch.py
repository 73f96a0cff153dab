"""The hot calls of one group-commit batch, set-based: a statement per kind of row.

One call at a time, a task's complete-and-pop ran some thirteen statements
(two of them the call's savepoint), each with its own round of Python and, on
PostgreSQL, of the network: the database thread's whole cost
(benchmarks/RESULTS.md, "Boss RPC capacity"). Here the completes of a batch
read their attempts and tasks with one SELECT, write them with one
``executemany`` each and insert their events with another (on PostgreSQL one
statement over arrays each, the attempts' read and write one UPDATE); the pops read
their workers with one SELECT, claim with one UPDATE and open every attempt
with one INSERT. (``executemany`` is SQLite's loop in C, and psycopg's
pipeline: one round trip.)

The result is what applying the calls one by one gives in this order: every
complete (with its events) in batch order, then every pop in batch order.
(The calls of a batch were all waiting at once, none answered yet, so any
order of them is one the workers could have seen; this one lets a pop take
the tasks the batch's completes made ready.) A batch whose calls could see
each other's effects differently in that order
(one attempt completed twice, an event for an attempt another call of the
batch completes, a pop for a worker that does not exist) raises
:class:`Unsuited`, and the caller applies it call by call instead.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Executable, bindparam, text, update

from boss.lifecycle import AttemptState, TaskState, after_attempt
from boss.models import Task
from boss.store import events, fast, tasks
from protocol.messages import Result

A = AttemptState
T = TaskState


class Unsuited(Exception):
    """The batch must be applied call by call (why: the message)."""


@dataclass(frozen=True)
class Finish:
    """One complete of the batch, with the progress events sent along with it."""

    worker_id: int | None
    result: Result
    events: Sequence[Any] = ()  # boss.calls.Event


_ENDING = {"succeeded": A.SUCCEEDED, "failed": A.FAILED, "timeout": A.TIMEOUT,
           "cancelled": A.CANCELLED}


def _by_dialect(sql: dict[str, str]) -> dict[str, Executable]:
    return {name: text(s) for name, s in sql.items()}


# "id IN (the ids)" with one bind for the whole list, so that one statement is
# compiled and cached whatever the batch's size: a JSON array for SQLite, an
# array for PostgreSQL
_IN = {"sqlite": "IN (SELECT value FROM json_each(:ids))",
       "postgresql": "= ANY(CAST(:ids AS INTEGER[]))"}
# SQLite: the batch's attempts read by id, their state checked in Python, then
# written by _FINISH (SQLite's write lock is the whole database's: no fence needed)
_ATTEMPTS = text(
    "SELECT a.id, a.task_id, a.worker_id, t.tries, t.lost, t.max_tries, a.state "
    f"FROM attempts a JOIN tasks t ON t.id = a.task_id WHERE a.id {_IN['sqlite']}")
_EDGES = _by_dialect({
    d: f"SELECT parent_id, child_id FROM task_edges WHERE parent_id {_IN[d]}" for d in _IN})
_FREED = _by_dialect({
    d: "UPDATE tasks SET state = 'ready', updated_at = :now "
       f"WHERE id {_IN[d]} AND state = 'waiting' AND pending_parents <= 0 RETURNING id"
    for d in _IN})
_WORKER_STATES = _by_dialect({
    d: f"SELECT id, state FROM workers WHERE id {_IN[d]}" for d in _IN})
_OPEN = _by_dialect({
    "sqlite":
        "INSERT INTO attempts (task_id, number, worker_id, state, started_at, "
        "lease_expires_at) SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
        "json_extract(value, '$[2]'), 'running', :now, :lease FROM json_each(:rows) "
        "RETURNING id, task_id",
    "postgresql":
        "INSERT INTO attempts (task_id, number, worker_id, state, started_at, "
        "lease_expires_at) SELECT r.t, r.n, r.w, 'running', :now, :lease "
        "FROM unnest(CAST(:tasks AS INTEGER[]), CAST(:numbers AS INTEGER[]), "
        "CAST(:workers AS INTEGER[])) AS r(t, n, w) RETURNING id, task_id",
})
# positional (boss.store.fast.run_many), run once per task of the batch
_FINISH = fast.Many(
    "UPDATE attempts SET state = ?, finished_at = ?, exit_status = ?, reason = ?, "
    "metrics = ?, stdout_tail = ?, stderr_tail = ? WHERE id = ? AND state = 'running'")
# PostgreSQL: the batch's attempts are ended by one UPDATE that returns what the
# tasks' outcomes need, rather than read FOR UPDATE and then updated (the read's row
# locks wrote every attempt once more: a fifth less server time per task without
# them, benchmarks/RESULTS.md). The fence is the UPDATE's own: a concurrent cancel or
# expiry either waits for this commit or has ended the attempt, which the WHERE then
# skips. "state || ''": given the column itself, the planner read the (state, lease)
# index, which keeps an entry for every attempt that ever ran until a vacuum (0.6 ms
# a batch after 20,000 tasks, growing), rather than the primary key.
_FINISH_RETURNING = (
    "UPDATE attempts AS a SET state = v.state, finished_at = v.finished_at, "
    "exit_status = v.exit_status, reason = v.reason, metrics = v.metrics, "
    "stdout_tail = v.stdout_tail, stderr_tail = v.stderr_tail FROM unnest("
    "%s::text[], %s::float8[], %s::integer[], %s::text[], %s::text[], %s::text[], "
    "%s::text[], %s::integer[], %s::integer[]) AS v(state, finished_at, exit_status, "
    "reason, metrics, stdout_tail, stderr_tail, id, worker_id), tasks AS t "
    "WHERE a.id = v.id AND (a.state || '') = 'running' "
    "AND (v.worker_id IS NULL OR a.worker_id = v.worker_id) AND t.id = a.task_id "
    "RETURNING a.id, a.task_id, a.worker_id, t.tries, t.lost, t.max_tries")
_FEWER_PARENTS = (update(Task).where(Task.id == bindparam("p_task"))
                  .values(pending_parents=Task.pending_parents - bindparam("p_less")))
_SEEN = fast.Many(
    "UPDATE workers SET last_seen = ?, state = ? WHERE id = ?",
    "UPDATE workers AS w SET last_seen = v.last_seen, state = v.state FROM unnest("
    "%s::float8[], %s::text[], %s::integer[]) AS v(last_seen, state, id) WHERE w.id = v.id")


def _ids(conn: Connection, ids: Sequence[int]) -> dict[str, Any]:
    return {"ids": json.dumps(list(ids)) if conn.dialect.name == "sqlite" else fast.pg_array(ids)}


def complete(conn: Connection, finishes: Sequence[Finish], now: float
             ) -> list[tasks.Ended | None]:
    """End the attempts of ``finishes``; None for each one no longer current (or not its
    worker's), as :func:`boss.store.tasks.complete` answers."""
    ids = [f.result.attempt_id for f in finishes]
    if len(set(ids)) != len(ids):
        raise Unsuited("one attempt is completed twice in the batch")
    metrics = {f.result.attempt_id: json.dumps(f.result.metrics) for f in finishes}
    _stage_events(conn, finishes, set(ids), now)  # while their attempts still run
    returning = conn.dialect.name == "postgresql"
    if returning:  # ended already, each only if its worker's
        found = {r.id: r for r in _finish_returning(conn, finishes, metrics, now)}
    else:
        found = {r.id: r for r in fast.execute(conn, _ATTEMPTS, _ids(conn, ids))
                 if r.state == A.RUNNING}
    if len({r.task_id for r in found.values()}) != len(found):
        raise Unsuited("two running attempts of one task")
    out: list[tasks.Ended | None] = []
    attempts: list[tuple[Any, ...]] = []
    task_rows: list[tuple[Any, ...]] = []
    finished: list[tuple[Any, ...]] = []
    succeeded, cascades = [], []
    for f in finishes:
        res, r = f.result, found.get(f.result.attempt_id)
        if r is None or (f.worker_id is not None and r.worker_id != f.worker_id):
            out.append(None)
            continue
        state = _ENDING[res.outcome]
        ending = after_attempt(state, r.tries, r.lost, r.max_tries)
        if not returning:
            attempts.append(_attempt_row(res, metrics[res.attempt_id], now))
        task_rows.append(tasks.end_task_row(r.task_id, ending, res.reason, now))
        # the event's data: the outcome, then the metrics (a metric of the same name wins,
        # as in a dict merged in that order: JSON's last duplicate key does)
        head = _finished_head(res.outcome, res.exit_status, ending.task_state.value,
                              res.reason)
        finished.append((now, "job.finished", r.task_id, res.attempt_id, f.worker_id,
                         head + ("," + metrics[res.attempt_id][1:] if res.metrics else "}")))
        if ending.task_state is T.SUCCEEDED:
            succeeded.append(r.task_id)
        if ending.cascade:
            cascades.append(r.task_id)
        out.append(tasks.Ended(res.attempt_id, r.task_id, ending.task_state))
    fast.run_many(conn, _FINISH, attempts)  # SQLite's; nothing left on PostgreSQL
    fast.run_many(conn, tasks.END_TASK, task_rows)
    fast.run_many(conn, events.INSERT, finished)
    _release(conn, succeeded, now)
    for task_id in cascades:  # rare: a task out of tries; its own event is written
        tasks.cascade(conn, [task_id], now)
    return out


def _finish_returning(conn: Connection, finishes: Sequence[Finish], metrics: dict[int, str],
                      now: float) -> list[Any]:
    """PostgreSQL: end the running attempts of ``finishes`` (each its worker's, unless
    the worker is None) with one statement; their rows with their tasks' counters."""
    return fast.returning_arrays(conn, _FINISH_RETURNING, [
        (*_attempt_row(f.result, metrics[f.result.attempt_id], now), f.worker_id)
        for f in finishes])


def _attempt_row(res: Result, metrics: str, now: float) -> tuple[Any, ...]:
    """An ended attempt's values, in the order of _FINISH's (and _FINISH_RETURNING's)."""
    return (_ENDING[res.outcome].value, now, res.exit_status, res.reason or None, metrics,
            res.stdout_tail or None, res.stderr_tail or None, res.attempt_id)


@lru_cache(maxsize=1024)
def _finished_head(outcome: str, exit_status: int | None, task_state: str, reason: str
                   ) -> str:
    """The start of a job.finished event's data, without its closing brace (most tasks
    end alike: encoded once)."""
    return json.dumps({"outcome": outcome, "exit_status": exit_status,
                       "task_state": task_state, "reason": reason})[:-1]


def _stage_events(conn: Connection, finishes: Sequence[Finish], ending: set[int],
                  now: float) -> None:
    """The events sent with the completes, of attempts still running, before they end."""
    items = [(f, e) for f in finishes for e in f.events]
    if not items:
        return
    if any(e.attempt_id in ending and e.attempt_id != f.result.attempt_id for f, e in items):
        # applied one by one, the other call's complete may come first and drop it
        raise Unsuited("an event for an attempt another call of the batch completes")
    wanted = {e.attempt_id for _, e in items}
    running: dict[int | None, dict[int, int]] = {}
    for f, _ in items:
        if f.worker_id not in running:
            running[f.worker_id] = (tasks.running_tasks_of(conn, f.worker_id, wanted)
                                    if f.worker_id is not None else {})
    events.record_many(conn, [
        {"kind": "job." + e.kind, "task_id": running[f.worker_id][e.attempt_id],
         "attempt_id": e.attempt_id, "worker_id": f.worker_id, "data": e.data,
         "ts": e.ts or now}
        for f, e in items
        # a kind that is not a stage step is nothing a worker may write
        if e.attempt_id in running[f.worker_id] and e.kind in events.WORKER_KINDS])


def _release(conn: Connection, parents: Sequence[int], now: float) -> None:
    """These tasks succeeded: their children have a parent less to wait for; those
    with none left become ready, each released by its last parent in the batch."""
    if not parents:
        return
    dialect = conn.dialect.name
    edges = fast.execute(conn, _EDGES[dialect], _ids(conn, parents))
    if not edges:
        return
    order = {p: k for k, p in enumerate(parents)}
    less = Counter(e.child_id for e in edges)
    releaser: dict[int, int] = {}  # as one by one: the parent whose decrement freed it
    for e in sorted(edges, key=lambda e: order[e.parent_id]):
        releaser[e.child_id] = e.parent_id
    fast.execute_many(conn, _FEWER_PARENTS, [{"p_task": c, "p_less": n}
                                             for c, n in sorted(less.items())])
    ready = [r.id for r in fast.execute(conn, _FREED[dialect],
                                        {**_ids(conn, sorted(less)), "now": now})]
    ready.sort(key=lambda i: (order[releaser[i]], i))
    events.record_many(conn, [{"kind": "job.ready", "task_id": i, "ts": now,
                               "data": {"released_by": releaser[i]}} for i in ready])


def worker_states(conn: Connection, ids: Sequence[int]) -> dict[int, str]:
    rows = fast.execute(conn, _WORKER_STATES[conn.dialect.name], _ids(conn, sorted(set(ids))))
    return {int(r.id): str(r.state) for r in rows}


def claim(conn: Connection, wants: Sequence[tuple[int, int]], lease: float, now: float
          ) -> list[list[tasks.Claimed]]:
    """For each (worker, n) in order, what :func:`boss.store.tasks.claim` would give it
    after the ones before: the ready tasks are taken with one UPDATE, in claim order."""
    total = sum(n for _, n in wants)
    if total <= 0:
        return [[] for _ in wants]
    rows = fast.execute(conn, tasks.CLAIM, {"p_n": total, "p_now": now})
    # RETURNING order is unspecified: hand them out in claim order
    rows.sort(key=lambda r: (-r.priority, r.id))
    shares, owner, k = [], [], 0
    for worker_id, n in wants:
        shares.append(rows[k:k + n])
        owner += [worker_id] * len(shares[-1])
        k += n
    if not rows:
        return [[] for _ in wants]
    numbers = [r.tries + r.lost + 1 for r in rows]
    task_ids = [r.id for r in rows]
    if conn.dialect.name == "sqlite":
        params: dict[str, Any] = {"rows": json.dumps(list(zip(task_ids, numbers, owner,
                                                              strict=True)))}
    else:
        params = {"tasks": fast.pg_array(task_ids), "numbers": fast.pg_array(numbers),
                  "workers": fast.pg_array(owner)}
    opened = {r.task_id: r.id for r in fast.execute(
        conn, _OPEN[conn.dialect.name], {**params, "now": now, "lease": now + lease})}
    out: list[list[tasks.Claimed]] = []
    started: list[tuple[Any, ...]] = []
    for (worker_id, _), share in zip(wants, shares, strict=True):
        got = [tasks.Claimed(opened[r.id], r.id, r.name, r.tries + r.lost + 1, r.document)
               for r in share]
        started += [(now, "job.started", a.task_id, a.attempt_id, worker_id,
                     f'{{"attempt": {a.number}}}') for a in got]
        out.append(got)
    fast.run_many(conn, events.INSERT, started)
    return out


def seen(conn: Connection, states: dict[int, str], now: float) -> None:
    """The workers popped: their last contact, and busy or idle."""
    fast.run_many(conn, _SEEN, [(now, s, w) for w, s in sorted(states.items())])
