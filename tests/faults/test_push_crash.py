"""Fault 5: `boss push-tasks` of 100,000 tasks killed (SIGKILL) at a random point.

The real command runs as a subprocess on a fresh database and is killed at
random moments: once early (interpreter start, first chunk being checked,
before the transaction opens), several times while rows are being written
(on SQLite: once the write-ahead log has grown past a random size, so the
kill is known to land inside the transaction), and at plain random delays.
After each kill a fresh connection, not the boss, must find either none or
all of that push: tasks, edges, outputs, the push event, and a counts table
that agrees with a real count. The seed of the random delays is printed, so
a failing trial can be replayed with ``FAULTS_SEED``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import pg
from tests.conftest import fresh_pg_url

BIN = Path(sys.executable).parent
TASKS = 100_000
EDGES = TASKS - TASKS // 10  # every task but each tenth comes after the one before
BOUND = 60.0  # seconds; a bound on one push, never an assertion about speed
POLL = 0.01  # seconds between looks at a running push
SEED = int(os.environ.get("FAULTS_SEED", "0") or 0) or random.SystemRandom().randrange(
    1, 1 << 30)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100,000 tasks as JSON lines, with dependency chains and an output each."""
    path = tmp_path_factory.mktemp("push") / "tasks.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(TASKS):
            doc: dict[str, object] = {"name": f"t{i:06d}", "commands": [{"command": ["true"]}],
                                      "outputs": {f"data:out/{i}": "out"}}
            if i % 10:
                doc["after"] = [f"t{i - 1:06d}"]
            f.write(json.dumps(doc) + "\n")
    return path


@dataclass
class Outcome:
    """What a fresh connection finds after a push ended (killed or not)."""

    tasks: int
    edges: int
    outputs: int
    pushed_events: int
    counts: dict[str, int]
    exact: dict[str, int]

    def whole(self) -> bool:
        return (self.tasks, self.edges, self.outputs, self.pushed_events) == (
            TASKS, EDGES, TASKS, 1)

    def empty(self) -> bool:
        return (self.tasks, self.edges, self.outputs, self.pushed_events) == (0, 0, 0, 0)

    def __str__(self) -> str:
        return (f"tasks={self.tasks} edges={self.edges} outputs={self.outputs} "
                f"push-events={self.pushed_events} counted={sum(self.exact.values())} "
                f"counts-table={sum(self.counts.values())}")


QUERIES = {
    "tasks": "SELECT count(*) FROM tasks",
    "edges": "SELECT count(*) FROM task_edges",
    "outputs": "SELECT count(*) FROM task_outputs",
    "pushed_events": "SELECT count(*) FROM events WHERE kind = 'jobs.pushed'",
}


def read_outcome(execute: Callable[[str], list[tuple[object, ...]]]) -> Outcome:
    figures = {k: int(str(execute(q)[0][0])) for k, q in QUERIES.items()}
    counts = {str(s): int(str(n)) for s, n in execute(
        "SELECT state, n FROM task_state_counts") if int(str(n))}
    exact = {str(s): int(str(n)) for s, n in execute(
        "SELECT state, count(*) FROM tasks GROUP BY state")}
    return Outcome(figures["tasks"], figures["edges"], figures["outputs"],
                   figures["pushed_events"], counts, exact)


def sqlite_outcome(db: Path) -> Outcome:
    con = sqlite3.connect(db, timeout=30)
    try:
        check = con.execute("PRAGMA integrity_check").fetchall()
        assert check == [("ok",)], f"the database is damaged: {check}"
        # a push into an empty queue drops these inside its transaction: a kill undoes that
        found = {name for (name,) in con.execute("SELECT name FROM sqlite_master "
                                                 "WHERE type = 'index'")}
        assert {"ix_tasks_claim_order", "ix_task_edges_child_id"} <= found, found
        return read_outcome(lambda q: con.execute(q).fetchall())
    finally:
        con.close()


def pg_outcome(server: pg.PgServer, database: str) -> Outcome:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=server.port, user=server.user,
                         dbname=database, autocommit=True) as con:
        # the killed client's backend rolls back when it notices; wait until it has gone
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:  # bounded in time
            others = con.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND pid <> pg_backend_pid()", (database,)).fetchone()
            if others is not None and others[0] == 0:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the killed push's backend on {database} never went away")
        return read_outcome(lambda q: list(con.execute(q).fetchall()))


class Push:
    """One `boss push-tasks` subprocess in its own session (with its checking helpers)."""

    def __init__(self, settings: Path, task_file: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
        env["NO_COLOR"] = "1"
        self.log = settings.parent / "push.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "boss"), "--settings", str(settings), "push-tasks", str(task_file)],
                cwd=settings.parent, env=env, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def kill(self) -> bool:
        """SIGKILL the push itself (not its helpers); False if it had already ended."""
        if self.proc.poll() is not None:
            return False
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(BOUND)
        return True

    def helpers_gone(self) -> float:
        """Seconds until the orphaned checking helpers exit by themselves (they must)."""
        t0 = time.monotonic()
        deadline = t0 + BOUND
        while time.monotonic() < deadline:  # bounded in time
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return time.monotonic() - t0
            time.sleep(0.05)
        os.killpg(self.proc.pid, signal.SIGKILL)
        raise AssertionError("the push's helper processes outlived it by a minute")

    def finish(self) -> None:
        self.proc.wait(BOUND)
        assert self.proc.returncode == 0, self.log.read_text(errors="replace")


def settings_file(directory: Path, url: str) -> Path:
    path = directory / "settings.toml"
    path.write_text(f'[boss]\ndatabase_url = "{url}"\n[datastore]\n'
                    f'default = "file://{directory}/data"\n', encoding="utf-8")
    return path


def wal_size(db: Path) -> int:
    try:
        return (db.parent / (db.name + "-wal")).stat().st_size
    except FileNotFoundError:
        return -1


@pytest.fixture
def sqlite_template(tmp_path: Path) -> Path:
    """An initialised, empty SQLite database, copied for each trial."""
    from boss.service import Boss
    from protocol.settings import load_settings

    directory = tmp_path / "template"
    directory.mkdir()
    settings = settings_file(directory, f"sqlite:///{directory}/boss.db")
    boss = Boss(load_settings(str(settings), environ={}, cwd=directory))
    try:
        boss.init()
    finally:
        boss.close()
    return directory / "boss.db"


def test_push_killed_sqlite(tmp_path: Path, task_file: Path, sqlite_template: Path) -> None:
    rng = random.Random(SEED)
    trial_no = iter(range(1, 100))

    def fresh() -> tuple[Path, Path]:
        directory = tmp_path / f"trial{next(trial_no)}"
        directory.mkdir()
        shutil.copy(sqlite_template, directory / "boss.db")
        return directory / "boss.db", settings_file(directory, f"sqlite:///{directory}/boss.db")

    # a push left alone: when its transaction opens, how big its log gets, when it ends
    db, settings = fresh()
    push = Push(settings, task_file)
    opened = growing = -1.0
    biggest = 0
    while push.proc.poll() is None and push.elapsed() < BOUND:  # bounded in time
        size = wal_size(db)
        if size >= 0 and opened < 0:
            opened = push.elapsed()
        if size > 0 and growing < 0:
            growing = push.elapsed()
        biggest = max(biggest, size)
        time.sleep(POLL)
    push.finish()
    whole_run = push.elapsed()
    reference = sqlite_outcome(db)
    print(f"\nfault 5, push killed (SQLite): {TASKS} tasks, {EDGES} edges; seed {SEED}")
    print(f"  uninterrupted push: {whole_run:.2f} s; database opened at {opened:.2f} s, rows "
          f"written from {growing:.2f} s, log up to {biggest / 1e6:.1f} MB; {reference}")
    assert reference.whole() and reference.counts == reference.exact, reference
    assert 0 < opened <= growing, "the push never wrote its log: nothing to kill it in"

    # (label, kill when the push has run this long, or when its log holds this many bytes)
    trials: list[tuple[str, float, int]] = [
        ("early", rng.uniform(0.3, 0.9) * opened, 0),  # start-up, first chunk checked
        ("in tx", rng.uniform(opened, growing), 0),  # rows going in, not yet in the log
        *(("in write", 0.0, int(rng.uniform(0.03, 0.97) * biggest)) for _ in range(2)),
        ("random", rng.uniform(0.0, whole_run), 0),
    ]
    outcomes: list[tuple[str, Outcome, int]] = []
    zero_db: tuple[Path, Path] | None = None
    for label, delay, at_bytes in trials:
        db, settings = fresh()
        push = Push(settings, task_file)
        size = wal_size(db)
        while push.proc.poll() is None and push.elapsed() < BOUND:  # bounded in time
            size = wal_size(db)
            if (at_bytes and size >= at_bytes) or (not at_bytes and push.elapsed() >= delay):
                break
            time.sleep(POLL)
        at = push.elapsed()
        killed = push.kill()
        helpers = push.helpers_gone()
        got = sqlite_outcome(db)
        verdict = "none" if got.empty() else "all" if got.whole() else "PARTIAL"
        what = f"log >= {at_bytes / 1e6:.1f} MB" if at_bytes else f"delay {delay:.2f} s"
        print(f"  {label:8} ({what}): killed at {at:.2f} s "
              f"{'(already done) ' if not killed else ''}with {max(size, 0) / 1e6:.1f} MB "
              f"logged -> {verdict}: {got}; helpers gone {helpers:.2f} s later")
        outcomes.append((label, got, size))
        if got.empty():
            zero_db = (db, settings)

    # after a crash the same push goes through whole
    assert zero_db is not None
    db, settings = zero_db
    Push(settings, task_file).finish()
    again = sqlite_outcome(db)
    print(f"  the same file pushed again after a killed push: {again}")

    for label, got, _ in outcomes:
        assert got.empty() or got.whole(), f"{label}: a half-pushed file: {got}"
        assert got.counts == got.exact, f"{label}: the counts table disagrees: {got}"
    assert any(label == "in write" and got.empty() and size > 0
               for label, got, size in outcomes), "no kill landed inside the write"
    assert again.whole() and again.counts == again.exact, again


@pytest.mark.postgres
def test_push_killed_postgresql(tmp_path: Path, task_file: Path,
                                pg_server: pg.PgServer) -> None:
    import psycopg

    rng = random.Random(SEED + 1)
    trial_no = iter(range(1, 100))

    def fresh() -> tuple[str, Path]:
        url = fresh_pg_url(pg_server)
        directory = tmp_path / f"trial{next(trial_no)}"
        directory.mkdir()
        return url.rsplit("/", 1)[1], settings_file(directory, url)

    def lock_held(con: psycopg.Connection[tuple[object, ...]]) -> bool:
        # the push holds this advisory lock for as long as its transaction is open
        row = con.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                          "AND objid = 7878001").fetchone()
        return row is not None and int(str(row[0])) > 0

    with psycopg.connect(host="127.0.0.1", port=pg_server.port, user=pg_server.user,
                         dbname="postgres", autocommit=True) as watcher:
        database, settings = fresh()
        push = Push(settings, task_file)
        began = -1.0
        while push.proc.poll() is None and push.elapsed() < BOUND:  # bounded in time
            if began < 0 and lock_held(watcher):
                began = push.elapsed()
            time.sleep(POLL)
        push.finish()
        whole_run = push.elapsed()
        reference = pg_outcome(pg_server, database)
        print(f"\nfault 5, push killed (PostgreSQL): {TASKS} tasks; seed {SEED + 1}")
        print(f"  uninterrupted push: {whole_run:.2f} s; transaction open from {began:.2f} s;"
              f" {reference}")
        assert reference.whole() and reference.counts == reference.exact, reference
        assert began > 0, "never saw the push's transaction open"

        # (label, kill this long after the start, or after the transaction opened)
        # one kill the moment the transaction is seen open (so at least one surely lands
        # inside it, however fast the COPY), one at a random point of the write
        trials = [("early", rng.uniform(0.3, 0.9) * began, -1.0),
                  ("in tx", 0.0, 0.0),
                  ("in write", 0.0, rng.uniform(0.0, 0.9 * (whole_run - began)))]
        outcomes: list[tuple[str, Outcome, bool]] = []
        for label, delay, inside in trials:
            database, settings = fresh()
            push = Push(settings, task_file)
            opened = -1.0
            while push.proc.poll() is None and push.elapsed() < BOUND:  # bounded in time
                if inside < 0 and push.elapsed() >= delay:
                    break
                if inside >= 0 and opened < 0 and lock_held(watcher):
                    opened = push.elapsed()
                if opened >= 0 and push.elapsed() >= opened + inside:
                    break
                time.sleep(POLL)
            held = lock_held(watcher)
            at = push.elapsed()
            killed = push.kill()
            helpers = push.helpers_gone()
            got = pg_outcome(pg_server, database)
            verdict = "none" if got.empty() else "all" if got.whole() else "PARTIAL"
            what = f"delay {delay:.2f} s" if inside < 0 else f"{inside:.2f} s into the write"
            print(f"  {label:8} ({what}): killed at {at:.2f} s "
                  f"{'(already done) ' if not killed else ''}"
                  f"{'inside' if held else 'outside'} the transaction -> {verdict}: {got}; "
                  f"helpers gone {helpers:.2f} s later")
            outcomes.append((label, got, held))

    for label, got, _ in outcomes:
        assert got.empty() or got.whole(), f"{label}: a half-pushed file: {got}"
        assert got.counts == got.exact, f"{label}: the counts table disagrees: {got}"
    assert any(held and got.empty() for _, got, held in outcomes), \
        "no kill landed inside the transaction"
