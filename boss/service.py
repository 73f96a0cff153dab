"""The boss service: every operation the CLI and the RPC server offer.

Each public method is one transaction through the store; nothing here holds
a query. The CLI and the RPC server call these and nothing below them.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from boss import calls
from boss import push as pushing
from boss.errors import BossError, DatabaseError, PushError, UserError
from boss.lifecycle import TaskState
from boss.providers import Created, Failed, Provider, WorkerSpec
from boss.store import Store, fast, reads, tasks, workers
from boss.store import batch as set_based
from boss.store import events as event_rows
from boss.store.push import PushResult, push_file
from boss.store.tasks import Claimed, Ended
from protocol.document import BUCKET_RE
from protocol.messages import Result
from protocol.settings import Settings, absolute_url, hide_password

DEFAULT_BUCKET = "default"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class WorkerIdentity:
    id: int
    name: str
    slots: int


class Boss:
    """The boss's operations over one store."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or Store.open(settings.boss.database_url)

    def close(self) -> None:
        self.store.close()

    # --- set-up ---------------------------------------------------------

    def init(self) -> None:
        """Create the database (if needed) and apply every migration."""
        self.store.upgrade()

    # --- tasks ----------------------------------------------------------

    def push(self, path: Path | None, *, stdin: IO[bytes] | None = None,
             skip_existing: bool = False) -> PushResult:
        """Push a file (or standard input): all tasks or none."""
        spooled = None
        limit = self.settings.boss.max_push_bytes
        if path is None:
            spooled = pushing.spool_stdin(stdin or sys.stdin.buffer,
                                          Path(self.settings.worker.workdir).parent / "spool",
                                          limit)
            path = spooled
        try:
            # by its size alone, before a byte is read: a huge file is a mistake to report
            # at once (a binary file, the wrong file), not gigabytes to check first
            size = path.stat().st_size if path.is_file() else 0
            if size > limit:
                what = (f"standard input holds more than {limit} bytes" if spooled
                        else f"the file is {size} bytes")
                raise PushError("<stdin>" if spooled else str(path), [
                    f"{what}, over the limit of {limit} bytes ([boss] max_push_bytes, "
                    "ECLOUD_BOSS_MAX_PUSH_BYTES); split it into several pushes or raise "
                    "the limit"])
            # one transaction, opened once the first chunk of the file checks out
            return push_file(self.store, path, "<stdin>" if spooled else str(path),
                             DEFAULT_BUCKET, skip_existing=skip_existing)
        finally:
            if spooled:
                spooled.unlink(missing_ok=True)

    @property
    def database(self) -> str:
        """The database URL, without its password."""
        return self.store.engine.url.render_as_string(hide_password=True)

    def progress(self) -> dict[str, dict[str, int]]:
        """Tasks and workers by state: what the autoscaler and `boss run` poll."""
        with self.store.ro() as conn:
            return {"tasks": reads.task_counts(conn), "workers": workers.counts(conn)}

    def status(self) -> dict[str, Any]:
        """`boss admin status`: the progress, worker errors, cost, context, database."""
        from boss import cost
        from boss.store import report_reads

        now = time.time()
        with self.store.ro() as conn:
            usage = [cost.WorkerUsage(w["id"], w["provider"], w["state"], w["created_at"],
                                      w["last_seen"]) for w in report_reads.workers(conn)]
            costs = cost.worker_costs(usage, self.settings, now)
            return {
                "tasks": reads.task_counts(conn),
                "workers": workers.counts(conn),
                "worker_errors": [{"error": e, "count": n} for e, n in workers.errors(conn)],
                "cost": {"vm_seconds": sum(c.seconds for c in costs),
                         "cost": sum(c.cost for c in costs if c.cost is not None),
                         "currency": self.settings.cost.currency,
                         "unpriced_workers": sum(1 for c in costs if c.cost is None)},
                "context": {k: hide_password(v) for k, v in workers.context(conn).items()},
                "database": self.database,
            }

    def tasks(self, state: str | None = None, after_id: int = 0,
              limit: int = 100) -> list[dict[str, Any]]:
        if state is not None and state not in {str(s) for s in TaskState}:
            raise UserError(f"--state {state!r} is not a task state; one of: "
                            + ", ".join(str(s) for s in TaskState))
        with self.store.ro() as conn:
            return reads.tasks(conn, state, after_id, limit)

    def show(self, name: str) -> dict[str, Any]:
        with self.store.ro() as conn:
            return reads.task(conn, name)

    def cancel(self, name: str) -> TaskState:
        with self.store.tx() as conn:
            return tasks.cancel(conn, name, time.time())

    def retry(self, names: Sequence[str] | None) -> int:
        with self.store.tx() as conn:
            return tasks.retry(conn, names, time.time())

    # --- observing a run ------------------------------------------------

    def events(self, after_id: int = 0, limit: int = 1000, task: str | None = None,
               since_ts: float | None = None, kinds: Sequence[str] = ()
               ) -> list[dict[str, Any]]:
        """Events after ``after_id``, oldest first, with hyperflow's routing key and names."""
        with self.store.ro() as conn:
            task_id = tasks.find(conn, task)[0] if task is not None else None
            rows = event_rows.since(conn, after_id, limit=limit, task_id=task_id,
                                    since_ts=since_ts, kinds=kinds)
            names = reads.task_names(conn, {r["task_id"] for r in rows if r["task_id"]})
        for r in rows:
            r["key"] = event_rows.routing_key(r["kind"], r["task_id"])
            r["task"] = names.get(r["task_id"])
        return rows

    def prune_events(self, before_ts: float) -> int:
        with self.store.tx() as conn:
            return event_rows.prune(conn, before_ts)

    def why(self, name: str) -> dict[str, Any]:
        """The task and the sentences of `boss why`."""
        from boss import why

        with self.store.ro() as conn:
            task = reads.task(conn, name)
            views = workers.views(conn)
            situation = why.Situation(
                queue_ahead=(reads.queue_ahead(conn, task["id"], task["priority"])
                             if task["state"] == "ready" else 0),
                workers=workers.counts(conn),
                free_slots=sum(max(0, v["slots"] - v["running"]) for v in views
                               if v["state"] in ("idle", "busy")),
                worker_errors=[{"error": e, "count": n} for e, n in workers.errors(conn)],
                failed_ancestors=(reads.failed_ancestors(conn, task["id"])
                                  if task["state"] == "upstream_failed" else ()),
                autoscale=self.settings.autoscale.enabled,
                max_workers=self.settings.autoscale.max_workers)
        return {"task": name, "state": task["state"],
                "because": why.explain(task, situation)}

    def logs(self, name: str, attempt: int | None = None, stream: str = "stdout") -> Any:
        """A task's captured output (:class:`boss.logs.Logs`)."""
        from boss import logs

        task = self.show(name)
        buckets, default = self.buckets()
        return logs.fetch(task, logs.pick_attempt(task, attempt), stream, buckets, default)

    def dashboard(self) -> dict[str, Any]:
        """What `boss watch` shows: counts, workers with their tasks, latest failures."""
        with self.store.ro() as conn:
            running = reads.running_by_worker(conn)
            return {"tasks": reads.task_counts(conn),
                    "workers": [{**w, "tasks": running.get(w["id"], [])}
                                for w in workers.views(conn)],
                    "worker_errors": [{"error": e, "count": n}
                                      for e, n in workers.errors(conn)],
                    "failures": reads.recent_failures(conn)}

    # --- context and datastore ------------------------------------------

    def context(self) -> dict[str, str]:
        with self.store.ro() as conn:
            return workers.context(conn)

    def set_context(self, key: str, value: str) -> None:
        with self.store.tx() as conn:
            workers.set_context(conn, key, value)

    def set_datastore(self, url: str) -> None:
        """The default bucket's URL (ecloud's ``set_datastore``)."""
        self.set_context("datastore", _check_url(url))

    def set_bucket(self, name: str, url: str) -> None:
        if not BUCKET_RE.fullmatch(name) or name == DEFAULT_BUCKET:
            raise UserError(f"bucket name {name!r} is not valid (letters, digits, _ . -; "
                            f"{DEFAULT_BUCKET!r} is the datastore: use set-datastore)")
        self.set_context(f"bucket.{name}", _check_url(url))

    def drop_context(self, keys: Sequence[str] | None = None) -> int:
        with self.store.tx() as conn:
            return workers.drop_context(conn, keys)

    def buckets(self) -> tuple[dict[str, str], str]:
        """Bucket name -> URL (settings overridden by Context), and the default URL."""
        ctx = self.context()
        mapping = dict(self.settings.datastore.buckets)
        for key, value in ctx.items():
            if key.startswith("bucket."):
                mapping[key.removeprefix("bucket.")] = value
        default = ctx.get("datastore", self.settings.datastore.default)
        mapping[DEFAULT_BUCKET] = default
        return mapping, default

    # --- workers ----------------------------------------------------------

    def add_worker(self, name: str | None = None, provider: str = "manual", slots: int = 1,
                   reference: str | None = None) -> tuple[int, str, str]:
        """Register a worker; return (id, name, token). Only the token's hash is kept."""
        token = new_token()
        name = name or f"{provider}-{secrets.token_hex(4)}"
        with self.store.tx() as conn:
            wid = workers.create(conn, name=name, provider=provider, slots=slots,
                                 token_hash=hash_token(token), now=time.time(),
                                 reference=reference)
            event_rows.record(conn, "worker.created", worker_id=wid,
                              data={"provider": provider, "name": name})
        return wid, name, token

    def instantiate(self, n: int, provider: Provider, slots: int, spot: bool = False
                    ) -> list[Created | Failed]:
        """Create ``n`` workers with ``provider``, each with its own token (ecloud's
        ``instantiate_worker``). Failures are recorded on the worker row, not raised."""
        if n < 1:
            raise UserError("the number of workers must be at least 1")
        specs = []
        for _ in range(n):
            wid, name, token = self.add_worker(provider=provider.name, slots=slots)
            specs.append(WorkerSpec(wid, name, token, slots, spot))
        results = provider.create(specs)
        now = time.time()
        with self.store.tx() as conn:
            for r in results:
                if isinstance(r, Created):
                    workers.update_worker(conn, r.worker_id, reference=r.reference,
                                          address=r.address)
                else:
                    workers.update_worker(conn, r.worker_id, state="failed", error=r.error,
                                          last_seen=now)
                    event_rows.record(conn, "worker.failed", worker_id=r.worker_id, ts=now,
                                      data={"error": r.error})
        return results

    def terminate(self, refs: Sequence[str] | None, providers: Callable[[str], Provider]
                  ) -> list[str]:
        """Stop workers (by id or name; all live ones when ``refs`` is None)."""
        now = time.time()
        with self.store.tx() as conn:
            if refs is None:
                rows = [workers.by_name_or_id(conn, str(v["id"])) for v in workers.views(conn)]
            else:
                rows = [workers.by_name_or_id(conn, r) for r in refs]
        done = []
        for row in rows:
            if row.reference and row.provider not in ("manual",):
                providers(row.provider).delete(row.reference)
            with self.store.tx() as conn:
                tasks.expire(conn, now, worker_id=row.id)
                workers.update_worker(conn, row.id, state="terminated", reference=None,
                                      last_seen=now)
                event_rows.record(conn, "worker.terminated", worker_id=row.id, ts=now)
            done.append(row.name)
        return done

    def worker_views(self) -> list[dict[str, Any]]:
        with self.store.ro() as conn:
            return workers.views(conn)

    def drain_workers(self, ids: Sequence[int]) -> list[int]:
        """Tell these workers to leave at their next pop (the autoscaler's scale-down)."""
        with self.store.tx() as conn:
            return workers.set_state(conn, ids, "draining", time.time(),
                                     only_from=("idle",))

    def lose_workers(self, ids: Sequence[int]) -> list[Any]:
        """Workers gone silent: lost, their attempts requeued (not spending retries)."""
        now = time.time()
        with self.store.tx() as conn:
            lost = workers.set_state(conn, ids, "lost", now)
            for wid in lost:
                tasks.expire(conn, now, worker_id=wid)
                event_rows.record(conn, "worker.lost", worker_id=wid, ts=now)
            return workers.by_ids(conn, lost)

    def forget_instance(self, worker_id: int) -> None:
        """The provider deleted the worker's instance: drop its reference."""
        with self.store.tx() as conn:
            workers.update_worker(conn, worker_id, reference=None)

    def ended_instances(self, provider: str) -> list[Any]:
        with self.store.ro() as conn:
            return workers.undeleted(conn, provider)

    def known_references(self, provider: str) -> set[str]:
        with self.store.ro() as conn:
            return workers.references(conn, provider)

    def workers(self, include_terminated: bool = False) -> list[dict[str, Any]]:
        with self.store.ro() as conn:
            return workers.listing(conn, include_terminated)

    def authenticate(self, token: str, address: str | None = None,
                     slots: int | None = None) -> WorkerIdentity | None:
        """Bind a connection to its worker (``hello``); None for an unknown token."""
        answer: WorkerIdentity | None = self.apply_one(calls.Hello(token, address, slots))
        return answer

    def goodbye(self, worker_id: int, reason: str = "") -> None:
        self.apply_one(calls.Goodbye(worker_id, reason))

    # --- transitions (batched by the RPC server) --------------------------

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
        if len(batch) == 1:
            return [self._apply_only(batch[0], now)]
        if sum(isinstance(call, _HOT) for call in batch) >= 2:
            # one hot call alone: its own statements are the tuned path, and cheaper
            try:
                with self.store.tx() as conn:
                    return self._apply_together(conn, batch, now)
            except _CallByCall:
                pass
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


def _check_url(url: str) -> str:
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in ("file", "sftp", "s3", "gs"):
        raise UserError(f"datastore URL {url!r}: use file:///path, sftp://user@host/path, "
                        "s3://bucket/prefix or gs://bucket/prefix")
    return absolute_url(url, Path.cwd()) if scheme == "file" else url
