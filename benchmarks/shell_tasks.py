"""Benchmark 1: N shell tasks running `true` with W slots: ecloud vs GNU parallel vs xargs.

    .venv/bin/python benchmarks/run.py shell_tasks                 # 10,000 tasks, W = 2 and 8
    .venv/bin/python benchmarks/run.py shell_tasks --tasks 2000 --slots 2
    .venv/bin/python benchmarks/shell_tasks.py --tasks 2000 --repeat 5 --workers 2

For each W, in the same run and interleaved (run 1 of every contender, then
run 2, ...) so that the machine's noise falls on all of them alike:

- ecloud, through the real path: a fresh boss (SQLite, file datastore, the
  embedded defaults but ``[worker] poll_seconds = 0.05``) holds N tasks
  ``{"commands": [{"command": ["true"]}]}``; ``boss serve`` runs; ``--workers K``
  ``worker run --burst`` processes (default one) share the W slots (W/K each).
  The clock starts when the workers are started and stops when the last one
  leaves (so it includes their start-up, not the push, which is shown
  apart); every task must have succeeded, by the workers' summaries and by
  the boss's counts. Every transition is a committed SQLite transaction
  (WAL, ``synchronous=NORMAL``: it survives a crash of the boss).
- ``parallel -jW true ::: 0 .. N-1`` (GNU parallel), timed whole.
- ``xargs -P W -n1 true`` fed N lines, timed whole.

Reports the median, min and max seconds of ``--repeat`` runs (default 3),
tasks per second at the median, and ecloud's throughput over parallel's: the
median of the per-run ratios (parallel's seconds / ecloud's seconds). Goal:
ecloud >= 1.0x GNU parallel's throughput (stretch: 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# a script, not a package module: make the repository importable (boss, benchmarks.run)
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import Cell, Report, print_report  # noqa: E402
from tests.ports import free_port  # noqa: E402

NAME = "shell_tasks"
TINY_ARGS = ["--tasks", "30", "--slots", "2", "--repeat", "1"]
FULL_ARGS: list[str] = []  # the defaults: 10,000 tasks, W = 2 and 8, 3 runs
REPEATS = True

BIN = Path(sys.executable).parent
GOAL_RATIO = 1.0
STRETCH_RATIO = 2.0
RUNNERS = ("ecloud", "parallel", "xargs")


class BenchError(Exception):
    """A measurement failed (a command exited non-zero, a task failed, a bound ran out)."""


class Unavailable(BenchError):
    """A contender cannot be installed or started here; the table says why."""


# --- processes ------------------------------------------------------------------------------

def scrubbed_env(**extra: str) -> dict[str, str]:
    """This environment without ECLOUD_ variables (a developer's must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
    env.update(extra)
    return env




def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a process in its own process group, so that stop() reaches its children too."""
    return subprocess.Popen(argv, start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen[Any], grace: float = 15.0,
         sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal proc's process group, wait ``grace`` seconds, then SIGKILL the group."""
    if proc.returncode is not None:
        return  # reaped: its group id may already belong to someone else
    _killpg(proc.pid, sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    _killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (the leader too)
    proc.wait(10)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def stopping(procs: list[subprocess.Popen[Any]]) -> Iterator[list[subprocess.Popen[Any]]]:
    """Stop every process appended to ``procs`` on the way out, whatever happened."""
    try:
        yield procs
    finally:
        for p in reversed(procs):
            stop(p)


def wait_listening(port: int, proc: subprocess.Popen[Any], log: Path, bound: float,
                   what: str) -> None:
    """Wait until something accepts on 127.0.0.1:port; fail if proc dies or bound runs out."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:  # bounded in time
        if proc.poll() is not None:
            raise BenchError(f"{what} exited {proc.returncode} before listening:\n"
                             + tail(log))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {bound:.0f} s:\n" + tail(log))


def cpu_of(pid: int, *, reaped: bool = False) -> float:
    """user + system CPU seconds of a process so far (0 once it is gone); with
    ``reaped``, those of the children it has reaped too."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # after the ")": state is field 3, utime..cstime are fields 14..17
    return sum(int(x) for x in fields[11:15 if reaped else 13]) / os.sysconf("SC_CLK_TCK")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} is missing)"


def timed_command(argv: list[str], bound: float, stdin_text: str | None = None) -> float:
    """Seconds from start to exit of argv, which must exit 0 within ``bound`` seconds."""
    start = time.perf_counter()
    proc = spawn(argv, stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(stdin_text, timeout=bound)
    except BaseException:
        stop(proc, grace=1)
        raise
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"{short(argv)} exited {proc.returncode}: {err.strip()[-500:]}")
    return seconds


def short(argv: list[str]) -> str:
    """argv for a message: the program and its first arguments."""
    return " ".join([Path(argv[0]).name, *argv[1:4]]) + (" ..." if len(argv) > 4 else "")


def bound_for(tasks: int) -> float:
    """How long one run may take before it is stopped: a bound, not an expectation."""
    return 120.0 + tasks * 0.25


# --- the contenders -----------------------------------------------------------------------

def gnu_parallel() -> str:
    """Path of GNU parallel (not moreutils' parallel), or Unavailable."""
    exe = shutil.which("parallel")
    if exe is None:
        raise Unavailable("GNU parallel is not installed (apt-get install parallel)")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"{exe} --version failed: {exc}") from exc
    first = out.stdout.splitlines()[0] if out.stdout else ""
    if "GNU parallel" not in first:
        raise Unavailable(f"{exe} is not GNU parallel (moreutils?): apt-get install parallel")
    return exe


def version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stdout.splitlines() or [""])[0].strip()


def time_parallel(tasks: int, slots: int) -> float:
    """``parallel -jW true ::: 0 .. N-1``."""
    return timed_command([gnu_parallel(), f"-j{slots}", "true", ":::",
                          *map(str, range(tasks))], bound_for(tasks))


def time_xargs(tasks: int, slots: int) -> float:
    """``xargs -P W -n1 true``, fed N lines."""
    exe = shutil.which("xargs")
    if exe is None:
        raise Unavailable("xargs is not installed (apt-get install findutils)")
    return timed_command([exe, "-P", str(slots), "-n1", "true"], bound_for(tasks),
                         "".join(f"{i}\n" for i in range(tasks)))


@dataclass(frozen=True)
class EcloudRun:
    seconds: float  # workers started -> last worker gone
    setup_seconds: float  # boss init + push of the N tasks + worker registration


def write_true_tasks(path: Path, tasks: int, prefix: str = "t") -> None:
    with path.open("w") as f:
        for i in range(tasks):
            f.write(json.dumps({"name": f"{prefix}{i}", "commands": [{"command": ["true"]}]})
                    + "\n")


def time_ecloud(tasks: int, slots: int, workers: int = 1,
                reach: Callable[[int], list[str]] | None = None) -> EcloudRun:
    """N `true` tasks through ``boss serve`` and ``worker run --burst`` subprocesses.

    ``reach(port)``: the worker's arguments that say how to reach the boss on
    that RPC port (default ``--boss tcp://127.0.0.1:PORT``; ssh_tunnels.py
    passes an ssh:// URL and its key).
    """
    from boss.service import Boss
    from protocol.settings import load_settings

    if slots % workers:
        raise BenchError(f"{slots} slots do not split evenly over {workers} workers")
    per_worker = slots // workers
    bound = bound_for(tasks)
    with tempfile.TemporaryDirectory(prefix="ecloud-bench-") as tmp:
        root = Path(tmp)
        port = free_port()
        toml = root / "ecloud.toml"
        toml.write_text(f'[boss]\nlisten = "127.0.0.1:{port}"\n'
                        "[worker]\npoll_seconds = 0.05\n")
        settings = load_settings(str(toml), environ={}, cwd=root)
        src = root / "tasks.jsonl"
        write_true_tasks(src, tasks)
        start = time.perf_counter()
        boss = Boss(settings)
        tokens: list[Path] = []
        try:
            boss.init()
            boss.push(src)
            for i in range(workers):
                _, _, token = boss.add_worker(name=f"bench-{i}", slots=per_worker)
                tokens.append(root / f"worker{i}.token")
                tokens[-1].touch(mode=0o600)
                tokens[-1].write_text(token + "\n")
        finally:
            boss.close()
        setup = time.perf_counter() - start
        env = scrubbed_env(ECLOUD_SETTINGS=str(toml))
        with stopping([]) as procs:
            log = root / "serve.log"
            with log.open("w") as serve_out:
                procs.append(spawn([str(BIN / "boss"), "serve", "--no-autoscale"], cwd=root,
                                   env=env, stdout=serve_out, stderr=subprocess.STDOUT))
            wait_listening(port, procs[0], log, 60, "boss serve")
            outs: list[IO[str]] = []  # each worker's stdout (its JSON summary)
            logs: list[IO[str]] = []
            try:
                start = time.perf_counter()
                for i, token_file in enumerate(tokens):
                    outs.append((root / f"worker{i}.out").open("w+"))
                    logs.append((root / f"worker{i}.log").open("w"))
                    procs.append(spawn(
                        [str(BIN / "worker"), "run",
                         *(reach(port) if reach else ["--boss", f"tcp://127.0.0.1:{port}"]),
                         "--token-file", str(token_file), "--burst", "--slots",
                         str(per_worker)], cwd=root, env=env, stdout=outs[-1],
                        stderr=logs[-1]))
                deadline = start + bound
                for p in procs[1:]:
                    try:
                        p.wait(max(0.1, deadline - time.perf_counter()))
                    except subprocess.TimeoutExpired:
                        raise BenchError(f"ecloud: {tasks} tasks not done in {bound:.0f} s; "
                                         f"stopped. {ecloud_state(settings, root)}") from None
                seconds = time.perf_counter() - start
                summaries = []
                for i, (p, out) in enumerate(zip(procs[1:], outs, strict=True)):
                    out.seek(0)
                    text = out.read()
                    if p.returncode != 0:
                        raise BenchError(f"worker {i} exited {p.returncode}: {text}\n"
                                         + tail(root / f"worker{i}.log"))
                    summaries.append(json.loads(text.strip().splitlines()[-1]))
            finally:
                for f in [*outs, *logs]:
                    f.close()
        succeeded = sum(int(s["succeeded"]) for s in summaries)
        boss = Boss(settings)
        try:
            counts = boss.status()["tasks"]
        finally:
            boss.close()
        if succeeded != tasks or counts.get("succeeded") != tasks:
            raise BenchError(f"ecloud: {tasks} tasks, but the workers report {summaries} "
                             f"and the boss counts {counts}")
    return EcloudRun(seconds, setup)


def ecloud_state(settings: Any, root: Path) -> str:
    """What the boss's database and the logs say (for a run that did not finish)."""
    from boss.service import Boss

    try:
        boss = Boss(settings)
        try:
            counts = {k: v for k, v in boss.status()["tasks"].items() if v}
        finally:
            boss.close()
    except Exception as exc:  # a diagnostic: whatever went wrong, say it and go on
        counts = {"unreadable": repr(exc)}
    logs = "".join(f"\n--- {p.name}:\n{tail(p)}" for p in sorted(root.glob("*.log")))
    return f"Task counts: {counts}{logs}"


# --- the benchmark ------------------------------------------------------------------------

def median_or_none(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def measure(tasks: int, slots_list: list[int], workers: int, repeat: int,
            runners: list[str]) -> Report:
    seconds: dict[tuple[int, str], list[float]] = {(w, r): [] for w in slots_list for r in runners}
    setup: dict[int, list[float]] = {w: [] for w in slots_list}
    missing: dict[str, str] = {}
    failed: dict[tuple[int, str], str] = {}
    contenders: dict[str, Callable[[int, int], float]] = {
        "ecloud": lambda n, w: _ecloud_seconds(n, w, workers, setup[w]),
        "parallel": time_parallel,
        "xargs": time_xargs,
    }
    for rep in range(repeat):
        for w in slots_list:
            for name in runners:
                if name in missing or (w, name) in failed:
                    continue
                try:
                    s = contenders[name](tasks, w)
                except Unavailable as exc:
                    missing[name] = str(exc)
                    continue
                except BenchError as exc:
                    failed[(w, name)] = str(exc)
                    print(f"shell_tasks: W={w} {name}: FAILED: {exc}", file=sys.stderr)
                    continue
                seconds[(w, name)].append(s)
                print(f"shell_tasks: run {rep + 1}/{repeat} W={w} {name}: {s:.2f} s "
                      f"({tasks / s:,.0f} tasks/s)", file=sys.stderr, flush=True)
    rows: list[dict[str, Cell]] = []
    notes: list[str] = []
    for w in slots_list:
        ecl, par = seconds.get((w, "ecloud"), []), seconds.get((w, "parallel"), [])
        pairs = list(zip(ecl, par, strict=False))
        ratio = median_or_none([p / e for e, p in pairs])
        for name in runners:
            xs = seconds[(w, name)]
            how = {"ecloud": f"{workers} worker{'s' if workers > 1 else ''} x "
                             f"{w // workers} slots, boss serve",
                   "parallel": f"parallel -j{w} true ::: ...",
                   "xargs": f"xargs -P {w} -n1 true"}[name]
            row: dict[str, Cell] = {"W": w, "contender": name, "how": how, "runs": len(xs)}
            if xs:
                med = statistics.median(xs)
                row.update({"median s": med, "min s": min(xs), "max s": max(xs),
                            "tasks/s": round(tasks / med)})
                if name == "ecloud":
                    row["setup s"] = median_or_none(setup[w])
                    row["vs parallel"] = ratio
            else:
                row["status"] = (f"not available: {missing[name]}" if name in missing
                                 else f"failed: {failed.get((w, name), 'no run')}")
            rows.append(row)
        if ratio is not None:
            verdict = ("met" if ratio >= GOAL_RATIO else "NOT met") + (
                ", stretch met" if ratio >= STRETCH_RATIO else "")
            notes.append(f"W={w}: ecloud's throughput is {ratio:.2f}x GNU parallel's "
                         f"(median of {len(pairs)} paired runs); goal >= {GOAL_RATIO:.1f}x: "
                         f"{verdict} (stretch {STRETCH_RATIO:.0f}x)")
    notes.append("vs parallel: parallel's seconds / ecloud's, per run, median. ecloud's time "
                 "runs from starting the workers to the last one leaving; setup s (boss init, "
                 "push, add-worker) is not in it.")
    columns = ["W", "contender", "how", "runs", "median s", "min s", "max s", "tasks/s",
               "vs parallel", "setup s", "status"]
    used = [c for c in columns if any(c in r for r in rows)]
    return Report(title=f"shell_tasks: {tasks:,} `true` tasks, W slots, {repeat} run(s) each",
                  columns=used, rows=rows, notes=notes)


def _ecloud_seconds(tasks: int, slots: int, workers: int, setup: list[float]) -> float:
    got = time_ecloud(tasks, slots, workers)
    setup.append(got.setup_seconds)
    return got.seconds


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shell_tasks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10_000, help="N (default 10,000)")
    ap.add_argument("--slots", type=int, nargs="+", default=[2, 8],
                    help="W: slots in all, one run per value (default 2 8)")
    ap.add_argument("--workers", type=int, default=1,
                    help="ecloud workers sharing the W slots (default 1: one worker, W slots)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    ap.add_argument("--runners", nargs="+", choices=RUNNERS, default=list(RUNNERS),
                    help="contenders to run (default all)")
    return ap


def run(argv: list[str]) -> Report:
    args = parser().parse_args(argv)
    if args.tasks < 1 or args.repeat < 1 or args.workers < 1 or min(args.slots) < 1:
        raise SystemExit("shell_tasks: --tasks, --repeat, --workers and --slots must be >= 1")
    report = measure(args.tasks, args.slots, args.workers, args.repeat, args.runners)
    if any(str(r.get("status", "")).startswith("failed") for r in report["rows"]):
        print_report(report, sys.stderr)
        raise SystemExit("shell_tasks: a run failed (see the table above)")
    return report


def main(argv: list[str] | None = None) -> int:
    print_report(run(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
