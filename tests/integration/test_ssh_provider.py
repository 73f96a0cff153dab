"""The ``ssh`` provider against real hosts: network namespaces, each with its own sshd.

The boss logs in to each host with fabric, uploads its worker code and starts
a worker there; the worker reaches the boss only through its own SSH tunnel to
the boss machine's sshd (on the bridge), with a key restricted to that tunnel.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from boss.keys import authorized_keys_line
from boss.providers import Created, Failed, WorkerSpec, provider_for
from boss.providers.ssh import SshProvider
from boss.scaler import Scaler
from boss.service import Boss
from protocol.settings import Settings
from tests.bossd import serving
from tests.conftest import make_settings
from tests.integration.test_transitions import push, states, task
from tests.netns import HostPool, pool3  # noqa: F401  (the fixture)
from tests.ports import free_port
from tests.sshd import Sshd, ssh_keygen, start_sshd
from tests.waiting import quick_pool, wait_for

pytestmark = pytest.mark.sshd






@dataclass
class Site:
    settings: Settings
    boss_sshd: Sshd
    rpc_port: int


@pytest.fixture
def site(tmp_path: Path, pool3: HostPool) -> Iterator[Site]:  # noqa: F811
    """Settings for a boss whose workers run on the pool, and the boss machine's sshd."""
    rpc_port = free_port()
    worker_key = tmp_path / "worker_key"
    worker_pub = ssh_keygen(worker_key, "ecloud-worker")
    with start_sshd(tmp_path / "boss", host=pool3.gateway) as boss_sshd:
        # the workers' key may open the tunnel to the boss's RPC port and nothing else
        boss_sshd.set_authorized_keys([authorized_keys_line(worker_pub, rpc_port)])
        s = make_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db")
        s.boss.listen = f"127.0.0.1:{rpc_port}"
        s.boss.ssh_host = pool3.gateway
        s.boss.ssh_port = boss_sshd.port
        s.boss.ssh_user = boss_sshd.user
        s.boss.ssh_host_key_file = str(tmp_path / "boss" / "sshd" / "host_ed25519.pub")
        s.boss.worker_key_file = str(worker_key)
        s.ssh.hosts = [h.entry for h in pool3.hosts]
        s.ssh.key_file = str(pool3.key_path)
        s.ssh.known_hosts = str(pool3.known_hosts_path)
        # the namespaces share this file system: one directory per host, as on NFS homes
        s.ssh.remote_dir = f"{tmp_path}/hosts/{{host}}"
        s.ssh.python = sys.executable  # the hosts' Python, with ecloud's dependencies
        s.provider.default = "ssh"
        yield Site(s, boss_sshd, rpc_port)


def spec(i: int) -> WorkerSpec:
    return WorkerSpec(i, f"w{i}", f"token-{i}", 1)


def test_create_list_delete(site: Site, pool3: HostPool) -> None:  # noqa: F811
    provider = provider_for(site.settings)
    assert isinstance(provider, SshProvider)
    try:
        # the dry run asks the hosts what they run, places the workers, starts nothing
        plans = provider.plan([spec(i) for i in range(1, 5)])
        assert sorted(p["host"] for p in plans[:3]) == sorted(h.entry for h in pool3.hosts)
        assert "no free host" in plans[3]["error"]
        assert plans[0]["argv"][-4:] == ["--settings", plans[0]["files"][-1], "run", "--burst"]
        assert provider.list() == []
        results = provider.create([spec(i) for i in range(1, 5)])
        created = [r for r in results if isinstance(r, Created)]
        failed = [r for r in results if isinstance(r, Failed)]
        # one worker per host (the default): three hosts, the fourth has no room
        assert len(created) == 3 and len(failed) == 1
        assert "no free host in the ssh pool (3 hosts x 1 workers each" in failed[0].error
        assert {c.address for c in created} == {h.address for h in pool3.hosts}
        listed = provider.list()
        assert sorted(i.reference for i in listed) == sorted(c.reference for c in created)
        assert sorted(i.name for i in listed) == ["w1", "w2", "w3"]
        # each runs the boss's own code, uploaded as one archive per host
        for h in pool3.hosts:
            assert len(list((Path(site.settings.ssh.remote_dir.replace("{host}", h.address))
                             ).glob("ecloud-worker-*.pyz"))) == 1
        # the worker's secrets are 0600 in a 0700 directory
        wdir = Path(site.settings.ssh.remote_dir.replace("{host}", created[0].address)
                    ) / "workers" / "w1"
        assert (wdir.stat().st_mode & 0o777) == 0o700
        assert (wdir / "token").stat().st_mode & 0o077 == 0
        provider.delete(created[0].reference)
        assert len(provider.list()) == 2
        assert not (wdir / "token").exists() and not (wdir / "worker_key").exists()
        assert (wdir / "worker.log").exists()  # the log stays, for `less` after the fact
        provider.delete(created[0].reference)  # gone already: not an error
    finally:
        for inst in provider.list():
            provider.delete(inst.reference)
        assert provider.list() == []
        provider.close()


def test_unknown_host_key_is_refused(site: Site, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    site.settings.ssh.known_hosts = str(empty)
    provider = provider_for(site.settings)
    try:
        [result] = provider.create([spec(1)])
        assert isinstance(result, Failed)
        assert "not in [ssh] known_hosts" in result.error, result.error
    finally:
        provider.close()


def test_pool_loses_a_worker_and_is_restored(site: Site, tmp_path: Path) -> None:
    """Kill one host's worker: its task runs elsewhere; the pool comes back to its size."""
    s = site.settings
    quick_pool(s, slots=1, max_workers=3)
    (tmp_path / "data").mkdir()
    boss = Boss(s)
    boss.init()
    gate = tmp_path / "gate"
    hold = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    push(boss, tmp_path, [task(f"t{i}", commands=[{"command": [hold], "shell": True}])
                          for i in range(4)])
    try:
        with serving(boss, site.rpc_port, Scaler(boss, provider_for(s))):
            wait_for(lambda: sorted(states(boss).values()).count("running") == 3,
                     "three workers on three hosts running three tasks")
            live = [w for w in boss.workers() if w["state"] == "busy"]
            assert len(live) == 3 and {w["provider"] for w in live} == {"ssh"}
            assert len({w["address"] for w in live}) == 3
            victim = live[0]
            victim_task = next(name for name, st in states(boss).items()
                               if st == "running" and _worker_of(boss, name) == victim["id"])
            os.killpg(int(victim["reference"].rpartition("/")[2]), signal.SIGKILL)
            wait_for(lambda: any(w["id"] == victim["id"] and w["state"] == "lost"
                                 for w in boss.workers(include_terminated=True)),
                     "the killed worker to be marked lost")
            # a replacement starts on the freed host: three live workers again
            wait_for(lambda: len([w for w in boss.workers()
                                  if w["state"] in ("idle", "busy")]) == 3,
                     "the pool to be back to three workers")
            gate.write_text("")
            wait_for(lambda: set(states(boss).values()) == {"succeeded"}, "every task done")
            shown = boss.show(victim_task)
            assert shown["tries"] <= 1, shown  # a lost worker does not spend the task's tries
            assert _worker_of(boss, victim_task) != victim["id"]  # it ran elsewhere
            wait_for(lambda: not [w for w in boss.workers() if w["state"] in
                                  ("provisioning", "idle", "busy", "draining")],
                     "the workers to leave")
        provider = provider_for(s)
        try:
            wait_for(lambda: provider.list() == [], "no worker process left on the hosts")
        finally:
            provider.close()
    finally:
        boss.close()


def _worker_of(boss: Boss, name: str) -> int | None:
    attempts = boss.show(name)["attempts"]
    return attempts[-1]["worker_id"] if attempts else None
