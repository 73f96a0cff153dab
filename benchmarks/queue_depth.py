"""Claim throughput with a deep queue: 1M tasks waiting against 10k (issue 6, benchmark 4).

For each queue depth Q, pushes Q independent ``true`` tasks into a fresh SQLite
database, then one worker claims and completes ``--measure`` of them, one task
per call (``Boss.claim`` + ``Boss.complete_many``, each one transaction, as the
RPC server runs them), in ``--repeat`` consecutive windows. Prints the median
rate per depth and the ratio of the deepest to the shallowest. Goal: with 1M
queued, at least 80% of the rate with 10k queued.

    .venv/bin/python benchmarks/queue_depth.py                       # Q = 10k and 1M
    .venv/bin/python benchmarks/queue_depth.py --queued 10000 100000 --measure 2000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.claim_throughput import drain, write_tasks  # noqa: E402
from benchmarks.push_1m import settings_for  # noqa: E402
from boss.service import Boss  # noqa: E402

# benchmarks/run.py registers this script (see the contract there)
NAME = "queue_depth"
TINY_ARGS = ["--queued", "500", "5000", "--measure", "200", "--repeat", "1"]

GOAL_RATIO = 0.8


def rates_at(tmp: Path, queued: int, measure: int, repeat: int, batch: int) -> list[float]:
    src = tmp / f"tasks-{queued}.jsonl"
    write_tasks(src, queued)
    boss = Boss(settings_for(tmp, f"sqlite:///{tmp}/q{queued}.db"))
    try:
        boss.init()
        start = time.perf_counter()
        boss.push(src)
        print(f"  pushed {queued:,} tasks in {time.perf_counter() - start:.1f} s", flush=True)
        worker = boss.add_worker(slots=batch)[0]
        out = []
        for _ in range(repeat):
            done, seconds = drain(boss, [worker], batch, limit=measure)
            out.append(done / seconds)
        return out
    finally:
        boss.close()
        src.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queued", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--measure", type=int, default=3000, help="tasks per window")
    ap.add_argument("--repeat", type=int, default=3, help="windows per depth")
    ap.add_argument("--batch", type=int, default=1, help="tasks per claim call")
    args = ap.parse_args(argv)
    if args.measure * args.repeat > min(args.queued):
        ap.error("--measure x --repeat must not exceed the smallest --queued")
    tmp = Path(tempfile.mkdtemp(prefix="ecloud-queue-depth-"))
    medians: dict[int, float] = {}
    try:
        for q in args.queued:
            rates = rates_at(tmp, q, args.measure, args.repeat, args.batch)
            medians[q] = statistics.median(rates)
            print(f"queued {q:>9,}: {medians[q]:7,.0f} tasks/s (median of "
                  f"{', '.join(f'{r:,.0f}' for r in rates)})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    low, high = min(args.queued), max(args.queued)
    ratio = medians[high] / medians[low]
    verdict = "met" if ratio >= GOAL_RATIO else "NOT met"
    print(f"ratio {high:,} / {low:,} queued: {ratio:.2f} (goal >= {GOAL_RATIO}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
