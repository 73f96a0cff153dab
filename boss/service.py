"""The boss service: every operation the CLI and the RPC server offer.

Each public method is one transaction through the store; nothing here holds
a query. The CLI and the RPC server call these and nothing below them.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from boss import calls
from boss import push as pushing
from boss.errors import PushError, UserError
from boss.lifecycle import TaskState
from boss.providers import Created, Failed, Provider, WorkerSpec
from boss.store import Store, reads, tasks, workers
from boss.store import events as event_rows
from boss.store.push import PushResult, push_file
from boss.transitions import Transitions, WorkerIdentity, hash_token
from protocol.document import BUCKET_RE
from protocol.settings import Settings, absolute_url, hide_password

DEFAULT_BUCKET = "default"


def new_token() -> str:
    return secrets.token_urlsafe(32)


class Boss(Transitions):
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


def _check_url(url: str) -> str:
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in ("file", "sftp", "s3", "gs"):
        raise UserError(f"datastore URL {url!r}: use file:///path, sftp://user@host/path, "
                        "s3://bucket/prefix or gs://bucket/prefix")
    return absolute_url(url, Path.cwd()) if scheme == "file" else url
