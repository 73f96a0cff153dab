"""Fault 1: workers killed with SIGKILL at random moments, 100 times.

Eight real `worker run` processes (one slot each, connected directly on loopback
as the local provider starts them) run short tasks that each write one output
file. A schedule drawn from a seeded RNG (the seed is printed; set
``FAULT_SEED`` to replay it) kills, every few tenths of a second, either

- a whole worker (``kill -9`` of the daemon, then of its running command, as
  when a VM vanishes): the boss hears nothing; the worker's attempts must be
  found lost when their lease expires and be requeued without spending a
  retry, and a new worker (a new token) takes the dead one's place; or
- only the command a worker is running (``kill -9``): the attempt fails,
  the task is retried per its ``retries``, and the worker goes on.

Then, from the database: every task succeeded exactly once (one succeeded
attempt each), none is lost, stuck or failed, every output is there; and a
late ``complete`` sent with a dead worker's token for each of its lost
attempts is refused (``not_current``) and changes no task and no attempt.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from boss.lifecycle import MAX_LOST
from boss.server import Server
from boss.service import Boss
from protocol.errors import Code
from tests.bossd import serving
from tests.conftest import make_settings
from tests.faults.late_reports import attempts_and_tasks, late_complete, query
from tests.processes import alive
from tests.waiting import wait_for

TRIALS = 100
WORKERS = 8
P_WORKER = 0.3  # share of the trials that kill a whole worker (the rest: its command)
LEASE = 2.0  # seconds; long enough that a loaded 2-core machine renews it in time
BATCH = 60  # tasks pushed at a time, whenever the backlog runs low
LOW_WATER = 24  # ready tasks below which another batch is pushed
RETRIES = 30  # command kills spend tries: far more than any task is ever hit
BOUND = 90.0  # seconds; a bound on waiting, never an assertion about speed
DEFAULT_SEED = 20261123


def _seed() -> int:
    raw = os.environ.get("FAULT_SEED", "")
    return int(raw) if raw.strip() else DEFAULT_SEED


def _children(parents: Iterable[int]) -> dict[int, list[int]]:
    """The live direct children of each of ``parents`` (the workers' running commands).

    One pass over /proc for all of them: the boss runs in this process, and a
    scan per worker per look held the GIL long enough to starve it on a loaded
    machine.
    """
    wanted = set(parents)
    out: dict[int, list[int]] = {pid: [] for pid in wanted}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[1]) in wanted and fields[0] != "Z":
            out[int(fields[1])].append(int(stat.parent.name))
    return out


def _all_gone(pids: list[int]) -> bool:
    return not any(alive(pid) for pid in pids)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class Fleet:
    """The boss (in this process), its worker processes, and what was done to them."""

    root: Path
    boss: Boss
    server: Server
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    tokens: dict[int, str] = field(default_factory=dict)  # worker id -> token
    ids: list[int] = field(default_factory=list)  # worker id of each slot of the fleet
    killed: list[int] = field(default_factory=list)  # worker ids killed outright
    pushed: int = 0
    started: int = 0

    def start(self, slot: int) -> None:
        """Start a new worker (a new token) in ``slot`` of the fleet."""
        wid, name, token = self.boss.add_worker(slots=1)
        self.tokens[wid] = token
        token_file = self.root / "tokens" / f"{name}.token"
        token_file.parent.mkdir(exist_ok=True)
        token_file.write_text(token + "\n")
        log = (self.root / "logs" / f"{name}.log")
        log.parent.mkdir(exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "run", "--boss",
                 f"tcp://127.0.0.1:{self.server.port}", "--token-file", str(token_file),
                 "--slots", "1"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env,
                cwd=self.root, start_new_session=True)
        self.started += 1
        if slot < len(self.procs):
            self.procs[slot], self.ids[slot] = proc, wid
        else:
            self.procs.append(proc)
            self.ids.append(wid)

    def push(self, n: int, rng: random.Random) -> None:
        docs = []
        for _ in range(n):
            name = f"t{self.pushed:04d}"
            self.pushed += 1
            pause = rng.choice(("0.05", "0.1", "0.2", "0.3"))
            docs.append({
                "name": name, "retries": RETRIES,
                "outputs": {f"data:out/{name}": "out"},
                "commands": [{"command": [f"sleep {pause} && echo {name} > out"],
                              "shell": True}]})
        batch = self.root / f"batch-{self.pushed}.jsonl"
        batch.write_text("".join(json.dumps(d) + "\n" for d in docs))
        self.boss.push(batch)

    def holding_attempts(self) -> list[bool]:
        """For each slot: does its worker hold a running attempt?"""
        busy = {wid for (wid,) in query(self.root / "boss.db", "SELECT DISTINCT worker_id "
                                        "FROM attempts WHERE state = 'running'")}
        return [wid in busy for wid in self.ids]

    def commands(self, slot: int) -> list[int]:
        return _children([self.procs[slot].pid])[self.procs[slot].pid]

    def running_commands(self) -> list[bool]:
        """For each slot: does its worker run a command?"""
        kids = _children(proc.pid for proc in self.procs)
        return [bool(kids[proc.pid]) for proc in self.procs]

    def pick(self, first: int, look: Callable[[], list[bool]]) -> int | None:
        """The first slot from ``first`` on (round) whose worker ``look`` finds busy."""
        for _ in range(600):  # bounded: at most ~30 s of looking, for a loaded machine
            busy = look()
            for k in range(WORKERS):
                if busy[(first + k) % WORKERS]:
                    return (first + k) % WORKERS
            time.sleep(0.05)
        return None

    def check_alive(self) -> None:
        """A worker that died without being killed is a failure of its own."""
        for proc, wid in zip(self.procs, self.ids, strict=True):
            if proc.poll() is not None:
                raise AssertionError(f"worker {wid} exited by itself ({proc.returncode}); "
                                     f"see {self.root / 'logs'}")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    s = make_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db")
    s.boss.lease_seconds = LEASE
    s.boss.reap_seconds = 0.2
    s.worker.heartbeat_seconds = 0.3
    s.worker.poll_seconds = 0.1
    (tmp_path / "data").mkdir()
    boss = Boss(s)
    boss.init()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
    env.update({"ECLOUD_WORKER_WORKDIR": str(tmp_path / "work"),
                "ECLOUD_WORKER_CACHE_BYTES": "0"})
    try:
        with serving(boss) as server:
            f = Fleet(tmp_path, boss, server, env)
            try:
                yield f
            finally:
                for proc in f.procs:
                    _kill(proc.pid)
                    proc.wait(timeout=30)
    finally:
        boss.close()


def _ready(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as c:
        (n,) = c.execute("SELECT count(*) FROM tasks WHERE state = 'ready'").fetchone()
        return int(n)


def test_workers_and_commands_killed_100_times(fleet: Fleet) -> None:
    seed = _seed()
    rng = random.Random(seed)
    db = fleet.root / "boss.db"
    t0 = time.monotonic()
    fleet.push(BATCH * 2, rng)
    for slot in range(WORKERS):
        fleet.start(slot)
    wait_for(lambda: query(db, "SELECT count(*) FROM tasks WHERE state = 'succeeded'")[0][0]
             >= WORKERS, "the workers to start working", BOUND)

    schedule: list[str] = []  # what each trial did, to read beside the seed on failure
    worker_kills = command_kills = 0
    try:
        for trial in range(TRIALS):
            time.sleep(rng.uniform(0.02, 0.25))
            fleet.check_alive()
            if _ready(db) < LOW_WATER:
                fleet.push(BATCH, rng)
            whole = rng.random() < P_WORKER
            # the drawn worker, or the next one with something to lose: a worker that is
            # still starting holds no attempt, and killing it would test nothing
            first = rng.randrange(WORKERS)
            for _ in range(20):  # a short command may end between the pick and the kill
                picked = fleet.pick(first, fleet.holding_attempts if whole
                                    else fleet.running_commands)
                assert picked is not None, f"trial {trial}: no worker has anything running"
                proc, wid = fleet.procs[picked], fleet.ids[picked]
                commands = fleet.commands(picked)
                if whole or commands:
                    break
            assert picked is not None and (whole or commands), f"trial {trial}: no command"
            if whole:
                _kill(proc.pid)  # the daemon first: it must not see its command die
                for pid in commands:
                    _kill(pid)
                proc.wait(timeout=30)
                fleet.killed.append(wid)
                worker_kills += 1
                schedule.append(f"{trial}:W{wid}")
                fleet.start(picked)
            else:
                for pid in commands:
                    _kill(pid)
                # the next trial must not pick this command again while it dies
                wait_for(partial(_all_gone, commands), "the killed command to die", BOUND,
                         every=0.01)
                command_kills += 1
                schedule.append(f"{trial}:C{wid}")
    finally:
        print(f"\nfault 1, worker killed: seed {seed} (FAULT_SEED={seed} replays the "
              f"schedule); trials done {len(schedule)}")
        print("  schedule (trial:W=worker killed, C=command killed, worker id): "
              + " ".join(schedule))
    trials_wall = time.monotonic() - t0

    wait_for(lambda: query(db, "SELECT count(*) FROM tasks WHERE state != 'succeeded'"
                            )[0][0] == 0,
             "every task to succeed after the last kill", BOUND)
    fleet.check_alive()
    # stop the survivors the gentle way: they finish and say goodbye (once started: a
    # worker still importing its modules has no SIGTERM handler yet)
    ids = ",".join(map(str, fleet.ids))
    wait_for(lambda: query(db, f"SELECT count(*) FROM workers WHERE id IN ({ids}) AND "
                           "state = 'provisioning'")[0][0] == 0,
             "the last workers started to join", BOUND)
    for proc in fleet.procs:
        proc.send_signal(signal.SIGTERM)
    for proc in fleet.procs:
        assert proc.wait(timeout=BOUND) == 0, "a worker did not stop cleanly on SIGTERM"
    wall = time.monotonic() - t0

    tasks: dict[str, int] = dict(query(db, "SELECT state, count(*) FROM tasks GROUP BY state"))
    attempts: dict[str, int] = dict(query(
        db, "SELECT state, count(*) FROM attempts GROUP BY state"))
    lost_why: dict[str, int] = dict(query(
        db, "SELECT reason, count(*) FROM attempts WHERE state = 'lost' GROUP BY reason"))
    wins = query(db, "SELECT t.name, count(a.id) FROM tasks t LEFT JOIN attempts a "
                     "ON a.task_id = t.id AND a.state = 'succeeded' GROUP BY t.id")
    most = query(db, "SELECT max(tries), max(lost) FROM tasks")[0]
    # attempts whose worker kept them from publishing: their lease was not renewed in time
    fenced = query(db, "SELECT count(*) FROM attempts WHERE reason LIKE "
                       "'outputs not published%'")[0][0]
    dead = query(db, "SELECT id, worker_id, task_id FROM attempts WHERE state = 'lost' AND "
                     f"worker_id IN ({','.join(map(str, fleet.killed)) or '0'}) ORDER BY id")
    out = fleet.root / "data" / "out"
    missing = [name for name, _ in wins
               if not (out / name).is_file() or (out / name).read_text().strip() != name]

    # late reports from the dead: each lost attempt of a killed worker, with its token
    before = attempts_and_tasks(db)
    answers = [late_complete(fleet.server.port, fleet.tokens[wid], aid)
               for aid, wid, _ in dead]
    after = attempts_and_tasks(db)
    refused = answers.count(str(Code.NOT_CURRENT))

    print(f"  kills: {worker_kills} workers (kill -9 of the daemon and its command), "
          f"{command_kills} commands (kill -9); workers started {fleet.started}; "
          f"killed workers that held attempts {len({wid for _, wid, _ in dead})}")
    print(f"  tasks {fleet.pushed}: {tasks}; succeeded attempts per task "
          f"{sorted({n for _, n in wins})}; outputs missing {len(missing)}")
    print(f"  attempts {sum(attempts.values())}: {attempts}; lost attempts detected "
          f"{attempts.get('lost', 0)} {lost_why}; most tries {most[0]}, most lost "
          f"{most[1]} (cap {MAX_LOST}); kept from publishing (lease not renewed) {fenced}")
    print(f"  late reports from killed workers' lost attempts: {len(answers)} sent, "
          f"{refused} refused (not_current), tables unchanged: {before == after}")
    print(f"  wall: {trials_wall:.1f} s for the trials, {wall:.1f} s in all")

    assert len(schedule) == TRIALS
    assert worker_kills > 0 and command_kills > 0
    assert tasks == {"succeeded": fleet.pushed}, tasks
    assert all(n == 1 for _, n in wins), [w for w in wins if w[1] != 1]
    assert not missing, missing[:10]
    assert attempts.get("running", 0) == 0
    # a killed worker's attempts are found by their lease, not by a goodbye
    assert lost_why.get("lease expired", 0) > 0
    assert attempts.get("failed", 0) > 0  # the command kills did bite
    assert dead and refused == len(dead), answers
    assert before == after
