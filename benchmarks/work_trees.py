"""What the filesystem of the worker's workdir charges per task: new files, directories, trees.

    .venv/bin/python benchmarks/run.py work_trees                    # in .ecloud/work's filesystem
    .venv/bin/python benchmarks/run.py work_trees -- --dir /dev/shm  # compare with tmpfs

Times, one operation after another in a fresh directory under ``--dir``
(default: a temporary directory beside the worker's default workdir), the
operations an attempt costs the worker before and after its command:

- ``create``: a new empty file (``os.open`` with ``O_CREAT``), as staging an
  input into the work directory and opening a log file make one;
- ``mkdir``, ``rename``, ``link``, ``unlink``;
- ``tree``: an attempt's tree as the worker made it before 7f81e5f
  (``ATTEMPT/logs``, ``ATTEMPT/work``, two log files) and removed it
  (``shutil.rmtree``);
- ``kept tree``: the same attempt through worker/workdirs.py ``WorkTrees``:
  a kept tree renamed into place, its two log files truncated, checked clean
  and renamed aside again.

Prints the wall and CPU time per operation (median of ``--repeat`` rounds of
``--count`` operations each). No goal: these are the figures behind
benchmarks 1, 6 and 8's per-task costs (RESULTS.md, 2026-12-07).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# a script, not a package module: make the repository importable (worker, benchmarks.run)
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import Cell, Report, print_report  # noqa: E402
from worker.workdirs import Janitor, WorkTrees, filesystem_type  # noqa: E402

NAME = "work_trees"
TINY_ARGS = ["--count", "50", "--repeat", "1"]
REPEATS = True

Op = Callable[[Path, int], None]


def _create(d: Path, i: int) -> None:
    os.close(os.open(d / f"c{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def _setup_files(d: Path, count: int) -> None:
    for i in range(count):
        _create(d, i)


def _open_logs(root: Path) -> None:
    """What the command's run does to the tree: open (make or truncate) its two logs."""
    for name in ("0.stdout", "0.stderr"):
        open(root / "logs" / name, "wb").close()


def _tree(d: Path, i: int) -> None:
    root = d / str(i)
    (root / "logs").mkdir(parents=True)
    (root / "work").mkdir()
    _open_logs(root)
    shutil.rmtree(root)


def _kept(trees: WorkTrees) -> Op:
    def op(d: Path, i: int) -> None:
        root = d / str(i)
        trees.make(root)
        _open_logs(root)
        trees.done(root, reusable=True)
    return op


# name -> (set-up of the directory for ``count`` operations, the operation)
def _cases() -> dict[str, tuple[Callable[[Path, int], None] | None, Op]]:
    return {
        "create": (None, _create),
        "mkdir": (None, lambda d, i: os.mkdir(d / f"m{i}")),
        "rename": (_setup_files, lambda d, i: os.rename(d / f"c{i}", d / f"r{i}")),
        "link": (_setup_files, lambda d, i: os.link(d / f"c{i}", d / f"l{i}")),
        "unlink": (_setup_files, lambda d, i: os.unlink(d / f"c{i}")),
        "tree (made and removed)": (None, _tree),
        "kept tree (worker/workdirs.py)": (None, _kept(WorkTrees(Janitor()))),
    }


def _time(base: Path, setup: Callable[[Path, int], None] | None, op: Op,
          count: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per operation, in a fresh directory under ``base``."""
    d = Path(tempfile.mkdtemp(prefix="work-trees-", dir=base))
    try:
        if setup is not None:
            setup(d, count)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(count):
            op(d, i)
        return ((time.perf_counter() - wall) * 1e3 / count,
                (time.process_time() - cpu) * 1e3 / count)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(argv: list[str]) -> Report:
    parser = argparse.ArgumentParser(prog=NAME, description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(".ecloud"),
                        help="where to measure (its filesystem matters; default .ecloud)")
    parser.add_argument("--count", type=int, default=2000, help="operations per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are shown")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        parser.error("--count and --repeat must be at least 1")
    args.dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Cell]] = []
    for name, (setup, op) in _cases().items():
        rounds = [_time(args.dir, setup, op, args.count) for _ in range(args.repeat)]
        walls, cpus = [w for w, _ in rounds], [c for _, c in rounds]
        rows.append({"operation": name, "wall ms (median)": statistics.median(walls),
                     "cpu ms (median)": statistics.median(cpus),
                     "wall ms min-max": f"{min(walls):.3f}-{max(walls):.3f}"})
    fs = os.statvfs(args.dir)
    kind = filesystem_type(args.dir) or "unknown"
    return {"title": f"{NAME}: per operation, {args.count:,} operations x {args.repeat} "
                     f"round(s) under {args.dir.resolve()}",
            "columns": ["operation", "wall ms (median)", "cpu ms (median)", "wall ms min-max"],
            "rows": rows,
            "notes": [f"filesystem: {kind}, block size {fs.f_bsize}",
                      "cpu ms is this process's, kernel time included (what the worker pays)"]}


def main(argv: list[str] | None = None) -> int:
    print_report(run(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
