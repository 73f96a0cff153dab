"""Benchmark 3: the boss's RPC capacity, loaded by simulated workers.

A real ``boss serve`` subprocess (its CPU apart from the load generator's, its
memory measurable in /proc) on a fresh SQLite or PostgreSQL database holding N
tasks; K registered workers (``Boss.add_worker``: a worker row and a token
each, as ``boss admin add-worker`` makes them), each with its own TCP
connection to the boss on 127.0.0.1 speaking :mod:`protocol.messages` (hello
with its token, then calls). The simulated workers pop and complete without
running anything: this is a load generator, not a test double. They run as
asyncio tasks in ``--procs`` generator processes (multiprocessing), so that one
Python process does not cap the load.

Modes, each draining the whole queue:

- ``single``: ``pop n=1``, then ``complete`` it: two calls per task ("one task
  per call").
- ``chained``: ``complete`` carrying ``pop: 1`` (what ``worker run`` does): the
  result and the next task in one call and one transaction.
- ``batch``: ``pop n=B`` (default 50), then one ``complete`` carrying the B
  results (the batched form, as ``worker run`` reports the results its slots
  finished together): two calls per B tasks.
- ``pipelined`` (not run unless asked for): ``pop n=B``, then B single
  ``complete`` calls sent at once on the connection (the server answers up to
  64 requests of a connection side by side and its group commit puts them in
  one transaction).

Reported: tasks/s (clock from "go" to the last worker out, the median of
``--repeat`` runs, a fresh database and boss each), the latency of every pop
and complete call (send to reply) p50 / p99, the dispatch overhead per task
(single: pop + complete; chained: the complete; batch: (pop + complete) / B;
pipelined: (pop + the B completes) / B), the boss's CPU per task and its peak
RSS. At the end of each run every task must be ``succeeded`` with exactly one
attempt, ``succeeded``, and no call may have failed.

    .venv/bin/python benchmarks/run.py rpc_capacity                    # SQLite, 10,000 tasks
    .venv/bin/python benchmarks/run.py rpc_capacity -- --postgres      # a temporary PostgreSQL
    .venv/bin/python benchmarks/rpc_capacity.py --tasks 5000 --workers 1 16 --modes single

Goals (issue 6): SQLite >= 3,000 tasks/s one task per call, >= 20,000 batched;
PostgreSQL >= 2,500 / >= 15,000; dispatch overhead per task p50 <= 0.5 ms,
p99 <= 3 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, TypeVar

# a script, not a package module: make the repository importable (boss, benchmarks.run)
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import Cell, Report, print_report  # noqa: E402
from benchmarks.shell_tasks import (  # noqa: E402
    BIN,
    cpu_of,
    scrubbed_env,
    spawn,
    stop,
    tail,
    wait_listening,
)
from benchmarks.sim_rpc import CallFailed, Rpc, succeeded  # noqa: E402
from tests.ports import free_port  # noqa: E402

NAME = "rpc_capacity"
TINY_ARGS = ["--tasks", "120", "--workers", "3", "--modes", "single", "batch",
             "--batch", "10", "--repeat", "1"]
REPEATS = True

MODES = ("single", "chained", "batch", "pipelined")
BATCHED = ("batch", "pipelined")
GOALS = {  # tasks/s: (one task per call, batched)
    "sqlite": (3000.0, 20000.0),
    "postgresql": (2500.0, 15000.0),
}
GOAL_P50_MS = 0.5
GOAL_P99_MS = 3.0
T = TypeVar("T")


class BenchError(Exception):
    """A run failed: a call was refused, a task is not done exactly once, a bound ran out."""


# --- the boss under test --------------------------------------------------------------------

class BossServe:
    """A ``boss serve`` subprocess and what /proc says about it."""

    def __init__(self, root: Path, db_url: str, *, lease: float = 60.0,
                 heartbeat: float = 1.0, poll: float = 0.05) -> None:
        self.root = root
        self.port = free_port()
        self.toml = root / "ecloud.toml"
        self.toml.write_text(
            f'[boss]\nlisten = "127.0.0.1:{self.port}"\ndatabase_url = "{db_url}"\n'
            f"lease_seconds = {lease}\n"
            f"[worker]\nheartbeat_seconds = {heartbeat}\npoll_seconds = {poll}\n"
            f'workdir = "{root / "work"}"\ncache_dir = "{root / "cache"}"\n'
            f'[datastore]\ndefault = "file://{root / "data"}"\n')
        self.log = root / "serve.log"
        self.proc: subprocess.Popen[Any] | None = None

    def settings(self) -> Any:
        from protocol.settings import load_settings

        return load_settings(str(self.toml), environ={}, cwd=self.root)

    def prepare(self, tasks: int, workers: int, slots: int = 1) -> list[str]:
        """Migrate, push ``tasks`` no-op tasks, register ``workers``; their tokens."""
        from boss.service import Boss

        src = self.root / "tasks.jsonl"
        with src.open("w") as f:
            for i in range(tasks):
                f.write(f'{{"name":"r{i}","commands":[{{"command":["true"]}}]}}\n')
        boss = Boss(self.settings())
        try:
            boss.init()
            if tasks:
                boss.push(src)
            return [boss.add_worker(name=f"sim-{i}", slots=slots)[2] for i in range(workers)]
        finally:
            boss.close()

    def start(self, nofile: str | None = None) -> None:
        env = scrubbed_env(ECLOUD_SETTINGS=str(self.toml))
        argv = [str(BIN / "boss"), "serve", "--no-autoscale"]
        if nofile is not None:  # the boss's own fd limit, as on a machine with that default
            argv = ["prlimit", f"--nofile={nofile}", "--", *argv]  # SOFT or SOFT:HARD
        with self.log.open("w") as out:
            self.proc = spawn(argv, cwd=self.root, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc, self.log, 60, "boss serve")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def profile(self, out: Path, seconds: float) -> subprocess.Popen[Any]:
        """py-spy samples the boss (its threads, idle ones too) into ``out`` (collapsed
        stacks: ``py-spy record --format raw``) for ``seconds``, without pausing it."""
        out.parent.mkdir(parents=True, exist_ok=True)  # py-spy writes nothing into a missing one
        return subprocess.Popen(
            [str(BIN / "py-spy"), "record", "--pid", str(self.pid), "--format", "raw",
             "--idle", "--threads", "--nonblocking", "--rate", "200",
             "--duration", str(max(1, round(seconds))), "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """user + system CPU of the boss so far."""
        return cpu_of(self.pid)

    def status(self) -> dict[str, int]:
        """VmRSS and VmHWM (kB), Threads; and the open fds."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(value.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{self.pid}/fd"))
        return out

    def nofile_limit(self) -> str:
        with open(f"/proc/{self.pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    return f"{soft}/{hard}"
        return "?"


def raise_nofile(want: int) -> int:
    """Raise this process's soft fd limit towards ``want`` (up to the hard one); the soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def check_done_once(db_url: str, n: int) -> None:
    """Every task succeeded, each with exactly one attempt, which succeeded."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            tasks: dict[str, int] = dict(conn.execute(
                text("SELECT state, count(*) FROM tasks GROUP BY state")).all())
            attempts: dict[str, int] = dict(conn.execute(
                text("SELECT state, count(*) FROM attempts GROUP BY state")).all())
            most = conn.execute(text(
                "SELECT coalesce(max(c), 0) FROM (SELECT count(*) AS c FROM attempts "
                "GROUP BY task_id) AS per_task")).scalar_one()
    finally:
        engine.dispose()
    if tasks != {"succeeded": n} or attempts != {"succeeded": n} or (n and most != 1):
        raise BenchError(f"WRONG: tasks by state {tasks}, attempts by state {attempts}, "
                         f"at most {most} attempts for one task; {n} tasks pushed")


# --- the load generator ---------------------------------------------------------------------

@dataclass
class Stats:
    """What one generator process measured."""

    tasks: int = 0
    pop_ms: list[float] = field(default_factory=list)
    complete_ms: list[float] = field(default_factory=list)
    per_task_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    end: float = 0.0
    cpu: float = 0.0  # the process's own CPU seconds from "go" to the last worker out


async def drain(rpc: Rpc, mode: str, batch: int, st: Stats) -> None:
    """Pop and complete until the boss says drain (nothing left for anyone)."""
    n = batch if mode in BATCHED else 1
    while True:
        r, pop_ms = await rpc.call("pop", {"n": n})
        st.pop_ms.append(pop_ms)
        if r.get("drain"):
            return
        tasks = r.get("tasks") or []
        if not tasks:  # the others hold the last tasks: ask again as a worker would
            await asyncio.sleep(float(r.get("retry_after", 0.05)))
            continue
        if mode == "single":
            (t,) = tasks
            _, ms = await rpc.call("complete", succeeded(t["attempt_id"]))
            st.complete_ms.append(ms)
            st.per_task_ms.append(pop_ms + ms)
            st.tasks += 1
        elif mode == "chained":
            st.per_task_ms.append(pop_ms)  # the first task of a chain came by pop
            while tasks:
                r, ms = await rpc.call("complete", {**succeeded(tasks[0]["attempt_id"]),
                                                    "pop": 1})
                st.complete_ms.append(ms)
                st.tasks += 1
                tasks = r.get("tasks") or []
                if tasks:
                    st.per_task_ms.append(ms)
                if r.get("drain"):
                    return
        elif mode == "pipelined":
            start = time.perf_counter()
            got = await asyncio.gather(*(rpc.call("complete", succeeded(t["attempt_id"]))
                                         for t in tasks))
            wall = (time.perf_counter() - start) * 1000
            st.complete_ms.extend(ms for _, ms in got)
            st.per_task_ms.extend([(pop_ms + wall) / len(tasks)] * len(tasks))
            st.tasks += len(tasks)
        else:
            r, ms = await rpc.call("complete", {
                "results": [succeeded(t["attempt_id"]) for t in tasks]})
            if sum(1 for x in r["results"] if x.get("accepted")) != len(tasks):
                raise CallFailed("error", f"complete: results refused: {r['results']}")
            st.complete_ms.append(ms)
            st.per_task_ms.extend([(pop_ms + ms) / len(tasks)] * len(tasks))
            st.tasks += len(tasks)


async def _generate(port: int, tokens: list[str], mode: str, batch: int, go: MpEvent,
                    ready: Any) -> Stats:
    st = Stats()
    conns = [await Rpc.connect(port) for _ in tokens]
    for rpc, token in zip(conns, tokens, strict=True):
        await rpc.hello(token)
    ready.put("ready")
    await asyncio.get_running_loop().run_in_executor(None, go.wait, 120)
    cpu0 = time.process_time()
    results = await asyncio.gather(*(drain(rpc, mode, batch, st) for rpc in conns),
                                   return_exceptions=True)
    st.end = time.monotonic()
    st.cpu = time.process_time() - cpu0
    st.errors += [str(r) for r in results if isinstance(r, BaseException)]
    for rpc in conns:
        await rpc.close()
    return st


def _generator(port: int, tokens: list[str], mode: str, batch: int, go: MpEvent,
               ready: Any, out: Any) -> None:
    try:
        out.put(asyncio.run(_generate(port, tokens, mode, batch, go, ready)))
    except BaseException as exc:
        ready.put(f"failed: {type(exc).__name__}: {exc}")
        out.put(Stats(errors=[f"generator: {type(exc).__name__}: {exc}"]))


def server_processes(server: Any) -> list[int]:
    """The PostgreSQL server's processes: its postmaster and every child (the boss's
    backends among them, which live as long as the boss's connections)."""
    if server is None:
        return []
    postmaster = int((server.datadir / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == postmaster:
            children.append(int(stat.parent.name))
    return [postmaster, *children]


def server_cpu(server: Any, since: dict[int, float]) -> float:
    """CPU seconds the server's processes spent since ``since`` (pid -> CPU then; a
    process started after counts from zero; one that ended meanwhile is missed)."""
    return sum(cpu_of(pid) - since.get(pid, 0.0) for pid in server_processes(server))


def split(items: list[T], parts: int) -> list[list[T]]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


@dataclass
class RunResult:
    tasks: int
    seconds: float
    stats: Stats
    boss_cpu: float
    boss_hwm_kb: int
    server_cpu: float = 0.0  # the PostgreSQL server's, from "go" to the last worker out


def one_run(root: Path, db_url: str, tasks: int, workers: int, mode: str, batch: int,
            procs: int, bound: float, profile: Path | None = None,
            server: Any = None) -> RunResult:
    boss = BossServe(root, db_url)
    tokens = boss.prepare(tasks, workers)
    ctx = multiprocessing.get_context("fork")
    go, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
    children = [ctx.Process(target=_generator, args=(boss.port, part, mode, batch, go,
                                                       ready, out), daemon=True)
                for part in split(tokens, procs)]
    try:
        boss.start()
        for c in children:
            c.start()
        for _ in children:  # every connection said hello before the clock starts
            said = ready.get(timeout=120)
            if said != "ready":
                raise BenchError(f"a generator {said}")
        spy = boss.profile(profile, bound) if profile is not None else None
        cpu0 = boss.cpu_seconds()
        server0 = {pid: cpu_of(pid) for pid in server_processes(server)}
        start = time.monotonic()
        go.set()
        stats = [out.get(timeout=bound) for _ in children]
        cpu = boss.cpu_seconds() - cpu0
        db_cpu = server_cpu(server, server0)
        hwm = boss.status()["VmHWM"]
        if spy is not None and profile is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
            spy.wait(60)
            if spy.returncode not in (0, -signal.SIGINT) or not profile.exists():
                why = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
                print(f"py-spy wrote no profile to {profile} (exit {spy.returncode}): "
                      f"{why.strip()[-500:]}", file=sys.stderr)
    except Exception as exc:
        raise BenchError(f"{mode} run failed: {exc}\n{tail(boss.log)}") from exc
    finally:
        go.set()
        for c in children:
            if c.pid is None:  # interrupted before it started
                continue
            c.join(30)
            if c.is_alive():
                c.kill()
        boss.stop()
    total = Stats(end=max(s.end for s in stats))
    for s in stats:
        total.tasks += s.tasks
        total.pop_ms += s.pop_ms
        total.complete_ms += s.complete_ms
        total.per_task_ms += s.per_task_ms
        total.errors += s.errors
        total.cpu += s.cpu
    if total.errors:
        raise BenchError(f"{mode}: {len(total.errors)} call(s) failed, first: "
                         f"{total.errors[0]}\n{tail(boss.log)}")
    if total.tasks != tasks:
        raise BenchError(f"{mode}: the workers completed {total.tasks} tasks of {tasks}")
    check_done_once(db_url, tasks)
    return RunResult(tasks, total.end - start, total, cpu, hwm, db_cpu)


# --- figures --------------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


@contextmanager
def database(server: Any, tmp: Path, name: str) -> Iterator[str]:
    if server is None:
        yield f"sqlite:///{tmp}/{name}.db"
    else:
        server.psql(f"CREATE DATABASE {name}")
        try:
            yield server.url(name)
        finally:
            # else autovacuum cleans up each finished run's dead rows during the next run
            # (the later of three runs were up to a third slower)
            server.psql(f"DROP DATABASE {name} WITH (FORCE)")


def measure(args: argparse.Namespace) -> Report:
    from benchmarks.push_1m import start_postgres

    raise_nofile(4 * max(args.workers) + 256)
    tmp = Path(tempfile.mkdtemp(prefix="ecloud-rpc-bench-"))
    server: Any = None
    rows: list[dict[str, Cell]] = []
    engine = "postgresql" if args.postgres else "sqlite"
    one_goal, batch_goal = GOALS[engine]
    notes: list[str] = []
    try:
        if args.postgres:
            _, server = start_postgres(tmp)
        k = 0
        for workers in args.workers:
            for mode in args.modes:
                runs: list[RunResult] = []
                loads: list[float] = []
                for _ in range(args.repeat):
                    k += 1
                    root = tmp / f"run{k}"
                    root.mkdir()
                    loads.append(os.getloadavg()[0])
                    with database(server, tmp, f"rpc{k}") as url:
                        spy = (args.py_spy / f"{engine}-{mode}-W{workers}-{k}.txt"
                               if args.py_spy else None)
                        runs.append(one_run(root, url, args.tasks, workers, mode, args.batch,
                                            min(args.procs, workers), args.bound, spy,
                                            server))
                    shutil.rmtree(root, ignore_errors=True)
                rates = [r.tasks / r.seconds for r in runs]
                pops = [x for r in runs for x in r.stats.pop_ms]
                completes = [x for r in runs for x in r.stats.complete_ms]
                per_task = [x for r in runs for x in r.stats.per_task_ms]
                rate = statistics.median(rates)
                goal = batch_goal if mode in BATCHED else one_goal
                p50, p99 = pct(per_task, 0.5), pct(per_task, 0.99)
                cpu_ms = statistics.median(1000 * r.boss_cpu / r.tasks for r in runs)
                db_ms = statistics.median(1000 * r.server_cpu / r.tasks for r in runs)
                gen_ms = statistics.median(1000 * r.stats.cpu / r.tasks for r in runs)
                all_ms = cpu_ms + db_ms + gen_ms
                rows.append({
                    "engine": engine,
                    "mode": f"{mode} {args.batch}" if mode in BATCHED else mode,
                    "W": workers, "tasks": args.tasks, "runs": len(runs),
                    "tasks/s (median)": round(rate),
                    "min-max": f"{min(rates):,.0f}-{max(rates):,.0f}",
                    "goal": f"{goal:,.0f}",
                    "pop p50 ms": pct(pops, 0.5), "pop p99 ms": pct(pops, 0.99),
                    "complete p50 ms": pct(completes, 0.5),
                    "complete p99 ms": pct(completes, 0.99),
                    "per task p50 ms": p50, "per task p99 ms": p99,
                    "boss CPU ms/task": cpu_ms,
                    "CPU-bound ceiling tasks/s": round(1000 / cpu_ms) if cpu_ms else None,
                    "server CPU ms/task": db_ms if server is not None else None,
                    "generator CPU ms/task": gen_ms,
                    "machine ceiling tasks/s": (round(1000 * (os.cpu_count() or 1) / all_ms)
                                                if all_ms else None),
                    "boss peak RSS MB": max(r.boss_hwm_kb for r in runs) / 1024,
                    "load 1m": f"{min(loads):.2f}-{max(loads):.2f}",
                })
                verdict = "met" if rate >= goal else f"missed: {rate / goal:.3f} of the goal"
                lat = ("met" if p50 is not None and p99 is not None and p50 <= GOAL_P50_MS
                       and p99 <= GOAL_P99_MS else "missed")
                notes.append(f"- {engine} {mode}, W={workers}: {rate:,.0f} tasks/s against "
                             f"{goal:,.0f} ({verdict}); per-task overhead p50 "
                             f"{p50 or 0:.3f} ms, p99 {p99 or 0:.3f} ms against "
                             f"{GOAL_P50_MS} / {GOAL_P99_MS} ms ({lat})")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    notes.insert(0, f"Every run: {args.tasks:,} tasks each succeeded once, no call failed; "
                    f"{min(args.procs, max(args.workers))} generator process(es). The "
                    "CPU-bound ceiling is 1,000 / the boss's CPU ms per task: the rate if "
                    "the boss had one core to itself (its threads share one GIL) and never "
                    "waited; on a busy machine it is the figure to compare with the goal. "
                    "The machine ceiling is the rate at which the boss, the database "
                    "server and the load generator together would use every core, all "
                    "three sharing this machine's (never reached: they wait on each other).")
    return {"title": f"Boss RPC capacity ({engine}, `boss serve` subprocess, simulated "
                     "workers on 127.0.0.1)",
            "columns": ["engine", "mode", "W", "tasks", "runs", "tasks/s (median)", "min-max",
                        "goal", "pop p50 ms", "pop p99 ms", "complete p50 ms",
                        "complete p99 ms", "per task p50 ms", "per task p99 ms",
                        "boss CPU ms/task", "CPU-bound ceiling tasks/s", "server CPU ms/task",
                        "generator CPU ms/task", "machine ceiling tasks/s", "boss peak RSS MB",
                        "load 1m"],
            "rows": rows, "notes": notes}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rpc_capacity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10_000, help="N per run (default 10,000)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 16],
                    help="K simulated workers, one run set per value (default 1 16)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[:3]))
    ap.add_argument("--batch", type=int, default=50, help="B: tasks per pop in batch mode")
    ap.add_argument("--procs", type=int, default=2,
                    help="load generator processes (default 2; at most K)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    ap.add_argument("--postgres", action="store_true",
                    help="a temporary PostgreSQL server (tests/pg.py) instead of SQLite")
    ap.add_argument("--py-spy", type=Path, metavar="DIR",
                    help="profile the boss of every run with py-spy into DIR (collapsed stacks)")
    ap.add_argument("--bound", type=float, default=1800.0,
                    help="seconds one run may take before it counts as failed")
    return ap


def run(argv: list[str]) -> Report:
    args = parser().parse_args(argv)
    if min(args.tasks, args.repeat, args.batch, args.procs, *args.workers) < 1:
        raise SystemExit("rpc_capacity: every count must be >= 1")
    return measure(args)


def main(argv: list[str] | None = None) -> int:
    print_report(run(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
