"""Claim + complete throughput through the boss service, on SQLite and PostgreSQL.

Pushes N independent tasks into a fresh database, then W worker threads (one
registered worker each) loop ``Boss.claim(worker, B)`` and
``Boss.complete_many(...)`` of what they got (each a single transaction, as
the RPC server runs them) until the queue is empty. Prints tasks per second
for each batch size B; checks at the end that every task succeeded exactly
once.

    .venv/bin/python benchmarks/claim_throughput.py                  # SQLite, B = 1 and 10
    .venv/bin/python benchmarks/claim_throughput.py --postgres       # a temporary PostgreSQL 15
    .venv/bin/python benchmarks/claim_throughput.py --tasks 20000 --batch 1 10 --threads 1 4
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# a script, not a package module: make the repository importable (boss, tests.pg)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from benchmarks.push_1m import settings_for, start_postgres  # noqa: E402
from boss.service import Boss  # noqa: E402
from protocol.messages import Result  # noqa: E402

# benchmarks/run.py registers this script (see the contract there)
NAME = "claim_throughput"
TINY_ARGS = ["--tasks", "300"]


def write_tasks(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(f'{{"name":"c{i}","commands":[{{"command":["true"]}}]}}\n')


def drain(boss: Boss, workers: list[int], batch: int,
          limit: int | None = None) -> tuple[int, float]:
    """Claim and complete until nothing is left (or each worker did ``limit``);
    return (tasks done, seconds)."""
    done = [0] * len(workers)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        wid = workers[k]
        try:
            while limit is None or done[k] < limit:
                got = boss.claim(wid, batch)
                if not got:
                    return
                boss.complete_many([(wid, Result(a.attempt_id, "succeeded", exit_status=0,
                                                 metrics={"wall": 0.0})) for a in got])
                done[k] += len(got)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(workers))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(done), seconds


def check(db_url: str, n: int) -> None:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            states: dict[str, int] = dict(conn.execute(
                text("SELECT state, count(*) FROM tasks GROUP BY state")).all())
            attempts = conn.execute(text("SELECT count(*) FROM attempts")).scalar_one()
    finally:
        engine.dispose()
    if states != {"succeeded": n} or attempts != n:
        raise SystemExit(f"WRONG: task states {states}, {attempts} attempts for {n} tasks")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--threads", type=int, nargs="+", default=[1],
                    help="worker threads claiming at once (each its own worker)")
    ap.add_argument("--postgres", action="store_true",
                    help="start a temporary PostgreSQL server (tests/pg.py) and use it")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="ecloud-claim-bench-"))
    server: Any = None
    try:
        src = tmp / "tasks.jsonl"
        write_tasks(src, args.tasks)
        if args.postgres:
            _, server = start_postgres(tmp)
        print(f"{'engine':10} {'threads':>7} {'batch':>5} {'tasks':>7} {'wall':>8} "
              f"{'tasks/s':>9} {'ms/call pair':>12}")
        run = 0
        for threads in args.threads:
            for batch in args.batch:
                run += 1
                if server is not None:
                    server.psql(f"CREATE DATABASE claim{run}")
                    db_url = server.url(f"claim{run}")
                else:
                    db_url = f"sqlite:///{tmp}/claim{run}.db"
                boss = Boss(settings_for(tmp, db_url))
                try:
                    boss.init()
                    boss.push(src)
                    workers = [boss.add_worker(slots=batch)[0] for _ in range(threads)]
                    done, seconds = drain(boss, workers, batch)
                finally:
                    boss.close()
                check(db_url, args.tasks)
                assert done == args.tasks
                pairs = -(-done // batch)  # claim + complete_many calls per thread, roughly
                engine = "postgresql" if server is not None else "sqlite"
                print(f"{engine:10} {threads:>7} {batch:>5} {done:>7} {seconds:>7.2f}s "
                      f"{done / seconds:>9,.0f} {seconds * 1000 * threads / pairs:>12.2f}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
