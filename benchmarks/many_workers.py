"""Benchmark 5: many simulated workers connected to one boss for a while.

A real ``boss serve`` subprocess on a fresh database (SQLite, or PostgreSQL
with ``--postgres``); K registered workers (``Boss.add_worker``: a row and a
token each), each with its own TCP connection to the boss on 127.0.0.1 and
its own ``hello``, all held open for ``--seconds``. Every worker heartbeats
at the interval the boss's hello answer gives (the real one: [worker]
heartbeat_seconds, 1 s by default), naming the attempt it holds, as ``worker
run`` does; a fraction (``--active``) also pops one task at a time, holds it
``--task-seconds`` (nothing runs) and completes it, polling at the real
``poll_seconds`` when there is none. The simulated workers are asyncio tasks
in ``--procs`` generator processes.

Counted: error replies, broken connections and calls unanswered in 30 s
(each must be 0), heartbeats answered later than one interval, and at the
end the tasks' states (every completed task ``succeeded`` once; no attempt
``lost``, which a late heartbeat would cause). Sampled every second from
/proc: the boss's RSS (VmRSS; the peak reported, and VmHWM), its open fds
and its threads. Goal (issue 6): 1,000 workers for 60 s, no error, boss RSS
<= 300 MB.

    .venv/bin/python benchmarks/run.py many_workers                    # 1,000 workers, 60 s
    .venv/bin/python benchmarks/run.py many_workers -- --postgres
    .venv/bin/python benchmarks/many_workers.py --workers 200 --seconds 20
    .venv/bin/python benchmarks/many_workers.py --boss-nofile 1024:524288  # a common default

The generator raises its own RLIMIT_NOFILE (it holds K sockets); the boss
inherits the limit ``boss serve`` is started with (the generator's, or
``--boss-nofile``'s), which the table shows.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

# a script, not a package module: make the repository importable (boss, benchmarks.run)
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.rpc_capacity import (  # noqa: E402
    BenchError,
    BossServe,
    database,
    pct,
    raise_nofile,
    split,
)
from benchmarks.run import Cell, Report, print_report  # noqa: E402
from benchmarks.shell_tasks import tail  # noqa: E402
from benchmarks.sim_rpc import CallFailed, Rpc, succeeded  # noqa: E402

NAME = "many_workers"
TINY_ARGS = ["--workers", "50", "--seconds", "3"]

GOAL_RSS_MB = 300.0
JOINING = 50  # connections saying hello at once, per generator process
TIMEOUT = 30.0  # a call unanswered this long counts as a timeout (the lease is 60 s)


@dataclass
class Counts:
    """What one generator process saw."""

    connected: int = 0
    hello_seconds: float = 0.0
    heartbeats: int = 0
    late_heartbeats: int = 0  # answered after more than one interval
    heartbeat_ms: list[float] = field(default_factory=list)
    adopt_known: int = 0
    adopt_unknown: int = 0
    pops: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count
    first_errors: list[str] = field(default_factory=list)

    def failed(self, exc: CallFailed) -> None:
        self.errors[exc.kind] = self.errors.get(exc.kind, 0) + 1
        if len(self.first_errors) < 5:
            self.first_errors.append(str(exc))


class SimWorker:
    """One connection: heartbeats always; pops, holds and completes when active."""

    def __init__(self, rpc: Rpc, active: bool, task_seconds: float, c: Counts) -> None:
        self.rpc = rpc
        self.active = active
        self.task_seconds = task_seconds
        self.c = c
        self.holding: list[int] = []
        self.done: set[int] = set()
        self.interval = 1.0
        self.poll = 1.0

    async def heartbeats(self, until: float) -> None:
        # workers start at different moments: spread the first beat over an interval
        await asyncio.sleep(random.uniform(0, self.interval))
        while time.monotonic() < until:
            try:
                r, ms = await self.rpc.call("heartbeat", {"attempts": list(self.holding)},
                                            timeout=TIMEOUT)
            except CallFailed as exc:
                self.c.failed(exc)
                if exc.kind == "connection":
                    return
                continue
            self.c.heartbeats += 1
            self.c.heartbeat_ms.append(ms)
            # attempts the boss offers back as claimed-but-unheard (the "adopt" answer);
            # those this worker holds or has reported were heard: the offer is spurious
            for a in r.get("adopt") or []:
                known = a.get("attempt_id") in self.holding or a.get("attempt_id") in self.done
                self.c.adopt_known += known
                self.c.adopt_unknown += not known
            if ms > self.interval * 1000:
                self.c.late_heartbeats += 1
            await asyncio.sleep(max(0.0, self.interval - ms / 1000))

    async def work(self, until: float) -> None:
        if not self.active:
            return
        await asyncio.sleep(random.uniform(0, self.task_seconds))
        while time.monotonic() < until:
            try:
                r, _ = await self.rpc.call("pop", {"n": 1}, timeout=TIMEOUT)
                self.c.pops += 1
                if r.get("drain"):
                    return
                tasks = r.get("tasks") or []
                if not tasks:
                    await asyncio.sleep(float(r.get("retry_after", self.poll)))
                    continue
                self.holding = [int(t["attempt_id"]) for t in tasks]
                await asyncio.sleep(self.task_seconds)  # "running": nothing happens
                for a in self.holding:
                    await self.rpc.call("complete", succeeded(a), timeout=TIMEOUT)
                    self.c.completed += 1
                    self.done.add(a)
                self.holding = []
            except CallFailed as exc:
                self.c.failed(exc)
                if exc.kind == "connection":
                    return


async def _hold(port: int, tokens: list[tuple[str, bool]], seconds: float,
                task_seconds: float, go: MpEvent, ready: Any) -> Counts:
    c = Counts()
    start = time.monotonic()

    async def join(token: str, active: bool) -> SimWorker | None:
        try:
            rpc = await Rpc.connect(port)
        except OSError as exc:
            c.failed(CallFailed("connection", str(exc)))
            return None
        try:
            welcome = await rpc.hello(token)
        except CallFailed as exc:
            c.failed(exc)
            await rpc.close(goodbye=False)
            return None
        sim = SimWorker(rpc, active, task_seconds, c)
        sim.interval = float(welcome["heartbeat_seconds"])
        return sim

    sims: list[SimWorker] = []
    for i in range(0, len(tokens), JOINING):  # workers join side by side, as on a fleet
        got = await asyncio.gather(*(join(t, a) for t, a in tokens[i:i + JOINING]))
        sims += [s for s in got if s is not None]
    c.connected = len(sims)
    c.hello_seconds = time.monotonic() - start
    ready.put("ready")
    await asyncio.get_running_loop().run_in_executor(None, go.wait, 300)
    until = time.monotonic() + seconds
    await asyncio.gather(*(s.heartbeats(until) for s in sims),
                         *(s.work(until) for s in sims))
    for s in sims:
        await s.rpc.close()
    return c


def _generator(port: int, tokens: list[tuple[str, bool]], seconds: float,
               task_seconds: float, nofile: int, go: MpEvent, ready: Any, out: Any) -> None:
    try:
        raise_nofile(nofile)
        out.put(asyncio.run(_hold(port, tokens, seconds, task_seconds, go, ready)))
    except BaseException as exc:
        ready.put(f"failed: {type(exc).__name__}: {exc}")
        c = Counts()
        c.failed(CallFailed("generator", f"{type(exc).__name__}: {exc}"))
        out.put(c)


@dataclass
class Samples:
    rss_kb: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)


def check_tasks(db_url: str, completed: int) -> tuple[dict[str, int], str]:
    """The tasks by state, and what is wrong: an attempt lost, a completion missing..."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            attempts: dict[str, int] = dict(conn.execute(
                text("SELECT state, count(*) FROM attempts GROUP BY state")).all())
            tasks: dict[str, int] = dict(conn.execute(
                text("SELECT state, count(*) FROM tasks GROUP BY state")).all())
            most = conn.execute(text(
                "SELECT coalesce(max(c), 0) FROM (SELECT count(*) AS c FROM attempts "
                "GROUP BY task_id) AS per_task")).scalar_one()
    finally:
        engine.dispose()
    if (attempts.get("lost", 0) or tasks.get("succeeded", 0) != completed
            or set(attempts) - {"succeeded"} or most > 1):
        return tasks, (f"WRONG: {completed} completions, tasks by state {tasks}, "
                       f"attempts by state {attempts}, at most {most} attempts a task")
    return tasks, ""


ROUTINE = (" joined from ", " said goodbye", " disconnected", "boss serving workers")


def unusual(log: Path, lines: int = 30) -> str:
    """The boss's log without the routine lines of workers coming and going: its end."""
    text = log.read_text(errors="replace").splitlines()
    kept = [line for line in text if not any(r in line for r in ROUTINE)]
    return "\n".join(kept[-lines:]) or "(nothing but workers joining and leaving)"


def hold(args: argparse.Namespace, root: Path, db_url: str) -> dict[str, Any]:
    k = args.workers
    active = max(0, round(k * args.active))
    tasks = args.tasks if args.tasks is not None else int(
        active * (args.seconds / args.task_seconds + 2)) + 10
    boss = BossServe(root, db_url, poll=args.poll)
    t0 = time.monotonic()
    tokens = boss.prepare(tasks, k)
    prepare_s = time.monotonic() - t0
    flags = [(t, i < active) for i, t in enumerate(tokens)]
    random.Random(1).shuffle(flags)
    ctx = multiprocessing.get_context("fork")
    go, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
    nofile = k + 256
    children = [ctx.Process(target=_generator, args=(boss.port, part, args.seconds,
                                                       args.task_seconds, nofile, go, ready,
                                                       out), daemon=True)
                for part in split(flags, args.procs)]
    s = Samples()
    cpu = 0.0
    try:
        boss.start(args.boss_nofile)
        limit = boss.nofile_limit()
        for c in children:
            c.start()
        for _ in children:  # every worker connected and said hello
            said = ready.get(timeout=300)
            if said != "ready":
                raise BenchError(f"a generator {said}")
        idle = boss.status()
        spy = boss.profile(args.py_spy, args.seconds) if args.py_spy else None
        cpu0 = boss.cpu_seconds()
        go.set()
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline + 1:  # bounded: --seconds and one more
            if not boss.alive():
                raise BenchError(f"boss serve exited {boss.proc.returncode if boss.proc else '?'}")
            st = boss.status()
            s.rss_kb.append(st["VmRSS"])
            s.fds.append(st["fds"])
            s.threads.append(st["Threads"])
            time.sleep(1.0)
        counts = [out.get(timeout=args.seconds + 120) for _ in children]
        cpu = boss.cpu_seconds() - cpu0
        last = boss.status()
        if spy is not None:
            spy.wait(60)
    except Exception as exc:
        raise BenchError(f"many_workers failed: {exc}\n{tail(boss.log)}") from exc
    finally:
        go.set()
        for c in children:
            if c.pid is None:  # interrupted before it started
                continue
            c.join(60)
            if c.is_alive():
                c.kill()
        boss.stop()
    total = Counts()
    for c in counts:
        total.connected += c.connected
        total.hello_seconds = max(total.hello_seconds, c.hello_seconds)
        total.heartbeats += c.heartbeats
        total.late_heartbeats += c.late_heartbeats
        total.heartbeat_ms += c.heartbeat_ms
        total.pops += c.pops
        total.adopt_known += c.adopt_known
        total.adopt_unknown += c.adopt_unknown
        total.completed += c.completed
        for kind, n in c.errors.items():
            total.errors[kind] = total.errors.get(kind, 0) + n
        total.first_errors += c.first_errors
    states, wrong = check_tasks(db_url, total.completed)
    return {"wrong": wrong, "workers": k, "active": active, "tasks": tasks, "prepare_s": prepare_s,
            "limit": limit, "idle": idle, "last": last, "samples": s, "cpu": cpu,
            "total": total, "states": states, "log": unusual(boss.log)}


def measure(args: argparse.Namespace) -> Report:
    from benchmarks.push_1m import start_postgres

    soft = raise_nofile(args.workers + 256)
    tmp = Path(tempfile.mkdtemp(prefix="ecloud-many-bench-"))
    server: Any = None
    engine = "postgresql" if args.postgres else "sqlite"
    load = os.getloadavg()
    try:
        if args.postgres:
            _, server = start_postgres(tmp)
        root = tmp / "run"
        root.mkdir()
        with database(server, tmp, "many") as url:
            r = hold(args, root, url)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    t: Counts = r["total"]
    s: Samples = r["samples"]
    errors = sum(t.errors.values())
    rss_max = max(s.rss_kb) / 1024 if s.rss_kb else 0.0
    ok = errors == 0 and t.connected == args.workers and not r["wrong"]
    verdict = "met" if ok and rss_max <= GOAL_RSS_MB else "missed"
    row: dict[str, Cell] = {
        "engine": engine, "workers": f"{t.connected:,} of {args.workers:,}",
        "active": r["active"], "seconds": args.seconds,
        "errors": errors, "timeouts": t.errors.get("timeout", 0),
        "heartbeats": t.heartbeats,
        "heartbeat p50 ms": pct(t.heartbeat_ms, 0.5),
        "heartbeat p99 ms": pct(t.heartbeat_ms, 0.99),
        "late heartbeats": t.late_heartbeats,
        "tasks done": t.completed,
        "boss RSS max MB": rss_max,
        "boss RSS idle MB": r["idle"]["VmRSS"] / 1024,
        "boss fds max": max(s.fds) if s.fds else None,
        "boss threads max": max(s.threads) if s.threads else None,
        "boss CPU %": 100 * r["cpu"] / args.seconds,
        "load 1m": f"{load[0]:.2f}",
    }
    notes = [
        f"Goal: {args.workers:,} workers for {args.seconds:g} s, no error, boss RSS <= "
        f"{GOAL_RSS_MB:.0f} MB: {verdict}.",
        f"Set-up: {r['tasks']:,} tasks pushed and {args.workers:,} workers registered in "
        f"{r['prepare_s']:.1f} s; every connection's hello took {t.hello_seconds:.1f} s "
        f"(connected with the boss at {r['idle']['VmRSS'] / 1024:.0f} MB, "
        f"{r['idle']['fds']} fds). Boss fd limit (soft/hard) {r['limit']}; the generator's "
        f"soft limit {soft}. Boss VmHWM at the end {r['last']['VmHWM'] / 1024:.0f} MB.",
        r["wrong"] or f"Tasks at the end: {r['states']}; no attempt lost.",
        "Heartbeat answers offering "
        f"to adopt an attempt: {t.adopt_known} the worker held or had reported, "
        f"{t.adopt_unknown} it did not know.",
    ]
    if errors:
        notes.append(f"Errors by kind {t.errors}; first: {t.first_errors}")
    if not ok:
        row["status"] = "failed: errors, workers not connected or tasks wrong (see below)"
        notes.append("The boss's log ends:\n" + r["log"])
    return {"title": f"Many workers on one boss ({engine}, `boss serve` subprocess)",
            "columns": list(row), "rows": [row], "notes": notes}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="many_workers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1000, help="K connections (default 1,000)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long (default 60)")
    ap.add_argument("--active", type=float, default=0.1,
                    help="fraction of the workers that pop and complete (default 0.1)")
    ap.add_argument("--task-seconds", type=float, default=2.0,
                    help="how long an active worker holds a task (default 2)")
    ap.add_argument("--poll", type=float, default=1.0,
                    help="[worker] poll_seconds: the retry after an empty pop (default 1)")
    ap.add_argument("--tasks", type=int, help="tasks pushed (default: enough for the run)")
    ap.add_argument("--procs", type=int, default=2, help="generator processes (default 2)")
    ap.add_argument("--boss-nofile", metavar="SOFT[:HARD]",
                    help="start the boss with this fd limit (prlimit), e.g. 1024:524288, a "
                         "common login default; default: the generator's, inherited")
    ap.add_argument("--py-spy", type=Path, metavar="FILE",
                    help="profile the boss with py-spy while the workers are held "
                         "(collapsed stacks)")
    ap.add_argument("--postgres", action="store_true",
                    help="a temporary PostgreSQL server (tests/pg.py) instead of SQLite")
    return ap


def run(argv: list[str]) -> Report:
    args = parser().parse_args(argv)
    if min(args.workers, args.procs) < 1 or args.seconds <= 0 or not 0 <= args.active <= 1:
        raise SystemExit("many_workers: --workers and --procs >= 1, --seconds > 0, "
                         "0 <= --active <= 1")
    report = measure(args)
    if any(row.get("status") for row in report["rows"]):
        print_report(report, sys.stderr)
        raise SystemExit("many_workers: the run failed (see the table above)")
    return report


def main(argv: list[str] | None = None) -> int:
    print_report(run(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
