"""Fault 3: a thundering herd, 1,000 completions inside one second from 50 workers.

The ecloud seed "overloads the network as soon as too many tasks finish at
once". Here 50 workers, each a real protocol client (worker/client.py) on its
own connection to a real RPC server, each claim 20 tasks; then 1,000 threads
(one per slot) wait on one barrier and report all at once. Every report must
be accepted: no error, no timeout, every task succeeded exactly once. The
figures: how the sends spread, the replies' latency, and how many
transactions the server's group commit used for them. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from boss.server import Server
from boss.service import Boss
from boss.store import reads
from protocol.errors import ProtocolError
from protocol.messages import Assignment, Result
from tests.bossd import serving
from tests.conftest import make_settings
from worker.client import BossClient
from worker.transport import TcpTransport, TransportError

WORKERS = 50
SLOTS = 20
TASKS = WORKERS * SLOTS
BOUND = 60.0  # seconds; a bound on waiting, never an assertion about speed


@pytest.fixture
def served(tmp_path: Path, db_url: str) -> Iterator[tuple[Boss, Server]]:
    settings = make_settings(tmp_path, db_url)
    settings.boss.reap_seconds = 3600  # the herd's transactions only, not the reaper's
    boss = Boss(settings)
    boss.init()
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(
        json.dumps({"name": f"t{i:04d}", "commands": [{"command": ["true"]}]}) + "\n"
        for i in range(TASKS)), encoding="utf-8")
    boss.push(path)
    try:
        with serving(boss) as server:
            yield boss, server
    finally:
        boss.close()


@dataclass
class Report:
    sent: float = 0.0
    answered: float = 0.0
    accepted: bool = False
    error: str = ""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def test_thousand_completions_inside_one_second(served: tuple[Boss, Server]) -> None:
    boss, server = served
    clients: list[BossClient] = []
    claimed: list[tuple[BossClient, Assignment]] = []
    try:
        for _ in range(WORKERS):
            _, _, token = boss.add_worker(slots=SLOTS)
            client = BossClient(TcpTransport("127.0.0.1", server.port), token, slots=SLOTS,
                                give_up_after=BOUND)
            clients.append(client)
            client.hello()
            got = client.pop(SLOTS).tasks
            claimed.extend((client, a) for a in got)
        assert len(claimed) == TASKS, f"claimed {len(claimed)} of {TASKS} tasks"

        barrier = threading.Barrier(TASKS + 1)
        reports = [Report() for _ in claimed]

        def report(i: int) -> None:
            client, a = claimed[i]
            r = reports[i]
            barrier.wait(BOUND)
            r.sent = time.monotonic()
            try:
                r.accepted, _ = client.complete(Result(a.attempt_id, "succeeded", 0))
                if not r.accepted:
                    r.error = "not current"
            except (TransportError, ProtocolError) as exc:
                r.error = f"{type(exc).__name__}: {exc}"
            r.answered = time.monotonic()

        threads = [threading.Thread(target=report, args=(i,), daemon=True)
                   for i in range(TASKS)]
        for t in threads:
            t.start()
        batches, calls = server.commits.batches, server.commits.calls
        barrier.wait(BOUND)
        released = time.monotonic()
        for t in threads:
            t.join(BOUND)
        assert not any(t.is_alive() for t in threads), "a report never came back"
        batches, calls = server.commits.batches - batches, server.commits.calls - calls
    finally:
        for c in clients:
            c.close()

    errors = [r.error for r in reports if r.error]
    timeouts = [e for e in errors if "within" in e]
    latency = [(r.answered - r.sent) * 1000 for r in reports]
    sends = [r.sent - released for r in reports]
    answers = [r.answered - released for r in reports]
    with boss.store.ro() as conn:
        counts = reads.task_counts(conn)
    dialect = boss.store.engine.dialect.name
    print(f"\nfault 3, thundering herd on {dialect}: {TASKS} completions from {WORKERS} "
          f"workers ({SLOTS} slots each, one connection per worker)")
    print(f"  sent within {max(sends) - min(sends):.3f} s of each other "
          f"(last {max(sends):.3f} s after the barrier); all answered "
          f"{max(answers):.3f} s after the barrier")
    print(f"  reply latency ms: p50 {percentile(latency, 50):.1f}, "
          f"p99 {percentile(latency, 99):.1f}, max {max(latency):.1f}, "
          f"mean {statistics.fmean(latency):.1f}")
    print(f"  group commit: {calls} calls in {batches} transactions "
          f"({calls / max(batches, 1):.0f} calls per transaction)")
    print(f"  errors {len(errors)}, timeouts {len(timeouts)}; tasks {counts}")
    if max(sends) - min(sends) > 1.0:
        print("  NOTE: the sends spread over more than one second (a loaded machine)")

    assert errors == [], errors[:5]
    assert timeouts == []
    assert all(r.accepted for r in reports)
    assert {k: v for k, v in counts.items() if v} == {"succeeded": TASKS}
    with boss.store.ro() as conn:
        attempts = conn.execute(text(
            "SELECT state, count(*), count(DISTINCT task_id) FROM attempts GROUP BY state"
        )).all()
    # one attempt per task, and it succeeded: no report applied twice, none lost
    assert [tuple(r) for r in attempts] == [("succeeded", TASKS, TASKS)]
    assert calls == TASKS, "a report was sent more than once (a reconnect and a retry)"
