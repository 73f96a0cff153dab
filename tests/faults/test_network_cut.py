"""Fault 4: a worker's network cut for longer than its lease, then restored.

The worker runs in its own network namespace (tests/netns.py) and reaches the
boss as a remote worker does: one SSH connection to the boss machine's sshd
on the bridge, with a key restricted to the tunnel to the boss's RPC port.
While it runs a task, the link between its namespace and the bridge is cut
(``ip link set ... down`` on the bridge side, as a pulled cable: the worker's
kernel is not told). The boss hears nothing for longer than the lease: the
attempt is found lost and its task requeued, and a second worker (on the boss
machine) runs it to success. The cut worker's copy then ends too, still cut
off, and uploads its output to a temporary name. Then the link is restored.
The cut worker must not publish that output over the winner's (it asks the
boss, which no longer counts the attempt), its late report must be refused,
and so must an explicit late ``complete`` with its token, changing nothing;
the worker must carry on and finish new tasks.

Needs root (network namespaces); skipped, saying why, otherwise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from boss.keys import authorized_keys_line
from boss.service import Boss
from protocol.errors import Code
from protocol.messages import Assignment
from protocol.settings import WorkerSettings
from tests.bossd import serving
from tests.conftest import make_settings
from tests.faults.late_reports import attempts_and_tasks, late_complete, query
from tests.netns import HostPool, can_make_namespaces, host_pool
from tests.sshd import Sshd, ssh_keygen, start_sshd
from tests.waiting import wait_for
from worker.attempt import AttemptEnv, run_attempt
from worker.client import BossClient
from worker.daemon import Worker, _Running
from worker.transport import TcpTransport
from worker.workdirs import JANITOR

pytestmark = pytest.mark.sshd

LEASE = 1.5  # seconds; the cut lasts longer than this
AFTER = 4  # tasks pushed once the link is back, for the cut worker alone
BOUND = 60.0  # seconds; a bound on waiting, never an assertion about speed


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], check=True, capture_output=True, text=True,
                          timeout=30)
    return done.stdout


def _bridge_side(netns: str) -> str:
    """The bridge-side end of the veth pair that links ``netns`` to the bridge."""
    inside = _ip("-n", netns, "-o", "link", "show", "type", "veth")
    m = re.search(r"^\d+: [^@:]+@if(\d+):", inside, re.M)
    assert m, f"no veth in {netns}: {inside}"
    for line in _ip("-o", "link", "show").splitlines():
        idx, _, rest = line.partition(": ")
        if idx == m.group(1):
            return rest.split("@", 1)[0].split(":", 1)[0]
    raise AssertionError(f"the peer of {netns}'s veth (ifindex {m.group(1)}) is not here")


@pytest.fixture
def pool1(tmp_path: Path) -> Iterator[HostPool]:
    why = can_make_namespaces()
    if why:
        print(f"\nSKIPPING the network cut test: {why}")
        pytest.skip(why)
    with host_pool(tmp_path, 1) as pool:
        yield pool


def _start(argv: list[str], log: Path, env: dict[str, str], cwd: Path
           ) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=env, cwd=cwd, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=BOUND)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError(f"worker {proc.pid} did not stop on SIGTERM") from None


def _summary(log: Path) -> dict[str, Any]:
    """The worker's last line on stdout: its JSON summary."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            found: dict[str, Any] = json.loads(line)
            return found
    raise AssertionError(f"no summary in {log}:\n{log.read_text(errors='replace')[-3000:]}")


def test_cut_past_the_lease_then_restored(tmp_path: Path, pool1: HostPool) -> None:
    t0 = time.monotonic()
    host = pool1.hosts[0]
    s = make_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db")
    s.boss.lease_seconds = LEASE
    s.boss.reap_seconds = 0.2
    s.worker.heartbeat_seconds = 0.3
    s.worker.poll_seconds = 0.1
    (tmp_path / "data").mkdir()
    db = tmp_path / "boss.db"
    boss = Boss(s)
    boss.init()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
    env.update({"ECLOUD_WORKER_CACHE_BYTES": "0"})
    worker_key = tmp_path / "worker_key"
    worker_pub = ssh_keygen(worker_key, "ecloud-worker")
    procs: list[subprocess.Popen[bytes]] = []
    link = _bridge_side(host.netns)
    try:
        with serving(boss) as server, \
                start_sshd(tmp_path / "boss", host=pool1.gateway) as boss_sshd:
            boss_sshd.set_authorized_keys([authorized_keys_line(worker_pub, server.port)])
            cut_id, cut_log = _worker_in_netns(boss, boss_sshd, server.port, host.netns,
                                              worker_key, tmp_path, env, procs)
            victim = tmp_path / "victim.jsonl"
            victim.write_text(json.dumps({
                "name": "victim",
                # each attempt waits for its own gate, then writes its attempt id (its work
                # directory is <workdir>/<attempt id>/work) to its output
                "outputs": {"data:out/victim": "out"},
                "commands": [{"command": [
                    f'a=$(basename "$(dirname "$PWD")"); '
                    f'while [ ! -e {tmp_path}/gate-$a ]; do sleep 0.05; done; echo $a > out'],
                    "shell": True}]}) + "\n")
            boss.push(victim)

            def attempts() -> list[tuple[Any, ...]]:
                return query(db, "SELECT a.id, a.worker_id, a.state FROM attempts a "
                                 "JOIN tasks t ON t.id = a.task_id WHERE t.name = 'victim' "
                                 "ORDER BY a.id")

            wait_for(lambda: attempts() and attempts()[0][1:] == (cut_id, "running"),
                     "the namespace worker to run the victim task", BOUND)
            first = attempts()[0][0]
            # the second worker, on the boss machine, is up before the cut: it has nothing
            # to do until the victim is requeued
            other_id, _, other_token = boss.add_worker(name="other", slots=1)
            (tmp_path / "other.token").write_text(other_token + "\n")
            other = _start([sys.executable, "-m", "worker.cli", "run", "--boss",
                            f"tcp://127.0.0.1:{server.port}", "--token-file",
                            str(tmp_path / "other.token"), "--slots", "1"],
                           tmp_path / "other.log",
                           {**env, "ECLOUD_WORKER_WORKDIR": str(tmp_path / "work-other")},
                           tmp_path)
            procs.append(other)
            wait_for(lambda: query(db, "SELECT state FROM workers WHERE id = ?", other_id)
                     == [("idle",)], "the second worker to join", BOUND)

            _ip("link", "set", link, "down")
            cut_at = time.monotonic()
            try:
                wait_for(lambda: [a[1:] for a in attempts()] == [
                    (cut_id, "lost"), (other_id, "running")],
                    "the victim to be found lost and run by the other worker", BOUND)
                second = attempts()[1][0]
                (tmp_path / f"gate-{second}").write_text("")
                wait_for(lambda: query(db, "SELECT state FROM tasks WHERE name = 'victim'")
                         == [("succeeded",)], "the victim to succeed elsewhere", BOUND)
                # then the cut worker's copy ends too, with the link still down, and
                # uploads its output to a temporary name: publishing it would replace
                # the winner's output, so the worker must ask the boss first
                (tmp_path / f"gate-{first}").write_text("")
                part = tmp_path / "data" / "out" / f"victim.ecloud-part-{first}"
                wait_for(part.exists, "the cut worker to upload its copy's output", BOUND)
                time.sleep(LEASE)  # still cut: longer than a lease past the upload
            finally:
                down_for = time.monotonic() - cut_at
                _ip("link", "set", link, "up")
            # back on the network: the cut worker asks, is told the attempt is not
            # current, keeps its output out, and its report is refused
            ended = re.compile(rf"task victim: attempt {first} (succeeded|failed)(.*)")
            wait_for(lambda: ended.search(cut_log.read_text(errors="replace")),
                     "the cut worker to end its copy of the victim", BOUND)
            match = ended.search(cut_log.read_text(errors="replace"))
            assert match is not None
            copy = match.group(1) + match.group(2)
            states = attempts()
            output = (tmp_path / "data" / "out" / "victim").read_text().strip()
            leftovers = sorted(p.name for p in (tmp_path / "data" / "out").iterdir())
            # the second worker stops here so that what comes next is the cut worker's
            assert _stop(other) == 0
            other_summary = _summary(tmp_path / "other.log")

            wait_for(lambda: "no longer current" in cut_log.read_text(errors="replace"),
                     "the cut worker's late report to be refused", BOUND)
            # whether the worker's own connection lived through the cut or was made anew
            hellos = query(db, "SELECT count(*) FROM events WHERE kind = 'worker.joined' "
                               "AND worker_id = ?", cut_id)[0][0]
            before = attempts_and_tasks(db)
            explicit = late_complete(server.port, _token_of(tmp_path), first)
            after = attempts_and_tasks(db)

            more = tmp_path / "after.jsonl"
            more.write_text("".join(json.dumps({"name": f"after-{i}", "commands": [
                {"command": ["true"]}]}) + "\n" for i in range(AFTER)))
            boss.push(more)
            wait_for(lambda: query(db, "SELECT count(*) FROM tasks WHERE state = 'succeeded'"
                                    )[0][0] == AFTER + 1,
                     "the cut worker to finish the new tasks", BOUND)
            assert _stop(procs[0]) == 0
            summary = _summary(cut_log)
            ran_after = query(db, "SELECT DISTINCT a.worker_id FROM attempts a JOIN tasks t "
                                  "ON t.id = a.task_id WHERE t.name LIKE 'after-%' AND "
                                  "a.state = 'succeeded'")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        boss.close()
    wall = time.monotonic() - t0

    print(f"\nfault 4, network cut: lease {LEASE:g} s, link {link} down for {down_for:.1f} s")
    print(f"  victim attempts (id, worker, state): {states}; cut worker {cut_id}, "
          f"other worker {other_id}")
    print(f"  the victim's output written by attempt {output} (the winner is {second}); "
          f"files in out/: {leftovers}")
    print(f"  the cut worker's copy: {copy}")
    print(f"  the cut worker's own late report: refused (summary {summary}); explicit late "
          f"complete: {explicit}; tables unchanged: {before == after}")
    print(f"  after the cut: {AFTER} new tasks run by workers {ran_after}; hellos of the cut "
          f"worker before the explicit report {hellos}; the other worker's summary "
          f"{other_summary}")
    print(f"  wall: {wall:.1f} s")

    assert down_for > LEASE
    assert states[0] == (first, cut_id, "lost")
    assert [st for _, _, st in states].count("succeeded") == 1
    assert (states[-1][1], states[-1][2]) == (other_id, "succeeded")
    assert output == str(second), "the late attempt replaced the winner's output"
    assert leftovers == ["victim"]  # the late copy's temporary upload is gone too
    assert copy.startswith("failed (outputs not published: the boss no longer counts it")
    assert summary["refused"] == 1 and summary["succeeded"] == AFTER, summary
    assert explicit == str(Code.NOT_CURRENT)
    assert before == after
    assert ran_after == [(cut_id,)]


def _token_of(root: Path) -> str:
    return (root / "cut.token").read_text().strip()


def _worker_in_netns(boss: Boss, boss_sshd: Sshd, rpc_port: int, netns: str, key: Path,
                     root: Path, env: dict[str, str], procs: list[subprocess.Popen[bytes]]
                     ) -> tuple[int, Path]:
    """Start `worker run` inside ``netns``, through the SSH tunnel; its id and log."""
    wid, _, token = boss.add_worker(name="cut", slots=1)
    (root / "cut.token").write_text(token + "\n")
    log = root / "cut.log"
    url = f"ssh://{boss_sshd.user}@{boss_sshd.host}:{boss_sshd.port}?port={rpc_port}"
    procs.append(_start(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "worker.cli", "run",
         "--boss", url, "--key", str(key), "--known-hosts", str(boss_sshd.known_hosts_path),
         "--token-file", str(root / "cut.token"), "--slots", "1"],
        log, {**env, "ECLOUD_WORKER_WORKDIR": str(root / "work-cut")}, root))
    return wid, log


def test_an_attempt_past_its_lease_publishes_nothing(tmp_path: Path) -> None:
    """The worker's half of the fence, without root: an attempt whose lease the worker
    could not renew in time runs, but publishes no output and fails saying why."""
    data = tmp_path / "data"
    data.mkdir()
    asked: list[int] = []

    def fence(attempt_id: int) -> str | None:
        asked.append(attempt_id)
        return "lease not renewed"

    env = AttemptEnv(workdir_root=tmp_path / "work", cache=None,
                     buckets={"data": f"file://{data}"}, default_url=f"file://{data}",
                     settings=WorkerSettings(), fence=fence)
    doc = {"name": "late", "outputs": {"data:out/late": "out", "data:dir/": "d/"},
           "commands": [{"command": ["mkdir -p d && echo x > d/f && echo x > out"],
                         "shell": True}]}
    result = run_attempt(Assignment(7, 1, "late", 1, doc), env, lambda _k, _d: None,
                         threading.Event())
    JANITOR.flush()
    assert result.outcome == "failed", result
    assert "outputs not published: lease not renewed" in result.reason
    assert asked == [7]
    # neither output, nor any temporary upload, is left in the bucket
    assert sorted(p.name for p in data.rglob("*") if p.is_file()
                  and "ecloud-logs" not in p.parts) == []


def test_a_stale_lease_is_checked_with_the_boss(tmp_path: Path) -> None:
    """Past its lease without a renewal, an attempt asks the boss before it publishes: it
    may publish if the boss still counts it (the boss was away, not the worker), never
    once the boss gave it up."""
    s = make_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db")
    boss = Boss(s)
    boss.init()
    try:
        with serving(boss) as server:
            wid, _, token = boss.add_worker(slots=1)
            (tmp_path / "t.jsonl").write_text(
                "".join(json.dumps({"name": n, "commands": [{"command": ["true"]}]}) + "\n"
                        for n in ("kept", "given-up")))
            boss.push(tmp_path / "t.jsonl")
            client = BossClient(TcpTransport("127.0.0.1", server.port), token, slots=1,
                                give_up_after=10)
            env = AttemptEnv(workdir_root=tmp_path / "work", cache=None, buckets={},
                             default_url="", settings=s.worker)
            daemon = Worker(client, env, 1)
            try:
                client.hello()
                kept, given_up = boss.claim(wid, 2)
                stale = time.monotonic() - 10 * s.boss.lease_seconds
                for a in (kept, given_up):
                    daemon._running[a.attempt_id] = _Running(a, renewed=stale)
                boss.cancel(given_up.name)  # as a lease expiry would, it ends the attempt
                lease = s.boss.lease_seconds
                assert daemon._fence(lease, kept.attempt_id) is None
                # the boss renewed it: the next check costs no call
                assert time.monotonic() - daemon._running[kept.attempt_id].renewed < lease
                why = daemon._fence(lease, given_up.attempt_id)
                assert why is not None and "no longer counts it as current" in why, why
            finally:
                client.close()
    finally:
        boss.close()
