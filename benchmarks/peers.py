"""Benchmark 8: the same N no-op shell tasks through ecloud and its peers, in one table.

    .venv/bin/python benchmarks/run.py peers                        # 10,000 tasks, W = 2, 3 runs
    .venv/bin/python benchmarks/run.py peers --tasks 2000 --repeat 3
    .venv/bin/python benchmarks/peers.py --tasks 2000 --slots 4 --peers ecloud celery

Every peer runs N tasks, each ``subprocess.run(["true"])`` (or the command
``true``), with the same concurrency W, in the same run, interleaved (run 1
of every peer, then run 2, ...):

- ecloud: a queue of N tasks ``["true"]`` in a fresh boss (SQLite), ``boss
  serve``, one ``worker run --burst --slots W`` (as shell_tasks.py does).
- GNU parallel: ``parallel -jW true ::: 0 .. N-1``.
- xargs: ``xargs -P W -n1 true``, fed N lines.
- Celery with a Redis broker and result backend: N ``send_task`` calls, then
  one ``celery worker --pool prefork --concurrency W``.
- RQ: N jobs ``subprocess.run(["true"])`` enqueued, then W ``rq worker
  --burst`` processes (RQ forks a work horse per job, its default).
- huey with SqliteHuey (a fresh database file): N tasks enqueued, then one
  consumer with W worker threads (huey's default kind).

Redis is Debian's ``redis-server``, started here on a free 127.0.0.1 port in a
temporary directory with ``--save ''`` (nothing on disk) and stopped after.
Every queue holds its N tasks before the clock starts (the enqueue is shown
apart); the clock runs from starting the workers until every task is done:
the burst workers have left (ecloud, RQ), or N results are stored (Celery,
huey); parallel and xargs are timed whole. Every task must have succeeded.

A peer that cannot be installed or started here is a row saying "not
available: REASON", never left out. Install them with ``pip install -e
'.[bench]'`` and ``apt-get install redis-server parallel``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import Cell, Report, print_report  # noqa: E402
from benchmarks.shell_tasks import (  # noqa: E402
    BIN,
    BenchError,
    Unavailable,
    bound_for,
    gnu_parallel,
    scrubbed_env,
    spawn,
    stop,
    stopping,
    tail,
    time_ecloud,
    time_parallel,
    time_xargs,
    version_of,
    wait_listening,
)
from tests.ports import free_port  # noqa: E402

NAME = "peers"
TINY_ARGS = ["--tasks", "20", "--repeat", "1"]
FULL_ARGS: list[str] = []  # the defaults: 10,000 tasks, W = 2, 3 runs
REPEATS = True

PEERS = ("ecloud", "parallel", "xargs", "celery", "rq", "huey")
QUEUE = "ecloud_bench"
POLL = 0.02  # seconds between checks for "all N done" (Celery, huey)
PIP_HINT = "pip install -e '.[bench]'"


@dataclass(frozen=True)
class Timing:
    seconds: float  # workers started -> all N done
    enqueue_seconds: float | None = None  # filling the queue, not in `seconds`


@dataclass
class Peer:
    name: str
    how: str
    durable: str
    measure: Callable[[int, int], Timing]
    version: str = ""
    seconds: list[float] = field(default_factory=list)
    enqueue: list[float] = field(default_factory=list)
    why_not: str = ""  # "not available: ..." or "failed: ..."


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"{module} is not installed ({PIP_HINT}): {exc}") from exc


def _dist_version(dist: str) -> str:
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return ""


def _wait_until(done: Callable[[], bool], worker: subprocess.Popen[Any], log: Path,
                bound: float, what: str) -> None:
    """Poll done() until true; fail if the worker dies or ``bound`` seconds pass."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:  # bounded in time
        if done():
            return
        if worker.poll() is not None:
            raise BenchError(f"{what}: the worker exited {worker.returncode} before all "
                             f"tasks were done:\n{tail(log)}")
        time.sleep(POLL)
    raise BenchError(f"{what}: not done in {bound:.0f} s; stopped\n{tail(log)}")


def _self(*args: str) -> list[str]:
    """argv running this file's hidden worker entry points."""
    return [sys.executable, str(Path(__file__).resolve()), *args]


# --- Redis ----------------------------------------------------------------------------------

class Redis:
    """A throw-away redis-server on 127.0.0.1 (started on first use, stopped by close())."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[Any] | None = None
        self.url = ""
        self.why_not = ""

    def start(self) -> str:
        if self.url:
            return self.url
        if self.why_not:
            raise Unavailable(self.why_not)
        try:
            self.url = self._start()
        except Unavailable as exc:
            self.why_not = str(exc)
            raise
        return self.url

    def _start(self) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise Unavailable("redis-server is not installed (apt-get install redis-server)")
        _import("redis")
        port = free_port()
        log = self.root / "redis.log"
        self.proc = spawn([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                           str(self.root), "--save", "", "--appendonly", "no",
                           "--logfile", str(log), "--daemonize", "no"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, self.proc, log, 30, "redis-server")
        except BenchError as exc:
            raise Unavailable(f"redis-server does not start: {exc}") from exc
        return f"redis://127.0.0.1:{port}"

    def client(self, db: int = 0) -> Any:
        redis = _import("redis")
        return redis.Redis.from_url(f"{self.start()}/{db}")

    def version(self) -> str:
        exe = shutil.which("redis-server")
        return version_of([exe, "--version"]).split(" sha=")[0] if exe else ""

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)


# --- Celery ---------------------------------------------------------------------------------

def celery_app(url: str) -> Any:
    celery = _import("celery")
    app = celery.Celery(QUEUE, broker=f"{url}/0", backend=f"{url}/1")
    app.conf.update(task_serializer="json", result_serializer="json",
                    accept_content=["json"], broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False)
    return app


def celery_worker(url: str, slots: int) -> int:
    """The worker process (``peers.py _celery_worker URL W``): prefork pool of W."""
    app = celery_app(url)

    @app.task(name=f"{QUEUE}.true")  # type: ignore[untyped-decorator]
    def true_task() -> int:
        return subprocess.run(["true"], check=False).returncode

    app.worker_main(["worker", "--pool", "prefork", "--concurrency", str(slots),
                     "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                     "--without-heartbeat"])
    return 0


def time_celery(redis: Redis, root: Path, tasks: int, slots: int) -> Timing:
    url = redis.start()
    app = celery_app(url)
    broker, results = redis.client(0), redis.client(1)
    broker.flushall()
    start = time.perf_counter()
    for _ in range(tasks):
        app.send_task(f"{QUEUE}.true")
    enqueue = time.perf_counter() - start
    log = root / "celery.log"
    with stopping([]) as procs, log.open("w") as out:
        start = time.perf_counter()
        procs.append(spawn(_self("_celery_worker", url, str(slots)), env=scrubbed_env(),
                           stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
        _wait_until(lambda: int(results.dbsize()) >= tasks, procs[0], log,
                    bound_for(tasks), "celery")
        seconds = time.perf_counter() - start
    keys = list(results.scan_iter(match="celery-task-meta-*", count=1000))
    metas = [json.loads(v) for i in range(0, len(keys), 1000)
             for v in results.mget(keys[i:i + 1000])]
    ok = sum(1 for m in metas if m["status"] == "SUCCESS" and m["result"] == 0)
    if ok != tasks:
        raise BenchError(f"celery: {ok} of {tasks} tasks succeeded")
    app.close()
    return Timing(seconds, enqueue)


# --- RQ -------------------------------------------------------------------------------------

def time_rq(redis: Redis, root: Path, tasks: int, slots: int) -> Timing:
    rq = _import("rq")
    exe = BIN / "rq"
    if not exe.exists():
        raise Unavailable(f"{exe} is missing ({PIP_HINT})")
    conn = redis.client(0)
    conn.flushall()
    queue = rq.Queue(QUEUE, connection=conn)
    start = time.perf_counter()
    for i in range(0, tasks, 1000):
        queue.enqueue_many([rq.Queue.prepare_data("subprocess.run", (["true"],))
                            for _ in range(min(1000, tasks - i))])
    enqueue = time.perf_counter() - start
    logs = [root / f"rq{i}.log" for i in range(slots)]
    with stopping([]) as procs:
        start = time.perf_counter()
        for log in logs:
            with log.open("w") as out:
                procs.append(spawn([str(exe), "worker", "--burst", "--quiet", "--url",
                                    redis.start(), QUEUE], env=scrubbed_env(),
                                   stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT))
        deadline = start + bound_for(tasks)
        for proc, log in zip(procs, logs, strict=True):
            try:
                proc.wait(max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                raise BenchError(f"rq: not done in {bound_for(tasks):.0f} s; stopped") from None
            if proc.returncode != 0:
                raise BenchError(f"rq worker exited {proc.returncode}:\n{tail(log)}")
        seconds = time.perf_counter() - start
    finished, failed = queue.finished_job_registry.count, queue.failed_job_registry.count
    if finished != tasks or failed:
        raise BenchError(f"rq: {finished} of {tasks} jobs finished, {failed} failed")
    return Timing(seconds, enqueue)


# --- huey -----------------------------------------------------------------------------------

def huey_app(db: Path) -> tuple[Any, Any]:
    """A SqliteHuey on ``db`` and its one task, named alike in the producer and the consumer."""
    huey = _import("huey")

    def true_task() -> int:
        return subprocess.run(["true"], check=False).returncode

    true_task.__module__ = QUEUE  # huey names a task by module and function
    app = huey.SqliteHuey(QUEUE, filename=str(db))
    return app, app.task(name="true")(true_task)


def huey_consumer(db: str, slots: int) -> int:
    """The consumer process (``peers.py _huey_consumer DB W``): W worker threads."""
    app, _ = huey_app(Path(db))
    app.create_consumer(workers=slots, worker_type="thread").run()
    return 0


def time_huey(root: Path, tasks: int, slots: int) -> Timing:
    db = root / f"huey-{time.monotonic_ns()}.db"
    app, true_task = huey_app(db)
    start = time.perf_counter()
    for _ in range(tasks):
        true_task()
    enqueue = time.perf_counter() - start
    log = root / "huey.log"
    with stopping([]) as procs, log.open("w") as out:
        start = time.perf_counter()
        procs.append(spawn(_self("_huey_consumer", str(db), str(slots)), env=scrubbed_env(),
                           stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
        _wait_until(lambda: int(app.result_count()) >= tasks, procs[0], log,
                    bound_for(tasks), "huey")
        seconds = time.perf_counter() - start
    values = [app.serializer.deserialize(v) for v in app.all_results().values()]
    ok = sum(1 for v in values if v == 0)
    if ok != tasks:
        raise BenchError(f"huey: {ok} of {tasks} tasks succeeded")
    app.storage.close()
    return Timing(seconds, enqueue)


# --- the benchmark ------------------------------------------------------------------------

def peers(root: Path, redis: Redis, slots: int) -> list[Peer]:
    """Every contender; measure(tasks, W) raises Unavailable when it cannot run here."""
    durable_redis = "no: Redis in memory (--save '')"

    def ecloud(n: int, w: int) -> Timing:
        got = time_ecloud(n, w, 1)
        return Timing(got.seconds, got.setup_seconds)

    return [
        Peer("ecloud", f"1 worker x {slots} slots, boss serve",
             "yes: SQLite WAL, a commit per transition (synchronous=NORMAL)", ecloud,
             _dist_version("ecloud")),
        Peer("parallel", f"parallel -j{slots} true ::: ...", "no state",
             lambda n, w: Timing(time_parallel(n, w))),
        Peer("xargs", f"xargs -P {slots} -n1 true", "no state",
             lambda n, w: Timing(time_xargs(n, w))),
        Peer("celery", f"1 worker, prefork pool of {slots}; Redis broker + results",
             durable_redis, lambda n, w: time_celery(redis, root, n, w),
             _dist_version("celery")),
        Peer("rq", f"{slots} x rq worker --burst (fork per job)", durable_redis,
             lambda n, w: time_rq(redis, root, n, w), _dist_version("rq")),
        Peer("huey", f"SqliteHuey, 1 consumer x {slots} threads",
             "yes: SQLite WAL, synchronous=FULL (huey's default)",
             lambda n, w: time_huey(root, n, w), _dist_version("huey")),
    ]


def measure(tasks: int, slots: int, repeat: int, chosen: list[str]) -> Report:
    with tempfile.TemporaryDirectory(prefix="ecloud-peers-") as tmp:
        root = Path(tmp)
        redis = Redis(root)
        try:
            table = [p for p in peers(root, redis, slots) if p.name in chosen]
            for rep in range(repeat):
                for p in table:
                    if p.why_not:
                        continue
                    try:
                        got = p.measure(tasks, slots)
                    except Unavailable as exc:
                        p.why_not = f"not available: {exc}"
                        print(f"peers: {p.name}: {p.why_not}", file=sys.stderr)
                        continue
                    except BenchError as exc:
                        p.why_not = f"failed: {exc}"
                        print(f"peers: {p.name}: {p.why_not}", file=sys.stderr)
                        continue
                    p.seconds.append(got.seconds)
                    if got.enqueue_seconds is not None:
                        p.enqueue.append(got.enqueue_seconds)
                    print(f"peers: run {rep + 1}/{repeat} {p.name}: {got.seconds:.2f} s "
                          f"({tasks / got.seconds:,.0f} tasks/s)", file=sys.stderr, flush=True)
            versions = {"parallel": _parallel_version(), "xargs": version_of(["xargs",
                                                                              "--version"])}
            redis_version = redis.version()
        finally:
            redis.close()
    return report(tasks, slots, repeat, table, versions, redis_version)


def _parallel_version() -> str:
    try:
        return version_of([gnu_parallel(), "--version"])
    except Unavailable:
        return ""


def report(tasks: int, slots: int, repeat: int, table: list[Peer], versions: dict[str, str],
           redis_version: str) -> Report:
    base = next((p.seconds for p in table if p.name == "parallel"), [])
    rows: list[dict[str, Cell]] = []
    for p in table:
        version = p.version or versions.get(p.name, "")
        if p.name in ("celery", "rq") and redis_version:
            version += f", {redis_version}"
        row: dict[str, Cell] = {"peer": p.name, "version": version, "how": p.how,
                                "durable": p.durable, "runs": len(p.seconds)}
        if p.seconds and not p.why_not:
            med = statistics.median(p.seconds)
            pairs = list(zip(p.seconds, base, strict=False))
            row.update({"median s": med, "min s": min(p.seconds), "max s": max(p.seconds),
                        "tasks/s": round(tasks / med),
                        "vs parallel": statistics.median(b / s for s, b in pairs)
                        if pairs else None,
                        "enqueue s": statistics.median(p.enqueue) if p.enqueue else None})
        else:
            row["status"] = p.why_not or "not run"
        rows.append(row)
    columns = ["peer", "version", "how", "durable", "runs", "median s", "min s", "max s",
               "tasks/s", "vs parallel", "enqueue s", "status"]
    notes = [
        "vs parallel: the peer's throughput over GNU parallel's (parallel's seconds / the "
        "peer's, per run, median); above 1 is faster.",
        "median s: from starting the workers to every task done (parallel, xargs: the whole "
        "command). enqueue s: filling the queue before that (ecloud: boss init + push + "
        "add-worker), not in median s.",
    ]
    return Report(title=f"peers: {tasks:,} no-op shell tasks (`true`), concurrency {slots}, "
                        f"{repeat} run(s) each",
                  columns=[c for c in columns if any(c in r for r in rows)],
                  rows=rows, notes=notes)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10_000, help="N (default 10,000)")
    ap.add_argument("--slots", type=int, default=2, help="W: concurrency of each (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS),
                    help="which to run (default all)")
    return ap


def run(argv: list[str]) -> Report:
    args = parser().parse_args(argv)
    if args.tasks < 1 or args.slots < 1 or args.repeat < 1:
        raise SystemExit("peers: --tasks, --slots and --repeat must be >= 1")
    result = measure(args.tasks, args.slots, args.repeat, args.peers)
    if any(str(r.get("status", "")).startswith("failed") for r in result["rows"]):
        print_report(result, sys.stderr)
        raise SystemExit("peers: a peer failed (see the table above)")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # hidden entry points: the worker processes this benchmark starts
    if argv[:1] == ["_celery_worker"] and len(argv) == 3:
        return celery_worker(argv[1], int(argv[2]))
    if argv[:1] == ["_huey_consumer"] and len(argv) == 3:
        return huey_consumer(argv[1], int(argv[2]))
    print_report(run(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
