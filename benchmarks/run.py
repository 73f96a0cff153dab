"""Run one benchmark by name and print its figures: ``benchmarks/run.py NAME``.

    .venv/bin/python benchmarks/run.py --list
    .venv/bin/python benchmarks/run.py shell_tasks                   # full size, medians of 3
    .venv/bin/python benchmarks/run.py shell_tasks --size tiny       # seconds (the tests run it)
    .venv/bin/python benchmarks/run.py peers --repeat 3 --tasks 2000
    .venv/bin/python benchmarks/run.py watch_1m --json -- --repeat 20

Options of run.py itself: ``--size tiny|full`` (default ``full``), ``--repeat N``
and ``--json``. Every other argument, and everything after ``--``, goes to the
benchmark, after the arguments of the size, so they override them. A
benchmark's own ``--repeat`` (watch_1m's, say) has to come after ``--``.

The figures come with a header naming the exact command, the date, the commit,
the load average and the machine, ready to be copied into RESULTS.md; with
``--json`` all of it is one JSON document on stdout, and what the benchmark
prints goes to stderr. run.py exits 0 when the benchmark ran (a goal it misses
is a figure, not an error) and 1 when it failed.

The contract of a benchmark module
----------------------------------
Any ``benchmarks/*.py`` that defines the following at top level is
registered; it is found by reading the file (nothing is imported until it
runs), so adding a benchmark needs no edit here:

    NAME = "shell_tasks"               the name given to run.py (unique)
    TINY_ARGS = ["--tasks", "30"]      argv of the tiny run: seconds; the test suite runs it
    def main(argv: list[str] | None = None) -> int
                                       parse argv as the script's command line, measure,
                                       print the figures on stdout, return 0

Optional:

    FULL_ARGS = [...]                  argv of the full run (default: none, the defaults)
    REPEATS = True                     main takes ``--repeat N`` and reports medians
                                       itself; without it run.py calls main N times
    GOAL_MISSED_EXIT = 1               the status main returns for "measured, and the goal
                                       is missed": reported as such, not as a failure
    def run(argv: list[str]) -> Report
                                       the figures as data; run.py then calls it instead of
                                       main and prints the table (or the JSON) itself

``NAME``, ``TINY_ARGS``, ``FULL_ARGS``, ``REPEATS`` and ``GOAL_MISSED_EXIT`` must
be literals. A module's ``main`` also serves ``python benchmarks/NAME.py``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import importlib
import io
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypedDict

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZES = ("tiny", "full")

Cell = str | int | float | None


class Report(TypedDict):
    """A benchmark's figures: one table (rows keyed by column) and notes under it."""

    title: str
    columns: list[str]
    rows: list[dict[str, Cell]]
    notes: list[str]


@dataclass(frozen=True)
class Benchmark:
    """A registered module, as read from its source."""

    name: str
    module: str  # importable name, e.g. "benchmarks.shell_tasks"
    path: Path
    summary: str
    tiny_args: list[str]
    full_args: list[str] = field(default_factory=list)
    repeats: bool = False
    goal_missed_exit: int | None = None
    has_run: bool = False

    def argv(self, size: str) -> list[str]:
        return list(self.tiny_args if size == "tiny" else self.full_args)


class Interrupted(BaseException):
    """SIGTERM or SIGINT: unwind, so that every ``finally`` stops what it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    # once: a second signal acts as usual (terminates, or KeyboardInterrupt)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise Interrupted(signum)


class RegistryError(Exception):
    """A module in benchmarks/ breaks the contract (bad literal, duplicate NAME)."""


def _literal(node: ast.expr, name: str, path: Path) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise RegistryError(f"{path.name}: {name} must be a literal") from None


def read_module(path: Path) -> Benchmark | None:
    """The benchmark a file defines, or None when it is not one (no NAME / TINY_ARGS / main)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    values: dict[str, Any] = {}
    functions: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions.add(node.name)
            continue
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in {
                "NAME", "TINY_ARGS", "FULL_ARGS", "REPEATS", "GOAL_MISSED_EXIT"}:
            values[target.id] = _literal(value, target.id, path)
    if "NAME" not in values or "TINY_ARGS" not in values or "main" not in functions:
        return None
    name, tiny, full = values["NAME"], values["TINY_ARGS"], values.get("FULL_ARGS", [])
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{path.name}: NAME must be a non-empty string")
    for key, argv in (("TINY_ARGS", tiny), ("FULL_ARGS", full)):
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise RegistryError(f"{path.name}: {key} must be a list of strings")
    doc = ast.get_docstring(tree) or ""
    return Benchmark(name=name, module=f"benchmarks.{path.stem}", path=path,
                     summary=doc.strip().split("\n", 1)[0], tiny_args=tiny, full_args=full,
                     repeats=bool(values.get("REPEATS", False)),
                     goal_missed_exit=values.get("GOAL_MISSED_EXIT"),
                     has_run="run" in functions)


def discover(directory: Path = HERE) -> dict[str, Benchmark]:
    """Every benchmark module in ``directory``, by NAME."""
    found: dict[str, Benchmark] = {}
    for path in sorted(directory.glob("*.py")):
        if path.name == Path(__file__).name or path.name.startswith("_"):
            continue
        bench = read_module(path)
        if bench is None:
            continue
        if bench.name in found:
            raise RegistryError(f"NAME {bench.name!r} is defined by both "
                                f"{found[bench.name].path.name} and {path.name}")
        found[bench.name] = bench
    return found


# --- rendering ----------------------------------------------------------------------------

def format_cell(value: Cell) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return value


def render_table(report: Report) -> str:
    """A Markdown table (pastes into RESULTS.md as is), its title above, its notes below."""
    cols = report["columns"]
    cells = [[format_cell(row.get(c)) for c in cols] for row in report["rows"]]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    out = [report["title"], "", line(cols), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    if report["notes"]:
        out += ["", *report["notes"]]
    return "\n".join(out)


def print_report(report: Report, file: TextIO | None = None) -> None:
    print(render_table(report), file=file or sys.stdout, flush=True)


# --- running ------------------------------------------------------------------------------

class _Tee(io.TextIOBase):
    """Writes to a stream and keeps a copy (what a benchmark printed, for --json)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.copy.write(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # SystemExit("message"), as sys.exit prints it
    return 1


def _call(fn: Callable[[], object]) -> tuple[int, object]:
    """Call fn; its exit status (SystemExit and exceptions turned into statuses) and result."""
    try:
        result = fn()
    except SystemExit as exc:
        return _exit_status(exc.code), None
    except Exception:
        traceback.print_exc()
        return 1, None
    return (result if isinstance(result, int) else 0), result


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def context(command: str) -> dict[str, Any]:
    """Where and when a figure was measured."""
    return {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": _git("describe", "--always", "--dirty"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.platform(terse=True),
    }


def header(ctx: dict[str, Any]) -> str:
    load = " ".join(f"{x:.2f}" for x in ctx["load_average"])
    return (f"# {ctx['command']}\n# {ctx['date']}, commit {ctx['commit']}, load average "
            f"{load}, {ctx['cpus']} CPUs, Python {ctx['python']}, {ctx['system']}")


def run_benchmark(bench: Benchmark, argv: list[str], repeat: int | None,
                  as_json: bool) -> tuple[int, dict[str, Any]]:
    """Run one benchmark in this process; its exit status and what --json prints."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module(bench.module)
    if repeat is not None and bench.repeats:
        argv, times = [*argv, "--repeat", str(repeat)], 1
    else:
        times = repeat or 1
    shown: TextIO = sys.stderr if as_json else sys.stdout
    runs: list[dict[str, Any]] = []
    for i in range(times):
        if times > 1:
            print(f"## run {i + 1} of {times}", file=shown, flush=True)
        tee = _Tee(shown)
        start = time.perf_counter()
        with contextlib.redirect_stdout(tee):
            if bench.has_run:
                status, result = _call(lambda: module.run(argv))
            else:
                status, result = _call(lambda: module.main(argv))
        seconds = time.perf_counter() - start
        record: dict[str, Any] = {"exit": status, "seconds": round(seconds, 3),
                                  "output": tee.copy.getvalue()}
        if bench.has_run and status == 0 and isinstance(result, dict):
            record["report"] = result
            if not as_json:
                print_report(result)  # type: ignore[arg-type]
        if status != 0 and status == bench.goal_missed_exit:
            record["goal_missed"] = True
        runs.append(record)
    ok = all(r["exit"] == 0 or r.get("goal_missed") for r in runs)
    if times > 1:
        walls = [r["seconds"] for r in runs]
        print(f"## {times} runs: wall median {statistics.median(walls):.2f} s, "
              f"min {min(walls):.2f} s, max {max(walls):.2f} s", file=shown)
    for r in runs:
        if r.get("goal_missed"):
            print(f"## {bench.name}: measured; the goal is missed (exit {r['exit']})",
                  file=shown)
    return (0 if ok else 1), {"argv": argv, "runs": runs}


def list_benchmarks(registry: dict[str, Benchmark]) -> str:
    width = max([len(n) for n in registry] or [4])
    lines = []
    for name, b in sorted(registry.items()):
        lines.append(f"{name:<{width}}  {b.summary}")
        lines.append(f"{'':<{width}}    {b.path.name}; tiny: {shlex.join(b.tiny_args)}")
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        own, passthrough = argv[:cut], argv[cut + 1:]
    else:
        own, passthrough = argv, []
    ap = argparse.ArgumentParser(
        prog="benchmarks/run.py", allow_abbrev=False,
        description="Run one benchmark and print its figures (see the module docstring).")
    ap.add_argument("name", nargs="?", help="benchmark NAME (see --list)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--size", choices=SIZES, default="full",
                    help="tiny: seconds (what the tests run); full: the published figure")
    ap.add_argument("--repeat", type=int, help="runs to take the median of")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args, extra = ap.parse_known_args(own)
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if not args.list and not args.name:
        ap.error("give a benchmark NAME, or --list")
    return args, [*extra, *passthrough]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parse(argv)
    try:
        registry = discover()
    except (RegistryError, SyntaxError) as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 1
    if args.list:
        if args.json:
            print(json.dumps({n: {"summary": b.summary, "file": b.path.name,
                                  "tiny_args": b.tiny_args, "full_args": b.full_args}
                              for n, b in sorted(registry.items())}, indent=2))
        else:
            print(list_benchmarks(registry))
        return 0
    bench = registry.get(args.name)
    if bench is None:
        print(f"run.py: no benchmark named {args.name!r}; there are: "
              f"{', '.join(sorted(registry))}", file=sys.stderr)
        return 2
    bench_argv = [*bench.argv(args.size), *extra]
    ctx = context(shlex.join([".venv/bin/python", "benchmarks/run.py", *argv]))
    ctx.update(name=bench.name, size=args.size)
    if not args.json:
        print(header(ctx), flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        status, result = run_benchmark(bench, bench_argv, args.repeat, args.json)
    except Interrupted as exc:
        print(f"run.py: {bench.name} interrupted by signal {exc.signum}; what it started "
              "is stopped", file=sys.stderr)
        return 128 + exc.signum
    if args.json:
        print(json.dumps({**ctx, **result, "exit": status}, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
