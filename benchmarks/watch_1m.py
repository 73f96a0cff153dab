"""How long one refresh of `boss watch` (and `boss admin status`) takes with 1M tasks.

Pushes N tasks (the push_1m.py generator: 1.1 N edges) into a fresh SQLite
database, then times ``Boss.dashboard()`` (everything one frame of `boss
watch` reads) and ``Boss.status()`` (`boss admin status`), each ``--repeat``
times, and prints the median and the worst. Goal: under 100 ms each at 1M.

    .venv/bin/python benchmarks/watch_1m.py
    .venv/bin/python benchmarks/watch_1m.py --tasks 10000 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.push_1m import generate, settings_for  # noqa: E402
from boss.service import Boss  # noqa: E402

# benchmarks/run.py registers this script (see the contract there)
NAME = "watch_1m"
TINY_ARGS = ["--tasks", "2000", "--repeat", "3"]

GOAL_MS = 100.0


def timed(fn: object, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - start) * 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ecloud-watch-") as tmp:
        work = Path(tmp)
        path = work / "tasks.jsonl"
        generate(path, args.tasks, 0)
        boss = Boss(settings_for(work, f"sqlite:///{work}/boss.db"))
        boss.init()
        start = time.perf_counter()
        boss.push(path)
        print(f"pushed {args.tasks} tasks in {time.perf_counter() - start:.1f} s")
        try:
            for name, fn in (("dashboard (boss watch)", boss.dashboard),
                             ("status (boss admin status)", boss.status)):
                ms = timed(fn, args.repeat)
                verdict = "met" if statistics.median(ms) <= GOAL_MS else "MISSED"
                print(f"{name}: median {statistics.median(ms):.1f} ms, worst {max(ms):.1f} ms "
                      f"over {args.repeat} runs (goal {GOAL_MS:.0f} ms: {verdict})")
        finally:
            boss.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
