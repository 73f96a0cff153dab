"""Fault 6: the database goes away under a running boss, then comes back.

SQLite: another process takes an exclusive lock (``BEGIN EXCLUSIVE``) and
holds it several times longer than the boss's busy timeout, while workers
report results and ask for tasks and a user pushes more tasks. PostgreSQL:
the server is restarted (``pg_ctl restart -m fast``: every connection is
terminated, new ones are refused until it is up again) while workers run.

Each time the boss (`boss serve`, here in a thread of the test process with
real workers connected over loopback) must keep serving: say clearly in its
log that the database is unavailable and that it retries, retry, and once
the database is back let every task finish exactly once, nothing lost and
no retry spent. A push refused meanwhile says why and pushes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from boss import db, group_commit
from boss.errors import DatabaseError
from boss.server import Server
from boss.service import Boss
from protocol.settings import Settings
from tests import pg
from tests.bossd import serving
from tests.conftest import fresh_pg_url, make_settings
from tests.ports import free_port
from tests.waiting import wait_for
from worker.attempt import AttemptEnv
from worker.client import BossClient
from worker.daemon import Summary, Worker
from worker.transport import TcpTransport

TASKS = 300
WORKERS = 2
SLOTS = 2
BUSY_MS = 300  # the boss's SQLite busy timeout in this test (30 s in production)
LOCK_SECONDS = 3.0  # ten busy timeouts
BOUND = 60.0  # seconds; a bound on waiting, never an assertion about speed
BIN = Path(sys.executable).parent


def push(boss: Boss, path: Path, names: list[str]) -> None:
    path.write_text("".join(
        f'{{"name": "{n}", "commands": [{{"command": ["true"]}}]}}\n' for n in names),
        encoding="utf-8")
    boss.push(path)


class Run:
    """A boss, its workers (threads of this process, or none), and what they said."""

    def __init__(self, boss: Boss, server: Server | None) -> None:
        self.boss = boss
        self.server = server
        self.threads: list[threading.Thread] = []
        self.summaries: list[Summary] = []

    def start_workers(self) -> None:
        assert self.server is not None
        settings: Settings = self.boss.settings
        for n in range(WORKERS):
            _, _, token = self.boss.add_worker(name=f"w{n}", slots=SLOTS)
            client = BossClient(TcpTransport("127.0.0.1", self.server.port), token,
                                slots=SLOTS, give_up_after=BOUND)
            env = AttemptEnv(workdir_root=Path(settings.worker.workdir), cache=None,
                             buckets={}, default_url="", settings=settings.worker)
            worker = Worker(client, env, SLOTS, burst=True)
            thread = threading.Thread(target=lambda w=worker: self.summaries.append(w.run()),
                                      name=f"worker-{n}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        from sqlalchemy import text

        with self.boss.store.ro() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]

    def succeeded(self) -> int:
        return int(str(self.query(
            "SELECT count(*) FROM tasks WHERE state = 'succeeded'")[0][0]))

    def finish(self) -> dict[str, object]:
        for t in self.threads:
            t.join(BOUND)
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"workers still running after {BOUND:.0f} s: {alive}"
        return {
            "states": dict(self.query("SELECT state, count(*) FROM tasks GROUP BY state")),
            "attempts": dict(self.query(
                "SELECT state, count(*) FROM attempts GROUP BY state")),
            "most_succeeded_per_task": self.query(
                "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM attempts "
                "WHERE state = 'succeeded' GROUP BY task_id) AS per_task")[0][0],
            "tries_lost": self.query("SELECT sum(tries), sum(lost) FROM tasks")[0],
        }


def server_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records)


@pytest.fixture
def sqlite_boss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Boss]:
    # the busy timeout is a constant; shorten it so that a lock outlasts it in seconds
    monkeypatch.setattr(db, "SQLITE_BUSY_MS", BUSY_MS)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db")
    settings.worker.heartbeat_seconds = 0.3
    settings.worker.poll_seconds = 0.1
    boss = Boss(settings)
    boss.init()
    try:
        yield boss
    finally:
        boss.close()


LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("COMMIT")
print("released", flush=True)
"""


@pytest.mark.parametrize("boss_retries", [group_commit.DB_RETRY_SECONDS, 0.5],
                         ids=["boss-retries-through", "lock-outlasts-boss-retries"])
def test_sqlite_locked_longer_than_busy_timeout(sqlite_boss: Boss, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch,
                                                boss_retries: float) -> None:
    """With the boss's retries outlasting the lock, the workers never see it; with the
    lock outlasting them, the workers are told "unavailable" and retry by themselves."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(group_commit, "DB_RETRY_SECONDS", boss_retries)
    boss = sqlite_boss
    database = Path(str(boss.store.engine.url.database))
    push(boss, tmp_path / "first.jsonl", [f"a{i:03d}" for i in range(TASKS)])
    t0 = time.monotonic()
    with serving(boss) as server:
        run = Run(boss, server)
        run.start_workers()
        wait_for(lambda: run.succeeded() >= TASKS // 4, f"{TASKS // 4} tasks done", BOUND)
        locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(database),
                                   str(LOCK_SECONDS)], stdout=subprocess.PIPE, text=True)
        try:
            assert locker.stdout is not None
            assert locker.stdout.readline().strip() == "locked"
            locked_at = time.monotonic()
            done_at_lock = run.succeeded()
            # a push while the lock is held: refused whole, with the reason
            refused = ""
            try:
                push(boss, tmp_path / "second.jsonl", [f"b{i:03d}" for i in range(50)])
            except DatabaseError as exc:
                refused = str(exc)
            during = run.succeeded()
            released = locker.stdout.readline().strip()
            locker.wait(BOUND)
        finally:
            if locker.poll() is None:
                locker.kill()
                locker.wait()
            if locker.stdout is not None:
                locker.stdout.close()
        held = time.monotonic() - locked_at
        alive_after_lock = sum(t.is_alive() for t in run.threads)
        push(boss, tmp_path / "second.jsonl", [f"b{i:03d}" for i in range(50)])
        figures = run.finish()
    wall = time.monotonic() - t0
    log = server_log(caplog)
    retry_lines = [line for line in log.splitlines() if "retrying" in line]
    boss_lines = [line for line in retry_lines if "boss.group_commit" in line]
    worker_lines = [line for line in retry_lines if "worker.client" in line]
    gave_up = [line for line in log.splitlines() if "still unavailable" in line]
    print(f"\nfault 6, SQLite locked: {TASKS} + 50 tasks, {WORKERS} workers x {SLOTS} slots; "
          f"busy timeout {BUSY_MS} ms, lock held {held:.1f} s ({released}); the boss "
          f"retries a transaction for up to {boss_retries:g} s")
    print(f"  succeeded at the lock {done_at_lock}, while locked {during}; workers alive "
          f"after the lock {alive_after_lock}/{WORKERS}")
    print(f"  push during the lock: {refused or 'NOT refused'}")
    print(f"  boss log lines saying it retries: {len(boss_lines)}; first: "
          f"{boss_lines[0] if boss_lines else '-'}")
    print(f"  boss log lines saying it gave a batch up: {len(gave_up)}; worker log lines "
          f"saying they retry: {len(worker_lines)}; first: "
          f"{worker_lines[0] if worker_lines else '-'}")
    print(f"  after: {figures}; worker summaries "
          f"{[(s.ran, s.succeeded, s.refused, s.reason) for s in run.summaries]}")
    print(f"  wall {wall:.1f} s")

    assert "database is locked" in refused and "nothing was pushed" in refused, refused
    assert alive_after_lock == WORKERS, "a worker died while the database was locked"
    assert boss_lines and "database is locked" in boss_lines[0], log
    if boss_retries < LOCK_SECONDS:
        assert gave_up and worker_lines, "the lock outlasted the boss's retries unseen"
    else:
        assert not gave_up and not worker_lines, "the boss gave up within its retries"
    assert figures["states"] == {"succeeded": TASKS + 50}, figures
    assert figures["attempts"] == {"succeeded": TASKS + 50}, figures
    assert figures["most_succeeded_per_task"] == 1, figures
    assert tuple(figures["tries_lost"]) == (TASKS + 50, 0), figures  # type: ignore[arg-type]
    assert all(s.refused == 0 for s in run.summaries), run.summaries
    assert "Traceback" not in log




@pytest.mark.postgres
def test_postgresql_restarted_mid_run(pg_server: pg.PgServer, tmp_path: Path) -> None:
    """`boss serve` and `worker run` as the real processes; PostgreSQL restarted under them."""
    url = fresh_pg_url(pg_server)
    port = free_port()
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    (site / "ecloud.toml").write_text(
        f'[boss]\ndatabase_url = "{url}"\nlisten = "127.0.0.1:{port}"\n'
        "lease_seconds = 30\nreap_seconds = 0.5\n"
        f'[datastore]\ndefault = "file://{site}/data"\n'
        f'[worker]\nworkdir = "{site}/work"\ncache_dir = "{site}/cache"\n'
        "heartbeat_seconds = 0.5\npoll_seconds = 0.2\n"
        "[autoscale]\nenabled = false\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
    env["NO_COLOR"] = "1"
    from protocol.settings import load_settings

    boss = Boss(load_settings(str(site / "ecloud.toml"), environ={}, cwd=site))
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.monotonic()
    try:
        push(boss, site / "tasks.jsonl", [f"a{i:03d}" for i in range(TASKS)])
        tokens = [boss.add_worker(name=f"w{n}", slots=SLOTS)[2] for n in range(WORKERS)]
        with (site / "serve.log").open("wb") as out:
            serve = subprocess.Popen([str(BIN / "boss"), "serve"], cwd=site, env=env,
                                     stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        procs.append(serve)

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                assert serve.poll() is None, (site / "serve.log").read_text()
                return False
            return True

        wait_for(listening, "boss serve to listen", BOUND)
        workers = []
        for n, token in enumerate(tokens):
            (site / f"w{n}.token").write_text(token + "\n")
            (site / f"w{n}.token").chmod(0o600)
            with (site / f"w{n}.log").open("wb") as out:
                workers.append(subprocess.Popen(
                    [str(BIN / "worker"), "run", "--boss", f"tcp://127.0.0.1:{port}",
                     "--token-file", str(site / f"w{n}.token"), "--slots", str(SLOTS),
                     "--burst"], cwd=site, env=env, stdout=subprocess.DEVNULL, stderr=out,
                    stdin=subprocess.DEVNULL))
            procs.append(workers[-1])
        run = Run(boss, None)
        wait_for(lambda: run.succeeded() >= TASKS // 4, f"{TASKS // 4} tasks done", BOUND)
        boss.store.close()  # the test's own connections (it opens new ones): not what is tested
        done_at_restart = run.succeeded()
        down = pg_server.restart(down_seconds=1.0)
        serve_alive = serve.poll() is None
        workers_alive = sum(w.poll() is None for w in workers)
        wait_for(lambda: all(w.poll() is not None for w in workers),
                 "every worker to drain the queue and leave", BOUND)
        figures = run.finish()
        serve_alive_at_end = serve.poll() is None
        serve.terminate()
        serve.wait(BOUND)
        wall = time.monotonic() - t0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(BOUND)
        boss.close()
    log = (site / "serve.log").read_text(errors="replace")
    worker_logs = "".join((site / f"w{n}.log").read_text(errors="replace")
                          for n in range(WORKERS))
    retry_lines = [line for line in log.splitlines() if "retrying" in line]
    back_lines = [line for line in log.splitlines() if "database is back" in line]
    print(f"\nfault 6, PostgreSQL restarted: {TASKS} tasks, {WORKERS} `worker run` x {SLOTS} "
          f"slots, one `boss serve`; server down {down:.1f} s with {done_at_restart} tasks done")
    print(f"  alive after the restart: boss serve {serve_alive}, workers "
          f"{workers_alive}/{WORKERS}; boss serve alive at the end {serve_alive_at_end}, "
          f"exit {serve.returncode} on SIGTERM")
    print(f"  boss serve log: {len(retry_lines)} line(s) saying it retries, first: "
          f"{retry_lines[0] if retry_lines else '-'}; then: "
          f"{back_lines[0] if back_lines else '-'}")
    print(f"  after: {figures}; worker exit codes {[w.returncode for w in workers]}")
    print(f"  wall {wall:.1f} s")

    assert serve_alive and serve_alive_at_end, log
    assert workers_alive == WORKERS, "a worker died while PostgreSQL was down"
    # the log names the cause (the connection the restart cut), not a driver's aftermath
    assert retry_lines and "connection" in retry_lines[0], log
    assert "rollback" not in retry_lines[0], retry_lines[0]
    assert back_lines, log
    assert figures["states"] == {"succeeded": TASKS}, figures
    assert figures["most_succeeded_per_task"] == 1, figures
    assert figures["attempts"] == {"succeeded": TASKS}, figures
    assert tuple(figures["tries_lost"]) == (TASKS, 0), figures  # type: ignore[arg-type]
    assert all(w.returncode == 0 for w in workers), worker_logs
    assert "Traceback" not in log + worker_logs
