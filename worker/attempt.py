"""One attempt of one task: stage in, run, stage out, report.

Storage modes (hyperflow):

- ``cloud``: inputs are copied from their buckets through the shared cache into
  an empty work directory (``workdir_root/<attempt_id>/work``), outputs are
  copied back, and the directory is removed at the end (or, when the attempt
  left it empty, kept for the next one: see ``worker/workdirs.py``).
- ``nfs``: the same, but the buckets are ``file://`` paths on a shared
  filesystem, copied directly (a cache would only duplicate them).
- ``local``: the commands run in place in the document's ``workdir``; nothing
  is copied, inputs must be there and outputs are left there.

Internal paths name where the command sees a file: inside the container when
the task has an ``image`` (the local file is bind-mounted there), else relative
to the work directory (a leading ``/`` is dropped). Either way the local file
is ``<work>/<internal path>``, which must resolve inside the work directory.

Outputs are uploaded only when every command succeeded, first all to temporary
names beside their final paths, then moved into place, so a failed or lost
attempt never leaves a partial output at a final path. The full logs of every
command go to the default bucket under ``ecloud-logs/<task>/<attempt>/``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from protocol.document import RemotePath, TaskDocument, parse_remote
from protocol.messages import Assignment, Result
from protocol.settings import WorkerSettings
from worker import datastore
from worker.cache import Cache
from worker.containers import ContainerSpec, Mount, container_name, runtime_for
from worker.errors import (
    CancelledError,
    DatastoreError,
    PathError,
    RemoteNotFoundError,
    StagingError,
    WorkerError,
)
from worker.execution import Execution, Step, base_env, command_argv, run_steps
from worker.workdirs import WorkTrees

log = logging.getLogger(__name__)
FULL_BYTES = 1 << 20  # free space under which a failed command is said to have filled the disk
Emit = Callable[[str, dict[str, Any]], None]


@dataclass
class AttemptEnv:
    """What every attempt on this worker shares."""

    workdir_root: Path
    cache: Cache | None
    buckets: dict[str, str]
    default_url: str
    settings: WorkerSettings
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # attempt id -> why it may no longer publish outputs (lease not renewed), or None
    fence: Callable[[int], str | None] | None = None
    trees: WorkTrees = field(default_factory=WorkTrees)


@dataclass(frozen=True)
class Binding:
    """A declared input or output: remote path, internal path and local path."""

    field: str  # "inputs['data:x']", for messages
    remote: RemotePath
    internal: str
    local: Path


class Layout:
    """Maps internal paths to local ones and refuses anything that leaves the work dir."""

    def __init__(self, work: Path, container: bool) -> None:
        self.work = work
        self.real = Path(os.path.realpath(work))
        self.container = container

    def local(self, internal: str, where: str) -> Path:
        if self.container and not internal.startswith("/"):
            raise PathError(f"{where}: internal path {internal!r} must be absolute when the "
                            "task has an 'image' (it is where the container sees the file)")
        rel = internal.strip("/")
        if rel in ("", "."):
            raise PathError(f"{where}: internal path {internal!r} names the work directory "
                            "itself; name a file or directory inside it")
        path = self.work / rel
        self.guard(path, where)
        return path

    def guard(self, path: Path, where: str = "") -> None:
        """Refuse a path that resolves (through symlinks) outside the work directory."""
        real = Path(os.path.realpath(path))
        if real != self.real and not real.is_relative_to(self.real):
            raise PathError(f"{where + ': ' if where else ''}{path} resolves to {real}, outside "
                            f"the work directory {self.work}; symbolic links may not leave it")


def run_attempt(assignment: Assignment, env: AttemptEnv, emit: Emit,
                cancel: threading.Event) -> Result:
    """Run one attempt end to end; every problem of the task becomes a failed Result."""
    attempt = _Attempt(assignment, env, emit, cancel)
    try:
        return attempt.run()
    except Exception as exc:  # a bug of ours must not take the worker's slot down
        log.exception("attempt %s of task %r", assignment.attempt_id, assignment.name)
        return attempt.result("failed", f"internal worker error: {type(exc).__name__}: {exc}")
    finally:
        env.trees.done(attempt.root, reusable=attempt.on_host)


class _Attempt:
    def __init__(self, assignment: Assignment, env: AttemptEnv, emit: Emit,
                 cancel: threading.Event) -> None:
        self.a = assignment
        self.env = env
        self._emit = emit
        self.cancel = cancel
        self.root = env.workdir_root / str(assignment.attempt_id)
        self.metrics: dict[str, float] = {"wall": 0.0, "cpu": 0.0, "max_rss": 0.0,
                                          "bytes_in": 0.0, "bytes_out": 0.0}
        self.execution: Execution | None = None
        self.on_host = False  # its commands ran (if at all) outside a container

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self._emit(kind, data)
        except Exception:  # events are progress reports: losing one must not fail the task
            log.warning("could not emit %s for attempt %s", kind, self.a.attempt_id,
                        exc_info=True)

    def result(self, outcome: str, reason: str = "") -> Result:
        last = self.execution.last if self.execution else None
        return Result(self.a.attempt_id, outcome, last.exit_status if last else None, reason,
                      dict(self.metrics), last.stdout_tail if last else "",
                      last.stderr_tail if last else "")

    def run(self) -> Result:
        try:
            doc = TaskDocument.model_validate(self.a.document)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors(include_url=False))
            return self.result("failed", f"invalid task document: {problems}")
        self.on_host = doc.image is None
        try:
            self.env.trees.make(self.root)
        except OSError as exc:  # read-only, full, a file in the way: the worker's setup
            return self.result("failed", f"cannot make the work directory {self.root}: "
                               f"{exc.strerror or exc} (check the worker's workdir "
                               f"{self.env.workdir_root})")
        try:
            with datastore.Datastore(self.env.buckets, self.env.default_url,
                                     self.env.storage_options) as store:
                try:
                    return self._run(doc, store)
                finally:
                    self._upload_logs(store)
        except CancelledError as exc:
            return self.result("cancelled", str(exc))
        except WorkerError as exc:
            return self.result("failed", str(exc))

    def _run(self, doc: TaskDocument, store: datastore.Datastore) -> Result:
        if doc.storage == "local":
            work = Path(doc.workdir or "")
            if not work.is_dir():
                raise StagingError(f"workdir {work} does not exist on this worker (storage "
                                   "'local' runs the commands in place there)")
        else:
            work = self.root / "work"
        layout = Layout(work, container=doc.image is not None)
        inputs = _bindings(doc.inputs, "inputs", layout)
        outputs = _bindings(doc.outputs, "outputs", layout)

        with self._stage("stage-in", "bytes_in") as moved:
            moved.append(self._stage_in(doc, store, inputs, layout))
        steps = self._steps(doc, layout, inputs, outputs)
        self.emit("execution.started", {})
        self.execution = run_steps(
            steps, cwd=work, env=base_env(doc.env) if doc.image is None else dict(os.environ),
            timeout=doc.timeout, cancel=self.cancel, log_dir=self.root / "logs",
            tail_bytes=self.env.settings.log_tail_bytes, guard=layout.guard)
        ex = self.execution
        self.metrics.update(ex.metrics())
        last = ex.last
        self.emit("execution.finished", {
            "exit_status": last.exit_status if last else None,
            "executable": last.label if last else "", "metrics": ex.metrics()})
        if ex.outcome != "succeeded":
            return self.result(ex.outcome, self._explain(doc, ex) + _full(work))
        with self._stage("stage-out", "bytes_out") as moved:
            moved.append(self._stage_out(doc, store, outputs, layout))
        return self.result("succeeded")

    @contextmanager
    def _stage(self, kind: str, metric: str) -> Iterator[list[int]]:
        self.emit(f"{kind}.started", {})
        start = time.monotonic()
        moved: list[int] = []
        yield moved
        seconds = time.monotonic() - start
        self.metrics[metric] = float(sum(moved))
        self.metrics[kind.replace("-", "_") + "_seconds"] = seconds
        # "time" is hyperflow's name for the transfer time
        self.emit(f"{kind}.finished", {"bytes": sum(moved), "seconds": seconds, "time": seconds})

    def _stage_in(self, doc: TaskDocument, store: datastore.Datastore, inputs: list[Binding],
                  layout: Layout) -> int:
        if doc.storage == "local":
            for b in inputs:
                if not os.path.lexists(b.local):
                    raise StagingError(f"staging: input {b.remote} not found at {b.local} "
                                       f"({b.field}; storage 'local' reads it in place)")
            return 0
        cache = self.env.cache if doc.storage == "cloud" else None

        def fetch(fs: datastore.FileSystem, rpath: str, local: Path) -> int:
            if cache is None:
                return datastore.get_file(fs, rpath, local)
            return cache.fetch(fs, rpath, local, self.cancel)

        batch = cache.batch if cache is not None else None

        moved = 0
        for b in inputs:
            if self.cancel.is_set():
                raise CancelledError("cancelled during stage-in")
            try:
                fs, rpath = self._resolve(doc, store, b)
                moved += datastore.copy_in(fs, rpath, b.local, fetch=fetch, batch=batch,
                                           cancel=self.cancel)
            except RemoteNotFoundError as exc:
                raise StagingError(f"staging: input {b.remote} not found ({exc}); push it "
                                   f"first or fix {b.field}") from exc
            except DatastoreError as exc:
                raise StagingError(f"staging: input {b.remote} ({b.field}): {exc}") from exc
        return moved

    def _stage_out(self, doc: TaskDocument, store: datastore.Datastore, outputs: list[Binding],
                   layout: Layout) -> int:
        for b in outputs:
            self._check_produced(b, layout, doc.image is not None)
        if doc.storage == "local":
            return 0
        token = f".ecloud-part-{self.a.attempt_id}"
        pending: list[tuple[datastore.FileSystem, str, str]] = []
        moved = 0
        try:
            for b in outputs:  # all to temporary names first ...
                if self.cancel.is_set():
                    raise CancelledError("cancelled during stage-out; no output was published")
                fs, final = self._resolve(doc, store, b)
                temp = final.rstrip("/") + token + ("/" if b.remote.is_dir else "")
                pending.append((fs, temp, final))
                try:
                    moved += datastore.upload(fs, b.local, temp, cancel=self.cancel,
                                              guard=partial(layout.guard, where=b.field))
                except DatastoreError as exc:
                    raise StagingError(f"staging: output {b.remote} ({b.field}): {exc}") from exc
            for b, (fs, _, final) in zip(outputs, pending, strict=True):
                try:  # a conflict found now leaves every output unpublished
                    datastore.check_publish(fs, final)
                except DatastoreError as exc:
                    raise StagingError(f"staging: output {b.remote} ({b.field}): {exc}") from exc
            # the point of no return: a worker that lost the boss's lease keeps out
            why = self.env.fence(self.a.attempt_id) if self.env.fence and pending else None
            if why:
                raise StagingError(f"outputs not published: {why}")
            while pending:  # ... then each into place, so no final path is ever partial
                fs, temp, final = pending[0]
                datastore.publish(fs, temp, final)
                pending.pop(0)
        finally:
            for fs, temp, _ in pending:
                datastore.discard(fs, temp)
        return moved

    def _check_produced(self, b: Binding, layout: Layout, container: bool) -> None:
        layout.guard(b.local, b.field)
        kind = "directory" if b.remote.is_dir else "file"
        ok = b.local.is_dir() if b.remote.is_dir else b.local.is_file()
        if ok and container:
            st = b.local.stat()  # the mount point was made with mtime 0: untouched = not made
            ok = not (st.st_mtime_ns == 0 and (b.local.is_dir() or st.st_size == 0))
        if not ok:
            raise StagingError(f"output {b.remote}: the commands did not produce the {kind} "
                               f"{b.internal!r} ({b.field}); check the command writes it there")

    def _resolve(self, doc: TaskDocument, store: datastore.Datastore, b: Binding
                 ) -> tuple[datastore.FileSystem, str]:
        if doc.storage == "nfs" and not store.url(b.remote.bucket).startswith("file://"):
            raise StagingError(f"{b.field}: storage 'nfs' needs file:// buckets, but bucket "
                               f"{b.remote.bucket!r} is {store.url(b.remote.bucket).split('?')[0]}")
        return store.resolve(b.remote)

    def _steps(self, doc: TaskDocument, layout: Layout, inputs: list[Binding],
               outputs: list[Binding]) -> list[Step]:
        redirects: list[tuple[str, str, int]] = []  # internal path, stream, command index
        for i, cmd in enumerate(doc.commands):
            redirects += [(p, s, i) for s, p in (("stdin", cmd.stdin), ("stdout", cmd.stdout),
                                                  ("stderr", cmd.stderr)) if p is not None]
        local = {p: layout.local(p, f"commands[{i}].{s}") for p, s, i in redirects}
        declared = [*inputs, *outputs]
        mounts = [Mount(b.local, b.internal) for b in declared]
        for b in outputs:  # made now, with mtime 0, so that "not produced" can be seen
            b.local.parent.mkdir(parents=True, exist_ok=True)
            if layout.container and not b.local.exists():
                if b.remote.is_dir:
                    b.local.mkdir()
                else:
                    b.local.touch()
                os.utime(b.local, ns=(0, 0))
        for p, stream, _ in redirects:
            if stream == "stdin":
                continue  # read, never created: a declared input or an earlier redirect
            local[p].parent.mkdir(parents=True, exist_ok=True)
            inside = any(_under(p, b.internal) for b in declared)
            if layout.container and not inside and p not in {m.target for m in mounts}:
                local[p].touch()  # mounted, so that the next commands can read it too
                mounts.append(Mount(local[p], p))
        runtime = runtime_for(self.env.settings) if doc.image is not None else None
        if runtime is not None:
            runtime.check()
        steps = []
        for i, cmd in enumerate(doc.commands):
            argv = command_argv(cmd)
            label = "sh" if cmd.shell else cmd.command[0].rsplit("/", 1)[-1]
            on_kill = None
            if runtime is not None and doc.image is not None:
                spec = ContainerSpec(doc.image, container_name(self.a.attempt_id, i),
                                     tuple(mounts), doc.env, interactive=cmd.stdin is not None)
                argv = runtime.run_argv(spec, argv)
                on_kill = _remover(runtime.remove, spec.name)
            steps.append(Step(argv, label, stdin=local[cmd.stdin] if cmd.stdin else None,
                              stdout=local[cmd.stdout] if cmd.stdout else None,
                              stderr=local[cmd.stderr] if cmd.stderr else None,
                              on_kill=on_kill,
                              # an earlier command may have made a mount's parent a link
                              # out of the work dir: the mount would bind the host file
                              paths=tuple(m.source for m in mounts) if runtime else ()))
        return steps

    def _explain(self, doc: TaskDocument, ex: Execution) -> str:
        last = ex.last
        if doc.image is None or ex.outcome != "failed" or last is None:
            return ex.reason
        why = runtime_for(self.env.settings).explain(last.exit_status or 0)
        if why is None:
            return ex.reason
        detail = last.stderr_tail.strip().splitlines()[-1:] or [""]
        return f"{ex.reason}: {why} (image {doc.image!r}) {detail[0]}".rstrip()

    def _upload_logs(self, store: datastore.Datastore) -> None:
        if self.execution is None:
            return
        prefix = log_prefix(self.a.name, self.a.attempt_id)
        try:
            for step in self.execution.steps:
                for path, ext in ((step.stdout_log, "stdout"), (step.stderr_log, "stderr")):
                    # an empty log says nothing; skipping it saves two copies per quiet task
                    if path is not None and path.is_file() and path.stat().st_size:
                        fs, rpath = store.resolve(RemotePath("default",
                                                             f"{prefix}/{step.index}.{ext}"))
                        datastore.upload(fs, path, rpath, guard=lambda p: None)
        except WorkerError as exc:  # the task's result stands; its logs are a convenience
            log.warning("attempt %s: logs not uploaded to %s: %s", self.a.attempt_id,
                        prefix, exc)


def _full(work: Path) -> str:
    """A note for a failed command's reason when its work directory's filesystem is full:
    its own stderr log may then be empty, so nothing else would say why."""
    try:
        st = os.statvfs(work)
    except OSError:
        return ""
    if st.f_bavail * st.f_frsize >= FULL_BYTES:
        return ""
    return f" (no space left on device: the work directory {work} is on a full filesystem)"


def log_prefix(task: str, attempt_id: int) -> str:
    """``ecloud-logs/<task>/<attempt>`` in the default bucket, whatever the task's name.

    A name may hold ``/`` (kept: it groups logs), but its ``.`` and ``..``
    segments are escaped (``%2E``) and empty ones dropped, so that no name can
    place logs outside ``ecloud-logs/`` or outside the bucket.
    """
    parts = [p.replace(".", "%2E") if p in (".", "..") else p for p in task.split("/") if p]
    return "/".join(["ecloud-logs", *(parts or ["%2E"]), str(attempt_id)])


def _bindings(mapping: dict[str, str], what: str, layout: Layout) -> list[Binding]:
    out = []
    for remote, internal in mapping.items():
        where = f"{what}[{remote!r}]"
        out.append(Binding(where, parse_remote(remote), internal, layout.local(internal, where)))
    return out


def _under(path: str, parent: str) -> bool:
    parent = parent.rstrip("/")
    return path.rstrip("/") == parent or path.startswith(parent + "/")


def _remover(remove: Callable[[str], None], name: str) -> Callable[[], None]:
    return lambda: remove(name)
