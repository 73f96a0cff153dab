"""Push a million tasks with a million dependencies, through the real push path.

Writes N task documents as JSON lines into a temporary directory: every task
but the first has one ``after`` edge to an earlier task, and every tenth task
writes an output that a task a few lines later reads (an edge implied by
data), so N tasks carry about 1.1 N edges. Then it pushes the file into a
fresh, migrated database with ``Boss(settings).push(path)`` (the code behind
``boss push-tasks``), prints wall time and peak memory, and checks the
counts in the database. Goal: 1M tasks + 1M edges in under 10 s on SQLite.

    .venv/bin/python benchmarks/push_1m.py                      # 1M tasks, SQLite
    .venv/bin/python benchmarks/push_1m.py --tasks 100000
    .venv/bin/python benchmarks/push_1m.py --postgres           # a temporary PostgreSQL 15
    .venv/bin/python benchmarks/push_1m.py --db-url postgresql+psycopg://u@host/db
    .venv/bin/python benchmarks/push_1m.py --cli                # `boss push-tasks` subprocess
    .venv/bin/python benchmarks/push_1m.py --pad 2000           # bigger documents, same memory

Peak RSS is ``ru_maxrss`` of the process that pushes: this one (the file is
written by streaming, so the generator costs nothing) or, with ``--cli``, the
``boss`` child. "Bounded" means memory grows with the graph index (a few
integers and the name of each task), never with the documents: ``--pad``
makes every document kilobytes larger and the peak must not move.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# a script, not a package module: make the repository importable (boss, tests.pg)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from boss.service import Boss  # noqa: E402
from protocol.settings import Settings, absolutize  # noqa: E402

# benchmarks/run.py registers this script (see the contract there)
NAME = "push_1m"
TINY_ARGS = ["--tasks", "2000"]

GOAL_SECONDS = 10.0
IMPLIED_EVERY = 10  # every tenth task writes an output read IMPLIED_LAG lines later
IMPLIED_LAG = 3
AFTER_WINDOW = 1000  # a task's `after` parent is one of the previous 1000 tasks


@dataclass
class Expected:
    tasks: int
    edges: int
    outputs: int
    ready: int
    file_bytes: int


def generate(path: Path, n: int, pad: int, seed: int = 1) -> Expected:
    """Write n JSON lines; return what the database must hold after the push."""
    rng = random.Random(seed)
    edges = outputs = 0
    env = f',"env":{{"PAD":"{"x" * pad}"}}' if pad else ""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            # json.dumps would take longer than the push; the values here need no escaping
            doc = [f'{{"name":"t{i}","commands":[{{"command":["sim","--seed","{i}",'
                   '"--out","result"],"stdout":"log.txt"}]']
            parents: set[int] = set()
            if i > 0:
                p = rng.randrange(max(0, i - AFTER_WINDOW), i)
                doc.append(f',"after":["t{p}"]')
                parents.add(p)
            if i % IMPLIED_EVERY == 0:
                doc.append(f',"outputs":{{"data:res/{i}":"result"}}')
                outputs += 1
            if i >= IMPLIED_LAG and (i - IMPLIED_LAG) % IMPLIED_EVERY == 0:
                doc.append(f',"inputs":{{"data:res/{i - IMPLIED_LAG}":"input"}}')
                parents.add(i - IMPLIED_LAG)
            doc.append(env)
            doc.append("}\n")
            edges += len(parents)
            f.write("".join(doc))
    return Expected(n, edges, outputs, 1, path.stat().st_size)


def settings_for(workdir: Path, db_url: str) -> Settings:
    s = Settings.model_validate({
        "boss": {"database_url": db_url},
        "datastore": {"default": f"file://{workdir}/data",
                      "buckets": {"data": f"file://{workdir}/data"}},
        "worker": {"workdir": str(workdir / "work"), "cache_dir": str(workdir / "cache")},
    })
    return absolutize(s, workdir)


def rss_mb(ru_maxrss_kb: int) -> float:
    return ru_maxrss_kb / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process and of its ended children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def verify(db_url: str, want: Expected) -> dict[str, int]:
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            got = {
                "tasks": conn.execute(text("SELECT count(*) FROM tasks")).scalar_one(),
                "edges": conn.execute(text("SELECT count(*) FROM task_edges")).scalar_one(),
                "outputs": conn.execute(text("SELECT count(*) FROM task_outputs")).scalar_one(),
                "ready": conn.execute(
                    text("SELECT count(*) FROM tasks WHERE state = 'ready'")).scalar_one(),
                "pending_parents": conn.execute(
                    text("SELECT coalesce(sum(pending_parents), 0) FROM tasks")).scalar_one(),
            }
    finally:
        engine.dispose()
    expected = {"tasks": want.tasks, "edges": want.edges, "outputs": want.outputs,
                "ready": want.ready, "pending_parents": want.edges}
    if got != expected:
        raise SystemExit(f"WRONG database contents: got {got}, expected {expected}")
    return got


def start_postgres(root: Path) -> tuple[str, object]:
    """A throw-away PostgreSQL server (tests/pg.py) with PostgreSQL's default
    durability (every commit flushed), and a database URL in it."""
    from tests import pg

    server, why = pg.start(durable=True)
    if server is None:
        raise SystemExit(f"cannot start PostgreSQL: {why}")
    server.psql("CREATE DATABASE bench")
    return server.url("bench"), server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--db-url", help="database URL (default: a fresh SQLite file)")
    ap.add_argument("--postgres", action="store_true",
                    help="start a temporary PostgreSQL server (tests/pg.py) and use it")
    ap.add_argument("--cli", action="store_true",
                    help="push with a `boss push-tasks` subprocess instead of in-process")
    ap.add_argument("--pad", type=int, default=0,
                    help="add this many bytes to every document (memory must not grow)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="ecloud-push-bench-"))
    server = None
    try:
        db_url = args.db_url or f"sqlite:///{tmp}/boss.db"
        if args.postgres:
            db_url, server = start_postgres(tmp)
        engine_name = db_url.split(":", 1)[0].split("+", 1)[0]
        src = tmp / "tasks.jsonl"
        t0 = time.perf_counter()
        want = generate(src, args.tasks, args.pad)
        print(f"generated {want.tasks:,} tasks, {want.edges:,} edges, "
              f"{want.file_bytes / 2**20:.1f} MiB of JSON lines in "
              f"{time.perf_counter() - t0:.1f} s")

        settings = settings_for(tmp, db_url)
        boss = Boss(settings)
        boss.init()
        boss.close()
        gc.collect()

        if args.cli:
            env = {**os.environ, "ECLOUD_BOSS_DATABASE_URL": db_url}
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            proc = subprocess.run([str(Path(sys.executable).parent / "boss"),
                                   "push-tasks", "--json", str(src)],
                                  env=env, cwd=tmp, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"boss push-tasks failed:\n{proc.stderr}")
            result = json.loads(proc.stdout)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if peak <= before:
                print("(peak RSS of the child is not above an earlier child's; "
                      "figure is a lower bound)")
            base_mb = None
            cpu = None
        else:
            base_mb = current_rss_mb()
            boss = Boss(settings)
            self0, kids0 = cpu_seconds()
            start = time.perf_counter()
            res = boss.push(src)
            wall = time.perf_counter() - start
            self1, kids1 = cpu_seconds()
            cpu = (self1 - self0, kids1 - kids0)
            boss.close()
            result = res.__dict__
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        got = verify(db_url, want)
        print(f"engine        {engine_name}{' (boss push-tasks subprocess)' if args.cli else ''}")
        print(f"pushed        {result['pushed']:,} tasks, {result['edges']:,} edges, "
              f"{result['ready']:,} ready")
        print(f"database      {got}")
        print(f"wall          {wall:.2f} s  ({want.tasks / wall:,.0f} tasks/s, "
              f"{(want.tasks + want.edges) / wall:,.0f} rows/s tasks+edges)")
        if cpu is not None:
            # on a shared machine the wall time is the share of the cores the push got;
            # the CPU seconds are what it needed
            print(f"cpu           {cpu[0] + cpu[1]:.2f} s: {cpu[0]:.2f} s planning and "
                  f"writing (this process), {cpu[1]:.2f} s checking (helper processes); "
                  f"load average {os.getloadavg()[0]:.2f}")
        peak_line = f"peak RSS      {rss_mb(peak):.0f} MB"
        if base_mb is not None:
            peak_line += (f" (process before the push: {base_mb:.0f} MB; "
                          f"push added {rss_mb(peak) - base_mb:.0f} MB = "
                          f"{(rss_mb(peak) - base_mb) * 2**20 / want.tasks:.0f} B/task)")
        print(peak_line)
        verdict = "met" if wall < GOAL_SECONDS else f"missed by {wall - GOAL_SECONDS:.2f} s"
        if engine_name == "sqlite" and args.tasks >= 1_000_000:
            print(f"goal          < {GOAL_SECONDS:.0f} s for 1M tasks + 1M edges: {verdict}")
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
