"""The worker daemon against an in-process `boss serve`: cancel, stop, idle, slots."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from boss import calls
from boss.server import Server
from boss.service import Boss
from protocol.settings import Settings
from tests import waiting
from tests.bossd import serving
from tests.conftest import make_settings
from tests.integration.test_transitions import push, states, task
from tests.processes import alive
from worker.attempt import AttemptEnv
from worker.client import BossClient
from worker.daemon import Summary, Worker
from worker.transport import TcpTransport

BOUND = 60.0  # seconds; a bound on waiting, never an assertion about speed


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Boss, Server]]:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db")
    settings.worker.heartbeat_seconds = 0.2
    settings.worker.poll_seconds = 0.1
    boss = Boss(settings)
    boss.init()
    (tmp_path / "data").mkdir()
    try:
        with serving(boss) as server:
            yield boss, server
    finally:
        boss.close()


def start_worker(boss: Boss, server: Server, slots: int = 2, start: bool = True, **kw: object
                 ) -> tuple[Worker, threading.Thread, list[Summary]]:
    """A worker running in a thread (not yet started with ``start=False``: a test whose
    hooks read the worker binds it first, or a fast task may finish before it is bound)."""
    _, _, token = boss.add_worker(slots=slots)
    settings: Settings = boss.settings
    client = BossClient(TcpTransport("127.0.0.1", server.port), token, slots=slots,
                        give_up_after=30)
    env = AttemptEnv(workdir_root=Path(settings.worker.workdir), cache=None, buckets={},
                     default_url="", settings=settings.worker)
    worker = Worker(client, env, slots, **kw)  # type: ignore[arg-type]
    out: list[Summary] = []
    thread = threading.Thread(target=lambda: out.append(worker.run()), daemon=True)
    if start:
        thread.start()
    return worker, thread, out


def wait_for(condition: Callable[[], object], what: str) -> None:
    waiting.wait_for(condition, what, BOUND, every=0.05)


def test_cancel_kills_the_running_command(served: tuple[Boss, Server], tmp_path: Path) -> None:
    boss, server = served
    pidfile = tmp_path / "pid"
    push(boss, tmp_path, [task("sleeper", commands=[
        {"command": [f"echo $$ > {pidfile}; exec sleep 60"], "shell": True}])])
    _, thread, out = start_worker(boss, server, burst=True)
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "the command to start")
    pid = int(pidfile.read_text())
    assert alive(pid)
    boss.cancel("sleeper")
    wait_for(lambda: not alive(pid), "the cancelled command to be killed")
    thread.join(BOUND)
    assert not thread.is_alive()
    assert states(boss) == {"sleeper": "cancelled"}
    assert boss.show("sleeper")["attempts"][0]["state"] == "cancelled"
    assert out[0].reason == "the queue is drained"


def test_stop_finishes_running_tasks_and_takes_no_more(served: tuple[Boss, Server],
                                                       tmp_path: Path) -> None:
    boss, server = served
    flag = tmp_path / "go"
    push(boss, tmp_path, [
        task("first", commands=[{"command": [f"while [ ! -e {flag} ]; do sleep 0.05; done"],
                                 "shell": True}], priority=1),
        task("second")])
    worker, thread, out = start_worker(boss, server, slots=1)
    wait_for(lambda: states(boss)["first"] == "running", "the first task to run")
    worker.stop()  # as the first SIGTERM
    flag.write_text("")
    thread.join(BOUND)
    assert not thread.is_alive()
    assert states(boss) == {"first": "succeeded", "second": "ready"}
    assert out[0].succeeded == 1 and out[0].reason == "stopped"
    assert [w["state"] for w in boss.workers(include_terminated=True)] == ["terminated"]


def test_max_idle_and_slots(served: tuple[Boss, Server], tmp_path: Path) -> None:
    boss, server = served
    log = tmp_path / "concurrency.log"
    # each task notes how many tasks run beside it: never more than the slots
    cmd = (f"echo start >> {log}; n=$(grep -c start {log}); e=$(grep -c end {log}); "
           f"echo $((n - e)) >> {tmp_path}/seen; sleep 0.2; echo end >> {log}")
    push(boss, tmp_path, [task(f"t{i}", commands=[{"command": [cmd], "shell": True}])
                          for i in range(6)])
    _, thread, out = start_worker(boss, server, slots=2, max_idle=0.5)
    thread.join(BOUND)
    assert not thread.is_alive()
    assert out[0].succeeded == 6 and out[0].reason == "idle for 0.5 s"
    seen = [int(x) for x in (tmp_path / "seen").read_text().split()]
    assert len(seen) == 6 and max(seen) <= 2


def test_tasks_claimed_ahead_never_wait_behind_a_long_one(served: tuple[Boss, Server],
                                                         tmp_path: Path) -> None:
    """Two slots, one held by a long task: every short task runs in the other slot,
    including the ones the long task's slot claimed ahead with its reports."""
    boss, server = served
    gate = tmp_path / "gate"
    hold = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    # the long task comes after a few short ones: it is claimed ahead by a report,
    # and the report sent as its slot starts it claims the next short task
    push(boss, tmp_path, [
        *[task(f"short-{i}", priority=10) for i in range(4)],
        task("long", commands=[{"command": [hold], "shell": True}], priority=5),
        *[task(f"short-{i}") for i in range(4, 12)]])
    _, thread, out = start_worker(boss, server, slots=2, burst=True)
    try:
        wait_for(lambda: all(st == "succeeded" for name, st in states(boss).items()
                             if name != "long"), "every short task to finish")
        assert states(boss)["long"] == "running"
        # a stopping or idle worker would have requeued; nothing is left claimed but long
        running = [a for name in states(boss) for a in boss.show(name)["attempts"]
                   if a["state"] == "running"]
        assert len(running) <= 3, running  # long, and at most the reserve
    finally:
        gate.write_text("")
        thread.join(BOUND)
    assert not thread.is_alive()
    assert set(states(boss).values()) == {"succeeded"} and out[0].succeeded == 13


def test_results_finished_while_a_report_is_on_its_way_go_in_one_call(
        served: tuple[Boss, Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four slots; t0 finishes first, and the other three only once its report has
    reached the boss, which holds that report's transaction until they have finished
    too: those three then go together, in one batched complete."""
    boss, server = served
    arrived = tmp_path / "first-report-arrived"
    # bounded: 30 s, then the task fails and so does the test
    wait = {"command": [f"for i in $(seq 3000); do [ -e {arrived} ] && exit 0; sleep 0.01; "
                        "done; exit 1"], "shell": True}
    push(boss, tmp_path, [task("t0")] + [task(f"t{i}", commands=[wait]) for i in (1, 2, 3)])
    worker: Worker | None = None
    applied: list[object] = []
    real_apply = boss.apply

    def apply(batch: list[calls.Call]) -> list[object]:
        ends = [c for c in batch if isinstance(c, (calls.CompleteAndPop, calls.CompleteMany))]
        if ends and not applied and worker is not None:
            queued = worker._reports  # the reporter's queue: the results waiting for this one
            arrived.touch()
            waiting.wait_for(lambda: len(queued) == 3, "the other results to queue", BOUND,
                             every=0.01)
        applied.extend(ends)
        return real_apply(batch)

    monkeypatch.setattr(boss, "apply", apply)
    # bound before it starts: the hook above reads it when the first report comes
    worker, thread, out = start_worker(boss, server, slots=4, burst=True, start=False)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive()
    assert out[0].succeeded == 4 and out[0].refused == 0
    assert set(states(boss).values()) == {"succeeded"}
    assert [_results(c) for c in applied] == [1, 3]


def _results(call: object) -> int:
    return len(call.results) if isinstance(call, calls.CompleteMany) else 1


def test_a_worker_removes_the_trees_that_dead_workers_left(served: tuple[Boss, Server],
                                                           tmp_path: Path) -> None:
    boss, server = served
    workdir = Path(boss.settings.worker.workdir)
    (workdir / "99" / "logs").mkdir(parents=True)  # no live worker holds it
    (workdir / "99" / "work").mkdir()
    (workdir / "99" / "work" / "half-written").write_text("x")
    (workdir / "keep-me").mkdir()  # not an attempt's tree
    push(boss, tmp_path, [task("t")])
    _, thread, out = start_worker(boss, server, burst=True)
    thread.join(BOUND)
    assert not thread.is_alive()
    assert out[0].succeeded == 1
    assert os.listdir(workdir) == ["keep-me"]
