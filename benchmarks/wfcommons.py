"""Benchmark 6: real workflow DAGs (WfCommons) run end to end, makespan against the bound.

Usage: .venv/bin/python benchmarks/wfcommons.py [--all] [--slots 4 [40 ...]] [--workers 1]
       [--repeat 1] [--seconds 45 | --time-scale X] [--size-scale 0.001] [--instance NAME]...

For each instance (default: the two small ones of ../shared/workflows; ``--all``
adds the medium and large ones) and each slot count of ``--slots``, ``--repeat``
times, in a temporary directory with the embedded defaults (SQLite, ``file://``
datastore): ``boss init``, ``boss import-wfcommons`` (which writes the workflow's
input files and pushes the tasks), ``boss serve --no-autoscale`` and W x ``worker
run --burst`` sharing the slots. The time scale makes the ideal schedule on those
slots last ``--seconds`` (unless ``--time-scale`` is given). When the workers have
left, every task must have succeeded and every output file must be in the
datastore at its exact scaled size.

Printed per instance and slot count (medians of the runs): the makespan (first
attempt started to last attempt ended, from the attempts table), the issue's
lower bound max(critical path, total work / slots) and the ratio (goal <= 1.10);
the level bound (no task starts before its longest path of ancestors ends, see
``Conversion.level_bound``) and the makespan against it; whether the goal is
attainable at all on that many slots; the makespan of the boss's own policy
simulated without overheads; per task, the mean time from its claim to a slot
starting it (a task claimed ahead waits in the worker's reserve) and the mean
overhead after that (to its result in the boss, minus the sleep).

Attainable is "no" when a lower bound of every schedule is already above 1.10 x
the issue's bound: the level bound (a long task gates the rest: BWA's index on
few slots), or the rounds bound (n tasks of at least r seconds on S slots put
ceil(n/S) of them on one slot: BLAST's 40 near-equal tasks on 32 slots take two
rounds); there the goal is infeasible by construction and the makespan is judged
against the tighter bound. It is "yes" when the simulated schedule meets the
goal (a schedule exists, and it is the boss's own), and "unproven" in between.
Each comes with the range in which the best schedule's ratio to the issue's
bound lies (from the tightest lower bound to the simulated schedule), so a
"yes" with little room says how little overhead the goal leaves.

``benchmarks/run.py wfcommons`` runs it too (``run`` returns the table);
``--size tiny`` is the small BLAST instance at a 4 s schedule on 4 slots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# a script, not a package module: make the repository importable (tests.ports)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from boss import wfcommons
from tests.ports import free_port

NAME = "wfcommons"
SMALL = ["blast-chameleon-small-001", "bwa-chameleon-small-001"]
LARGER = ["blast-chameleon-medium-001", "bwa-chameleon-large-001"]
TINY_ARGS = ["--instance", "blast-chameleon-small-001", "--seconds", "4"]
REPEATS = True
GOAL = 1.10
WORKFLOWS = Path(__file__).resolve().parents[1].parent / "shared" / "workflows"
BIN = Path(sys.executable).parent
START_TIMEOUT = 60.0  # seconds for `boss serve` to listen


Cell = str | int | float | bool | None
COLUMNS = ["instance", "slots", "tasks", "time scale", "critical path s", "work / slots s",
           "bound s", "makespan s", "makespan / bound", f"goal <= {GOAL:.2f}",
           "level bound s", "makespan / level bound", "attainable", "simulated s",
           "overhead / task ms", "claim to start / task ms", "runs", "makespan range s",
           "status"]


def rounds_bound(conv: wfcommons.Conversion, slots: int) -> float:
    """A lower bound from the tasks' granularity, which the level bound does not see.

    Take the n longest tasks, each at least r_n seconds: some slot runs ceil(n/S)
    of them one after another, the first no earlier than the earliest start of
    any of them, and after the last one at least the shortest tail (the longest
    path below a task) of any of them still has to run.
    """
    if slots < 1:
        raise ValueError("slots must be at least 1")
    n_tasks = len(conv.runtimes)
    earliest = [0.0] * n_tasks
    for k, ps in enumerate(conv.parents):  # parents come first in the documents
        for p in ps:
            earliest[k] = max(earliest[k], earliest[p] + conv.runtimes[p])
    tail = [0.0] * n_tasks
    for k in reversed(range(n_tasks)):
        for p in conv.parents[k]:
            tail[p] = max(tail[p], conv.runtimes[k] + tail[k])
    best = 0.0
    first, after = math.inf, math.inf
    by_length = sorted(range(n_tasks), key=lambda k: conv.runtimes[k], reverse=True)
    for n, k in enumerate(by_length, start=1):
        first, after = min(first, earliest[k]), min(after, tail[k])
        best = max(best, first + -(-n // slots) * conv.runtimes[k] + after)
    return best


def attainable(bound: float, lower: float, simulated: float) -> str:
    """Whether some schedule can meet the goal, with where the best schedule's ratio to
    ``bound`` lies: "no" (the goal is infeasible by construction), "yes" (the boss's own
    policy without overheads meets it) or "unproven"."""
    low, high = lower / bound, simulated / bound
    span = f"{low:.3f}" if round(low, 3) == round(high, 3) else f"{low:.3f}-{high:.3f}"
    if lower > GOAL * bound:
        return f"no (optimum >= {low:.3f})"
    if simulated <= GOAL * bound:
        return f"yes (optimum {span})"
    return f"unproven (optimum {span})"


@dataclass(frozen=True)
class Figures:
    """One instance on one slot count: the bounds, and each run's makespan and overhead."""

    instance: str
    slots: int
    tasks: int
    time_scale: float
    critical_path: float
    work_per_slot: float
    bound: float
    level_bound: float
    rounds_bound: float
    simulated: float
    makespans: tuple[float, ...]
    overheads: tuple[float, ...]  # see Run
    waits: tuple[float, ...]

    @property
    def makespan(self) -> float:
        return statistics.median(self.makespans)

    @property
    def overhead(self) -> float:
        return statistics.median(self.overheads)

    @property
    def wait(self) -> float:
        return statistics.median(self.waits)

    @property
    def ratio(self) -> float:
        return self.makespan / self.bound if self.bound > 0 else math.inf

    @property
    def lower(self) -> float:
        """The tightest lower bound known: the issue's, the level and the rounds bound."""
        return max(self.bound, self.level_bound, self.rounds_bound)

    @property
    def attainable(self) -> str:
        return attainable(self.bound, self.lower, self.simulated)

    @property
    def verdict(self) -> str:
        if self.ratio <= GOAL:
            return "met"
        if self.attainable.startswith("no"):
            return (f"not met, infeasible by construction; {self.makespan / self.lower:.3f} "
                    "x the tightest bound")
        return "NOT met"

    def row(self) -> dict[str, Cell]:
        return {"instance": self.instance, "slots": self.slots, "tasks": self.tasks,
                "time scale": self.time_scale, "critical path s": self.critical_path,
                "work / slots s": self.work_per_slot, "bound s": self.bound,
                "makespan s": self.makespan, "makespan / bound": round(self.ratio, 3),
                f"goal <= {GOAL:.2f}": self.ratio <= GOAL,
                "level bound s": self.level_bound,
                "makespan / level bound": round(self.makespan / self.level_bound, 3),
                "attainable": self.attainable, "simulated s": self.simulated,
                "overhead / task ms": self.overhead * 1000,
                "claim to start / task ms": self.wait * 1000, "runs": len(self.makespans),
                "makespan range s": f"{min(self.makespans):.1f}-{max(self.makespans):.1f}",
                "status": None}


class RunFailed(Exception):
    """A run did not finish cleanly; the message says what happened."""




def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 30.0) -> None:
    """SIGTERM the process's own session, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def run_instance(path: Path, *, slots: int, workers: int, seconds: float,
                 time_scale: float | None, size_scale: float, repeat: int = 1,
                 keep: Path | None = None) -> Figures:
    """Import and run one instance end to end ``repeat`` times on ``slots`` slots."""
    wf = wfcommons.load(path)
    prefix = wfcommons.default_prefix(path)
    unit = wfcommons.convert(wf, time_scale=1.0, size_scale=size_scale, prefix=prefix)
    scale = time_scale if time_scale is not None else seconds / unit.list_schedule(slots)
    conv = wfcommons.convert(wf, time_scale=scale, size_scale=size_scale, prefix=prefix)
    name = path.name.removesuffix(".json")
    runs: list[Run] = []
    for i in range(repeat):
        t0 = time.monotonic()
        saved = keep / f"{name}-{slots}-{i + 1}" if keep is not None else None
        one = run_once(path, conv, prefix, slots=slots, workers=workers, scale=scale,
                       size_scale=size_scale, keep=saved)
        print(f"{name} on {slots} slots, run {i + 1} of {repeat}: makespan "
              f"{one.makespan:.2f} s, overhead {one.overhead * 1000:.0f} ms/task, claim to start "
              f"{one.wait * 1000:.0f} ms/task (wall {time.monotonic() - t0:.0f} s)", flush=True)
        runs.append(one)
    return Figures(name, slots, len(conv.documents), scale, conv.critical_path,
                   conv.total_work / slots, conv.bound(slots), conv.level_bound(slots),
                   rounds_bound(conv, slots), conv.list_schedule(slots),
                   tuple(r.makespan for r in runs), tuple(r.overhead for r in runs),
                   tuple(r.wait for r in runs))


def run_once(path: Path, conv: wfcommons.Conversion, prefix: str, *, slots: int,
             workers: int, scale: float, size_scale: float,
             keep: Path | None) -> Run:
    """One run in a fresh directory, measured.

    With ``keep``, the boss's database and the logs are copied there (to profile a run).
    """
    per_worker = [slots // workers + (1 if i < slots % workers else 0) for i in range(workers)]
    deadline_s = max(300.0, 10 * conv.list_schedule(slots) + len(conv.documents))
    with tempfile.TemporaryDirectory(prefix="ecloud-bench-wf-") as tmp:
        root = Path(tmp)
        port = free_port()
        (root / "ecloud.toml").write_text(f'[boss]\nlisten = "127.0.0.1:{port}"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}

        def boss(*a: str) -> str:
            done = subprocess.run([str(BIN / "boss"), *a], cwd=root, env=env, check=False,
                                  capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise RunFailed(f"boss {' '.join(a)}: exit {done.returncode}\n{done.stderr}")
            return done.stdout

        boss("init")
        pushed = json.loads(boss("import-wfcommons", str(path), "--time-scale", repr(scale),
                                 "--size-scale", repr(size_scale), "--slots", str(slots),
                                 "--json"))
        if pushed["pushed"] != len(conv.documents):
            raise RunFailed(f"{path.name}: pushed {pushed['pushed']} of "
                            f"{len(conv.documents)} tasks")
        for i, n in enumerate(per_worker):
            boss("admin", "add-worker", "--token-file", f"tok{i}", "--slots", str(n))
        with (root / "serve.log").open("w") as log:
            server = subprocess.Popen([str(BIN / "boss"), "serve", "--no-autoscale"], cwd=root,
                                      env=env, stdout=log, stderr=log, start_new_session=True)
            procs: list[subprocess.Popen[bytes]] = []
            try:
                wait_listening(port, server)
                for i, n in enumerate(per_worker):
                    with (root / f"worker{i}.log").open("w") as wlog:
                        procs.append(subprocess.Popen(
                            [str(BIN / "worker"), "run", "--boss", f"tcp://127.0.0.1:{port}",
                             "--token-file", f"tok{i}", "--burst", "--slots", str(n)],
                            cwd=root, env=env, stdout=wlog, stderr=wlog,
                            start_new_session=True))
                wait_workers(procs, root / ".ecloud" / "boss.db", deadline_s, path.name)
            except RunFailed as exc:
                raise RunFailed(f"{exc}{tails(root)}") from None
            finally:
                for p in procs:
                    stop(p)
                stop(server)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            backup(root / ".ecloud" / "boss.db", keep / "boss.db")
            for log_file in root.glob("*.log"):
                (keep / log_file.name).write_bytes(log_file.read_bytes())
        run = measure(root / ".ecloud" / "boss.db", conv, prefix)
        check_outputs(root / ".ecloud" / "data", conv)
    return run


def backup(database: Path, to: Path) -> None:
    """A consistent copy of a SQLite database in WAL mode (the WAL folded in)."""
    src, dst = sqlite3.connect(database), sqlite3.connect(to)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def wait_workers(procs: list[subprocess.Popen[bytes]], database: Path, deadline_s: float,
                 what: str) -> None:
    """Wait for the workers to leave; fail when none started a task within START_TIMEOUT
    (they cannot reach the boss, say) or when they outlast ``deadline_s``."""
    start = time.monotonic()
    started = False
    while any(p.poll() is None for p in procs):
        waited = time.monotonic() - start
        if waited > deadline_s:
            raise RunFailed(f"{what}: the workers did not finish within {deadline_s:.0f} s")
        if not started:
            started = attempts_started(database)
            if not started and waited > START_TIMEOUT:
                raise RunFailed(f"{what}: no task started within {START_TIMEOUT:.0f} s of "
                                "the workers' start")
        time.sleep(0.25)


def attempts_started(database: Path) -> bool:
    con = sqlite3.connect(database, timeout=10)
    try:
        return con.execute("SELECT 1 FROM attempts LIMIT 1").fetchone() is not None
    except sqlite3.OperationalError:  # busy past the timeout: ask again next turn
        return False
    finally:
        con.close()


def tails(root: Path, lines: int = 8) -> str:
    """The last lines of the server's and the workers' logs, for a failure message."""
    parts = []
    for log in sorted(root.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"\n--- {log.name} (last {len(text)} lines)\n" + "\n".join(text))
    return "".join(parts)


def wait_listening(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RunFailed(f"boss serve exited with status {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RunFailed(f"boss serve did not listen on port {port} within {START_TIMEOUT:.0f} s")


@dataclass(frozen=True)
class Run:
    """One run's figures, in seconds.

    ``makespan``: first attempt started (claimed) to last attempt ended. ``wait``:
    the mean time from an attempt's claim to a slot starting it (its stage-in's first
    event): a task claimed ahead waits in the worker's reserve, which the attempts
    table counts as running. ``overhead``: the mean of the rest of each attempt's
    time minus its sleep (staging, starting the process, reporting).
    """

    makespan: float
    overhead: float
    wait: float


def measure(database: Path, conv: wfcommons.Conversion, prefix: str) -> Run:
    """The run's figures, from the attempts and the events the workers sent."""
    con = sqlite3.connect(database)
    try:
        states = dict(con.execute("SELECT state, count(*) FROM tasks GROUP BY state"))
        if states != {"succeeded": len(conv.documents)}:
            raise RunFailed(f"{prefix}: tasks by state {states}, not all succeeded")
        rows = con.execute(
            "SELECT t.name, a.started_at, a.finished_at, "
            "(SELECT min(e.ts) FROM events e WHERE e.attempt_id = a.id "
            "AND e.kind = 'job.stage-in.started') "
            "FROM attempts a JOIN tasks t ON t.id = a.task_id "
            "WHERE a.state = 'succeeded'").fetchall()
        first, last = con.execute(
            "SELECT min(started_at), max(finished_at) FROM attempts").fetchone()
    finally:
        con.close()
    sleep = {d["name"]: r for d, r in zip(conv.documents, conv.runtimes, strict=True)}
    # a missing event (dropped while the boss was away) counts as no wait
    taken = [(name, start, max(start, slot or start), end) for name, start, end, slot in rows]
    overhead = sum(end - slot - sleep[name] for name, _, slot, end in taken) / len(rows)
    wait = sum(slot - start for _, start, slot, _ in taken) / len(rows)
    return Run(float(last - first), overhead, wait)


def check_outputs(data: Path, conv: wfcommons.Conversion) -> None:
    """Every output is in the datastore at its exact scaled size: the data flowed."""
    for doc in conv.documents:
        argv = doc["commands"][0]["command"]
        expected = dict(zip(argv[4::2], (int(n) for n in argv[3::2]), strict=True))
        for key, internal in doc["outputs"].items():
            path = data / key.partition(":")[2]
            size = path.stat().st_size if path.is_file() else None
            if size != expected[internal]:
                raise RunFailed(f"{doc['name']}: output {key} is {size} bytes, not "
                                f"{expected[internal]}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--all", action="store_true", help="Add the medium and large instances.")
    ap.add_argument("--instance", action="append", default=[],
                    help="Run this instance (file name without .json); repeatable.")
    ap.add_argument("--dir", type=Path, default=WORKFLOWS, help="Where the instances are.")
    ap.add_argument("--slots", type=int, nargs="+", default=[4], metavar="S",
                    help="Slots in all; several run each instance on each (default 4).")
    ap.add_argument("--workers", type=int, default=1, help="Workers sharing the slots.")
    ap.add_argument("--repeat", type=int, default=1,
                    help="Runs of each instance on each slot count; medians are shown.")
    ap.add_argument("--seconds", type=float, default=45.0,
                    help="Pick the time scale so the ideal schedule lasts this long.")
    ap.add_argument("--time-scale", type=float, default=None, help="Use this time scale.")
    ap.add_argument("--size-scale", type=float, default=0.001,
                    help="File sizes times this (default 0.001).")
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR",
                    help="Copy each run's boss database and logs to DIR/INSTANCE-SLOTS-RUN.")
    args = ap.parse_args(argv)
    if min(args.slots) < 1 or not 1 <= args.workers <= min(args.slots):
        ap.error("need every --slots >= 1 and 1 <= --workers <= the fewest --slots")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.seconds <= 0 or (args.time_scale is not None and args.time_scale < 0):
        ap.error("--seconds must be positive and --time-scale non-negative")
    args.slots = list(dict.fromkeys(args.slots))
    return args


NOTES = [
    "bound: the issue's, max(critical path, total work / slots); level bound: also T + "
    "(work that cannot start before T) / slots for every T, since no task starts before "
    "its ancestors' longest path ends",
    "attainable: \"no\" when a lower bound of every schedule (the level bound, or the "
    "rounds bound: the n longest tasks put ceil(n / slots) of them on one slot) is already "
    f"above {GOAL:.2f} x the issue's bound: the goal is infeasible by construction on that "
    "many slots; \"yes\" when the boss's order without overheads (simulated) meets it; "
    "optimum: between that lower bound and the simulated schedule, over the issue's bound",
    "makespan: first attempt started to last attempt ended (attempts table), median of the "
    "runs; claim to start: mean time from a task's claim to a slot starting it (a task "
    "claimed ahead waits in the worker's reserve); overhead: mean time from there to its "
    "result in the boss, minus the task's sleep",
]


def run(argv: list[str]) -> dict[str, Any]:
    """Run the instances on each slot count; the figures as a table (run.py's Report).

    Progress goes to stdout as each run ends. An instance that fails raises
    RunFailed once the others have run.
    """
    args = parse(argv)
    if not (BIN / "boss").is_file() or not (BIN / "worker").is_file():
        raise RunFailed(f"no boss/worker scripts beside {sys.executable}: run with the "
                        "project's .venv/bin/python")
    names = args.instance or SMALL + (LARGER if args.all else [])
    slots = ", ".join(str(s) for s in args.slots)
    title = (f"WfCommons workflows on {slots} slots ({args.workers} worker(s)), size scale "
             f"{args.size_scale:g}, median of {args.repeat}: makespan against max(critical "
             f"path, total work / slots), goal <= {GOAL:.2f}")
    if not args.dir.is_dir():
        return {"title": title, "columns": ["instance", "status"], "notes": NOTES,
                "rows": [{"instance": n, "status": f"not available: no WfCommons instances "
                          f"at {args.dir} (the shared workflows directory beside the "
                          "repository)"} for n in names]}
    figures: list[Figures] = []
    failures: list[str] = []
    for name in names:
        for n in args.slots:
            try:
                fig = run_instance(args.dir / f"{name}.json", slots=n, workers=args.workers,
                                   seconds=args.seconds, time_scale=args.time_scale,
                                   size_scale=args.size_scale, repeat=args.repeat,
                                   keep=args.keep)
            except (RunFailed, wfcommons.WfCommonsError) as exc:
                print(f"{name} on {n} slots: FAILED: {exc}", flush=True)
                failures.append(f"{name} on {n} slots: {exc}")
                continue
            figures.append(fig)
            print(summary(fig), flush=True)
    if failures:
        raise RunFailed("; ".join(failures))
    return {"title": title, "columns": COLUMNS, "rows": [f.row() for f in figures],
            "notes": NOTES}


def summary(fig: Figures) -> str:
    return (f"{fig.instance} on {fig.slots} slots: {fig.tasks} tasks, makespan "
            f"{fig.makespan:.1f} s (median of {len(fig.makespans)}), bound {fig.bound:.1f} s, "
            f"ratio {fig.ratio:.3f}: {fig.verdict}; level bound {fig.level_bound:.1f} s "
            f"({fig.makespan / fig.level_bound:.3f}), attainable: {fig.attainable}, simulated "
            f"{fig.simulated:.1f} s")


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table, for RESULTS.md."""
    def cell(v: Cell) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cols = report["columns"]
    lines = [report["title"], "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in report["rows"]]
    return "\n".join([*lines, "", *report["notes"]])


def main(argv: list[str] | None = None) -> int:
    try:
        report = run(sys.argv[1:] if argv is None else argv)
    except RunFailed as exc:
        print(f"wfcommons benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
