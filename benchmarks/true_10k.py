"""10,000 `true` tasks on local workers (2 slots in all) vs `parallel -j2 true`.

Usage: .venv/bin/python benchmarks/true_10k.py [--tasks N] [--workers W] [--slots S] [--repeat R]

An alias of benchmark 1 (shell_tasks.py), kept for the commands in RESULTS.md:
W workers with S slots each against ``parallel -j(W*S)``, one run unless
``--repeat``. It runs ``shell_tasks --tasks N --workers W --slots W*S
--runners ecloud parallel``; see shell_tasks.py for what is measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import shell_tasks  # noqa: E402
from benchmarks.run import Report  # noqa: E402

NAME = "true_10k"
TINY_ARGS = ["--tasks", "20"]
REPEATS = True


def shell_tasks_argv(argv: list[str]) -> list[str]:
    """This script's arguments as shell_tasks arguments."""
    ap = argparse.ArgumentParser(prog="true_10k", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--slots", type=int, default=2, help="slots of each worker")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    return ["--tasks", str(args.tasks), "--workers", str(args.workers),
            "--slots", str(args.workers * args.slots), "--repeat", str(args.repeat),
            "--runners", "ecloud", "parallel"]


def run(argv: list[str]) -> Report:
    return shell_tasks.run(shell_tasks_argv(argv))


def main(argv: list[str] | None = None) -> int:
    return shell_tasks.main(shell_tasks_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
