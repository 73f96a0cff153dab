"""The worker calls' transitions, applied in batches: the group commit's side of the boss.

:class:`Transitions` is the part of :class:`boss.service.Boss` that the RPC
server calls with every batch of worker calls (pop, heartbeat, complete,
events, hello, goodbye): one transaction per batch, the pops and completes
set-based (:mod:`boss.store.batch`), the other calls each under a savepoint,
and a batch that cannot go set-based applied call by call. The other
operations of the boss (push, status, context, providers) stay in
:mod:`boss.service`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from boss import calls
from boss.errors import BossError, DatabaseError
from boss.store import Store, fast, tasks, workers
from boss.store import batch as set_based
from boss.store import events as event_rows
from boss.store.tasks import Claimed, Ended
from protocol.messages import Result
from protocol.settings import Settings


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class WorkerIdentity:
    id: int
    name: str
    slots: int


class Transitions:
    """Worker calls, one batch per transaction (mixed into :class:`boss.service.Boss`)."""

    store: Store
    settings: Settings

    def claim(self, worker_id: int, n: int) -> list[Claimed]:
        answer: PopAnswer = self.apply_one(calls.Pop(worker_id, n))
        return answer.tasks

    def pop(self, worker_id: int, n: int) -> PopAnswer:
        answer: PopAnswer = self.apply_one(calls.Pop(worker_id, n))
        return answer

    def heartbeat(self, worker_id: int, attempt_ids: Sequence[int]) -> list[int]:
        answer: Beat = self.apply_one(calls.Heartbeat(worker_id, tuple(attempt_ids)))
        return answer.cancel

    def complete(self, worker_id: int | None, result: Result) -> Ended | None:
        answer: Ended | None = self.apply_one(calls.Complete(worker_id, result))
        return answer

    def complete_many(self, items: Sequence[tuple[int | None, Result]]
                      ) -> list[Ended | None]:
        """Group commit: many completions in one transaction."""
        return [_unwrap(a) for a in self.apply([calls.Complete(w, r) for w, r in items])]

    def record_event(self, kind: str, *, attempt_id: int | None = None,
                     task_id: int | None = None, worker_id: int | None = None,
                     data: dict[str, Any] | None = None) -> None:
        with self.store.tx() as conn:
            event_rows.record(conn, kind, attempt_id=attempt_id, task_id=task_id,
                              worker_id=worker_id, data=data)

    def expire_leases(self) -> list[Ended]:
        answer: list[Ended] = self.apply_one(calls.ExpireLeases())
        return answer

    def apply_one(self, call: calls.Call) -> Any:
        return _unwrap(self.apply([call])[0])

    def apply(self, batch: Sequence[calls.Call]) -> list[Any]:
        """Apply worker calls in ONE transaction, as if each ran under its own savepoint.

        Returns one answer per call, in order; a call that failed has its
        exception (a BossError) as its answer and changed nothing, the others
        commit together. This is the RPC server's group commit: one fsync for
        every call that arrived while the previous transaction ran.

        The pops and completes of the batch go first, set-based
        (:mod:`boss.store.batch`: a statement per kind of row, not per call);
        when that fails or does not suit the batch, its transaction is rolled
        back and a new one runs every call alone under its savepoint, so that a
        failing call is found and rolled back by itself. (A savepoint around the
        set-based part would do the same in one transaction, but SQLite then
        copies every page the batch touches into its statement journal.)
        """
        now = time.time()
        if sum(_tasks_in(call) for call in batch) >= 2:
            # one task alone: its own statements are the tuned path, and cheaper; a
            # batched report alone is not (per task a statement per row, each a round
            # trip on PostgreSQL)
            try:
                with self.store.tx() as conn:
                    return self._apply_together(conn, batch, now)
            except _CallByCall:
                pass
        if len(batch) == 1:
            return [self._apply_only(batch[0], now)]
        with self.store.tx() as conn:
            return [self._apply_alone(conn, call, now) for call in batch]

    def _apply_together(self, conn: Connection, batch: Sequence[calls.Call], now: float
                        ) -> list[Any]:
        """The pops and completes set-based, then the other calls one by one; raise
        _CallByCall (to roll back) when the batch must be applied call by call."""
        hot = [(k, call) for k, call in enumerate(batch) if isinstance(call, _HOT)]
        try:
            with fast.pipelined(conn):
                answers = self._set_based(conn, [call for _, call in hot], now)
        except set_based.Unsuited as exc:
            raise _CallByCall(str(exc)) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise  # the connection is gone: the whole batch failed, say why
            raise _CallByCall(str(exc)) from exc  # some call fails: which one, alone tells
        except (BossError, SQLAlchemyError) as exc:
            raise _CallByCall(str(exc)) from exc
        out: list[Any] = [None] * len(batch)
        for (k, _), answer in zip(hot, answers, strict=True):
            out[k] = answer
        done = {k for k, _ in hot}
        for k, call in enumerate(batch):
            if k not in done:
                out[k] = self._apply_alone(conn, call, now)
        return out

    def _set_based(self, conn: Connection, batch: Sequence[calls.Call], now: float
                   ) -> list[Any]:
        """Every complete (with its events) in batch order, then every pop in batch order
        (a complete-and-pop's own once its result was accepted, as :meth:`_apply`)."""
        finishes: list[set_based.Finish] = []
        for call in batch:
            if isinstance(call, calls.Complete):
                finishes.append(set_based.Finish(call.worker_id, call.result))
            elif isinstance(call, calls.CompleteAndPop):
                finishes.append(set_based.Finish(call.worker_id, call.result, call.events))
            elif isinstance(call, calls.CompleteMany):
                finishes += _finishes(call)
        ended = iter(set_based.complete(conn, finishes, now) if finishes else [])
        endings: list[Any] = []  # per call: its Ended (or None), or its list of them
        wants: list[tuple[int, int]] = []
        for call in batch:
            if isinstance(call, calls.CompleteMany):
                endings.append([next(ended) for _ in call.results])
                if call.n > 0:
                    wants.append((call.worker_id, call.n))
            elif isinstance(call, (calls.Complete, calls.CompleteAndPop)):
                endings.append(next(ended))
                if (isinstance(call, calls.CompleteAndPop) and call.n > 0
                        and endings[-1] is not None):
                    wants.append((call.worker_id, call.n))
            else:
                assert isinstance(call, calls.Pop)
                endings.append(None)
                wants.append((call.worker_id, call.n))
        popped = iter(self._pop_many(conn, wants, now))
        out: list[Any] = []
        for call, ending in zip(batch, endings, strict=True):
            if isinstance(call, calls.Pop):
                out.append(next(popped))
            elif isinstance(call, calls.Complete):
                out.append(ending)
            elif isinstance(call, calls.CompleteMany):
                out.append((ending, next(popped) if call.n > 0 else None))
            else:
                assert isinstance(call, calls.CompleteAndPop)
                out.append((ending, next(popped) if call.n > 0 and ending is not None
                            else None))
        return out

    def _pop_many(self, conn: Connection, wants: Sequence[tuple[int, int]], now: float
                  ) -> list[PopAnswer]:
        """:meth:`_pop` for each (worker, n) in order, with one statement per kind of row."""
        if not wants:
            return []
        states = set_based.worker_states(conn, [w for w, _ in wants])
        if any(w not in states for w, _ in wants):
            # one by one, it fails on the attempt's foreign key alone
            raise set_based.Unsuited("a pop for a worker that does not exist")
        out = [PopAnswer([], drain=True)] * len(wants)
        open_ = [(k, w, n) for k, (w, n) in enumerate(wants)
                 if states[w] not in ("draining", "terminated")]
        got = set_based.claim(conn, [(w, n) for _, w, n in open_],
                              self.settings.boss.lease_seconds, now)
        last: dict[int, str] = {}
        for (_, w, _), assigned in zip(open_, got, strict=True):
            last[w] = "busy" if assigned else "idle"
        set_based.seen(conn, last, now)
        left: bool | None = None  # is any task still to run, asked once
        for (k, _, _), assigned in zip(open_, got, strict=True):
            if assigned:
                out[k] = PopAnswer(assigned)
                continue
            if left is None:
                left = tasks.busy(conn)
            out[k] = (PopAnswer([], retry_after=self.settings.worker.poll_seconds) if left
                      else PopAnswer([], drain=True))
        return out

    def _apply_alone(self, conn: Connection, call: calls.Call, now: float) -> Any:
        """One call under its own savepoint: its answer, or its error (a BossError)."""
        try:
            with fast.savepoint(conn):
                return self._apply(conn, call, now)
        except (BossError, SQLAlchemyError) as exc:
            return _call_error(call, exc)

    def _apply_only(self, call: calls.Call, now: float) -> Any:
        """A batch of one call: :meth:`_apply_alone` without the savepoint, the call's
        failure rolling back its whole transaction (one statement pair less per call)."""
        try:
            with self.store.tx() as conn:
                try:
                    return self._apply(conn, call, now)
                except (BossError, SQLAlchemyError) as exc:
                    raise _Failed(_call_error(call, exc)) from exc
        except _Failed as failed:
            return failed.answer

    def _pop(self, conn: Connection, worker_id: int, n: int, now: float) -> PopAnswer:
        state = workers.state_of(conn, worker_id)
        if state in ("draining", "terminated"):
            return PopAnswer([], drain=True)
        got = tasks.claim(conn, worker_id, n, self.settings.boss.lease_seconds, now)
        workers.seen(conn, worker_id, now, "busy" if got else "idle")
        if got:
            return PopAnswer(got)
        if tasks.busy(conn):
            return PopAnswer([], retry_after=self.settings.worker.poll_seconds)
        return PopAnswer([], drain=True)

    def _events(self, conn: Connection, worker_id: int, items: Sequence[calls.Event],
                now: float) -> list[int]:
        """Store the events of the worker's running attempts (one query, one insert);
        return the ids of the attempts that are not current."""
        current = tasks.running_tasks_of(conn, worker_id, {e.attempt_id for e in items})
        rows = [{"kind": "job." + e.kind, "task_id": current[e.attempt_id],
                 "attempt_id": e.attempt_id, "worker_id": worker_id, "data": e.data,
                 "ts": e.ts or now}
                for e in items
                # a kind that is not a stage step is nothing a worker may write
                if e.attempt_id in current and e.kind in event_rows.WORKER_KINDS]
        event_rows.record_many(conn, rows)
        return sorted({e.attempt_id for e in items} - set(current))

    def _apply(self, conn: Connection, call: calls.Call, now: float) -> Any:
        lease = self.settings.boss.lease_seconds
        match call:
            case calls.Pop(worker_id, n):
                return self._pop(conn, worker_id, n, now)
            case calls.CompleteAndPop(worker_id, result, items, n):
                if items:
                    self._events(conn, worker_id, items, now)
                ended = tasks.complete(conn, worker_id, result, now)
                if ended is None or n <= 0:
                    return ended, None
                return ended, self._pop(conn, worker_id, n, now)
            case calls.CompleteMany(worker_id, results, items, n):
                if items:
                    self._events(conn, worker_id, items, now)
                endings = [tasks.complete(conn, worker_id, r, now) for r in results]
                return endings, (self._pop(conn, worker_id, n, now) if n > 0 else None)
            case calls.Events(worker_id, items):
                return self._events(conn, worker_id, items, now)
            case calls.Heartbeat(worker_id, attempt_ids):
                workers.seen(conn, worker_id, now)
                cancel = tasks.heartbeat(conn, worker_id, attempt_ids, lease, now)
                # claimed for it a while ago and still unknown to it: the reply was lost
                grace = 2 * self.settings.worker.heartbeat_seconds
                return Beat(cancel, tasks.unheard(conn, worker_id, attempt_ids, now - grace))
            case calls.Complete(worker_id, result):
                # last_seen is kept by pop and heartbeat; one write less per task here
                return tasks.complete(conn, worker_id, result, now)
            case calls.Event(worker_id, attempt_id):
                return attempt_id not in self._events(conn, worker_id, (call,), now)
            case calls.Hello(token, address, slots):
                row = workers.by_token(conn, hash_token(token))
                if row is None:
                    return None
                values: dict[str, Any] = {"last_seen": now, "state": "idle", "error": None}
                if address:
                    values["address"] = address
                if slots:
                    values["slots"] = slots
                workers.update_worker(conn, row.id, **values)
                event_rows.record(conn, "worker.joined", worker_id=row.id, ts=now,
                                  data={"address": address, "slots": slots or row.slots})
                return WorkerIdentity(row.id, row.name, slots or row.slots)
            case calls.Goodbye(worker_id, reason):
                tasks.expire(conn, now, worker_id=worker_id)
                workers.update_worker(conn, worker_id, state="terminated", last_seen=now)
                event_rows.record(conn, "worker.left", worker_id=worker_id, ts=now,
                                  data={"reason": reason})
                return None
            case calls.ExpireLeases():
                return tasks.expire(conn, now)
        raise TypeError(f"not a worker call: {call!r}")


_HOT = (calls.Pop, calls.Complete, calls.CompleteAndPop, calls.CompleteMany)


def _tasks_in(call: calls.Call) -> int:
    """How many tasks a call completes or asks for, as the set-based path counts them
    (a pop counts once whatever its ``n``: one claim statement serves it)."""
    if isinstance(call, calls.CompleteMany):
        return len(call.results) + (call.n > 0)
    return isinstance(call, _HOT)


def _call_error(call: calls.Call, exc: BossError | SQLAlchemyError) -> BossError:
    """A failed call's answer; raise again when the database connection is gone (the
    whole batch failed: the group commit retries it)."""
    if isinstance(exc, BossError):
        return exc
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        raise exc
    return DatabaseError(f"{type(call).__name__}: {exc}")


class _Failed(Exception):
    """A batch of one failed: roll its transaction back, answer ``answer``."""

    def __init__(self, answer: BossError) -> None:
        self.answer = answer


class _CallByCall(Exception):
    """The set-based transaction must be rolled back and the batch applied call by call."""


def _finishes(call: calls.CompleteMany) -> list[set_based.Finish]:
    """One Finish per result; each event goes with its attempt's result, those of
    attempts the call does not complete with the first (all before any complete, as
    applying the call alone does)."""
    ids = {r.attempt_id for r in call.results}
    own: dict[int, list[calls.Event]] = {}
    rest: list[calls.Event] = []
    for e in call.events:
        (own.setdefault(e.attempt_id, []) if e.attempt_id in ids else rest).append(e)
    out = [set_based.Finish(call.worker_id, r, own.get(r.attempt_id, ()))
           for r in call.results]
    if rest:
        out[0] = set_based.Finish(call.worker_id, call.results[0],
                                  (*rest, *own.get(call.results[0].attempt_id, ())))
    return out


@dataclass(frozen=True)
class PopAnswer:
    """What ``pop`` answers: tasks, or nothing yet (retry after), or drain (all done)."""

    tasks: list[Claimed]
    retry_after: float = 0.0
    drain: bool = False


@dataclass(frozen=True)
class Beat:
    """What ``heartbeat`` answers: attempts to cancel, and attempts claimed for the worker
    that it never heard of (to run them rather than let their leases expire)."""

    cancel: list[int]
    adopt: list[Claimed]


def _unwrap(answer: Any) -> Any:
    if isinstance(answer, BaseException):
        raise answer
    return answer
