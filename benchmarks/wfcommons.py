"""Benchmark 6: real workflow DAGs (WfCommons) run end to end, makespan against the bound.

Usage: .venv/bin/python benchmarks/wfcommons.py [--all] [--slots 4] [--workers 1]
       [--seconds 45 | --time-scale X] [--size-scale 0.001] [--instance NAME]...

For each instance (default: the two small ones of ../shared/workflows; ``--all``
adds the medium and large ones), in a temporary directory with the embedded
defaults (SQLite, ``file://`` datastore): ``boss init``, ``boss import-wfcommons``
(which writes the workflow's input files and pushes the tasks), ``boss serve
--no-autoscale`` and W x ``worker run --burst`` sharing ``--slots`` slots. The
time scale makes the ideal schedule last ``--seconds`` (unless ``--time-scale``
is given). When the workers have left, every task must have succeeded and every
output file must be in the datastore at its exact scaled size.

Printed per instance: the makespan (first attempt started to last attempt
ended, from the attempts table), the issue's lower bound max(critical path,
total work / slots) and the ratio (goal <= 1.10); also a tighter lower bound
(no task starts before its longest path of ancestors ends, see
``Conversion.level_bound``), the makespan of the boss's own policy simulated
without overheads, and the mean overhead per task (attempt time minus the
sleep). When the simulated schedule is itself far above the issue's bound,
the gap is the workflow's shape, not the system.

``benchmarks/run.py wfcommons`` runs it too (``run`` returns the table);
``--size tiny`` is the small BLAST instance at a 4 s schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
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
GOAL = 1.10
WORKFLOWS = Path(__file__).resolve().parents[1].parent / "shared" / "workflows"
BIN = Path(sys.executable).parent
START_TIMEOUT = 60.0  # seconds for `boss serve` to listen


Cell = str | int | float | bool | None
COLUMNS = ["instance", "tasks", "time scale", "critical path s", "work / slots s", "bound s",
           "makespan s", "makespan / bound", f"goal <= {GOAL:.2f}", "level bound s",
           "makespan / level bound", "simulated s", "overhead / task ms", "status"]


@dataclass(frozen=True)
class Figures:
    instance: str
    tasks: int
    time_scale: float
    critical_path: float
    work_per_slot: float
    bound: float
    level_bound: float
    simulated: float
    makespan: float
    overhead: float  # mean attempt time minus the task's sleep, seconds

    @property
    def ratio(self) -> float:
        return self.makespan / self.bound if self.bound > 0 else float("inf")

    def row(self) -> dict[str, Cell]:
        return {"instance": self.instance, "tasks": self.tasks, "time scale": self.time_scale,
                "critical path s": self.critical_path, "work / slots s": self.work_per_slot,
                "bound s": self.bound, "makespan s": self.makespan,
                "makespan / bound": round(self.ratio, 3),
                f"goal <= {GOAL:.2f}": self.ratio <= GOAL,
                "level bound s": self.level_bound,
                "makespan / level bound": round(self.makespan / self.level_bound, 3),
                "simulated s": self.simulated, "overhead / task ms": self.overhead * 1000,
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
                 time_scale: float | None, size_scale: float) -> Figures:
    """Import and run one instance end to end; return its figures."""
    wf = wfcommons.load(path)
    prefix = wfcommons.default_prefix(path)
    unit = wfcommons.convert(wf, time_scale=1.0, size_scale=size_scale, prefix=prefix)
    scale = time_scale if time_scale is not None else seconds / unit.list_schedule(slots)
    conv = wfcommons.convert(wf, time_scale=scale, size_scale=size_scale, prefix=prefix)
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
        makespan, overhead = measure(root / ".ecloud" / "boss.db", conv, prefix)
        check_outputs(root / ".ecloud" / "data", conv)
    return Figures(path.name.removesuffix(".json"), len(conv.documents), scale,
                   conv.critical_path, conv.total_work / slots, conv.bound(slots),
                   conv.level_bound(slots), conv.list_schedule(slots), makespan, overhead)


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


def measure(database: Path, conv: wfcommons.Conversion, prefix: str) -> tuple[float, float]:
    """Makespan (first attempt start to last attempt end) and mean overhead per task."""
    con = sqlite3.connect(database)
    try:
        states = dict(con.execute("SELECT state, count(*) FROM tasks GROUP BY state"))
        if states != {"succeeded": len(conv.documents)}:
            raise RunFailed(f"{prefix}: tasks by state {states}, not all succeeded")
        rows = con.execute(
            "SELECT t.name, a.started_at, a.finished_at FROM attempts a "
            "JOIN tasks t ON t.id = a.task_id WHERE a.state = 'succeeded'").fetchall()
        first, last = con.execute(
            "SELECT min(started_at), max(finished_at) FROM attempts").fetchone()
    finally:
        con.close()
    sleep = {d["name"]: r for d, r in zip(conv.documents, conv.runtimes, strict=True)}
    overhead = sum(end - start - sleep[name] for name, start, end in rows) / len(rows)
    return float(last - first), overhead


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
    ap.add_argument("--slots", type=int, default=4, help="Slots in all (default 4).")
    ap.add_argument("--workers", type=int, default=1, help="Workers sharing the slots.")
    ap.add_argument("--seconds", type=float, default=45.0,
                    help="Pick the time scale so the ideal schedule lasts this long.")
    ap.add_argument("--time-scale", type=float, default=None, help="Use this time scale.")
    ap.add_argument("--size-scale", type=float, default=0.001,
                    help="File sizes times this (default 0.001).")
    args = ap.parse_args(argv)
    if args.slots < 1 or not 1 <= args.workers <= args.slots:
        ap.error("need --slots >= 1 and 1 <= --workers <= --slots")
    if args.seconds <= 0 or (args.time_scale is not None and args.time_scale < 0):
        ap.error("--seconds must be positive and --time-scale non-negative")
    return args


def run(argv: list[str]) -> dict[str, Any]:
    """Run the instances; the figures as a table (benchmarks/run.py's Report).

    Progress goes to stdout as each instance ends. An instance that fails
    raises RunFailed once the others have run.
    """
    args = parse(argv)
    if not (BIN / "boss").is_file() or not (BIN / "worker").is_file():
        raise RunFailed(f"no boss/worker scripts beside {sys.executable}: run with the "
                        "project's .venv/bin/python")
    names = args.instance or SMALL + (LARGER if args.all else [])
    title = (f"WfCommons workflows on {args.slots} slots ({args.workers} worker(s)), size "
             f"scale {args.size_scale:g}: makespan against max(critical path, total work / "
             f"slots), goal <= {GOAL:.2f}")
    notes = ["level bound: no task starts before its ancestors' longest path ends, so "
             "T + (work that cannot start before T) / slots bounds the makespan for every T; "
             "simulated: the boss's priority order with no overhead"]
    if not args.dir.is_dir():
        return {"title": title, "columns": ["instance", "status"], "notes": notes,
                "rows": [{"instance": n, "status": f"not available: no WfCommons instances "
                          f"at {args.dir} (the shared workflows directory beside the "
                          "repository)"} for n in names]}
    rows: list[dict[str, Cell]] = []
    failures: list[str] = []
    for name in names:
        t0 = time.monotonic()
        try:
            fig = run_instance(args.dir / f"{name}.json", slots=args.slots,
                               workers=args.workers, seconds=args.seconds,
                               time_scale=args.time_scale, size_scale=args.size_scale)
        except (RunFailed, wfcommons.WfCommonsError) as exc:
            print(f"{name}: FAILED: {exc}", flush=True)
            failures.append(f"{name}: {exc}")
            continue
        rows.append(fig.row())
        print(f"{name}: {fig.tasks} tasks, makespan {fig.makespan:.1f} s, bound "
              f"{fig.bound:.1f} s, ratio {fig.ratio:.3f} "
              f"({'met' if fig.ratio <= GOAL else 'NOT met'}); level bound "
              f"{fig.level_bound:.1f} s, simulated {fig.simulated:.1f} s "
              f"(wall {time.monotonic() - t0:.0f} s)", flush=True)
    if failures:
        raise RunFailed("; ".join(failures))
    return {"title": title, "columns": COLUMNS, "rows": rows, "notes": notes}


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
