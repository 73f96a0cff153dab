"""Hosts for tests: network namespaces on a bridge, each with its own sshd.

``host_pool(tmp_path, n)`` creates a Linux bridge with the address
``10.X.0.1/24`` on this machine (the "boss machine") and ``n`` network
namespaces, each joined to the bridge by a veth pair and given ``10.X.0.(k+2)``,
each running its own sshd on port 22 there. The namespaces share this
machine's file system and processes, not its network: a process started in
one reaches the others and the boss machine only through the bridge. Every
name carries this process's pid, and everything is removed when the block
ends (processes in a namespace are killed first).

Needs root and iproute2; ``pool`` (the fixture) skips with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sshd import Sshd, ssh_keygen, start_sshd


@dataclass
class PoolHost:
    netns: str
    address: str
    sshd: Sshd

    @property
    def entry(self) -> str:
        """The host as ``[ssh] hosts`` writes it."""
        return f"{self.sshd.user}@{self.address}:22"


@dataclass
class HostPool:
    gateway: str  # this machine's address on the bridge
    hosts: list[PoolHost]
    key_path: Path  # logs in to every host (unrestricted)
    known_hosts_path: Path  # pins every host


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def kill_in_netns(netns: str) -> None:
    """SIGKILL every process living in ``netns``."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                         timeout=30)
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def host_pool(tmp_path: Path, n: int) -> Iterator[HostPool]:
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.{200 + os.getpid() % 50}"
    bridge = f"ecb{tag}"
    namespaces: list[str] = []
    sshds: list[Sshd] = []
    key = tmp_path / "pool_key"
    pub = ssh_keygen(key, "ecloud-test-pool")
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.0.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        hosts = []
        for k in range(n):
            ns = f"ecn{tag}h{k}"
            outside, inside = f"ec{tag}a{k}", f"ec{tag}b{k}"
            _ip("netns", "add", ns)
            namespaces.append(ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", bridge, "up")
            _ip("link", "set", inside, "netns", ns)
            address = f"{subnet}.0.{k + 2}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            server = start_sshd(tmp_path / f"host{k}", authorized_keys=[pub], host=address,
                                netns=ns, port=22)
            sshds.append(server)
            hosts.append(PoolHost(ns, address, server))
        known = tmp_path / "pool_known_hosts"
        known.write_text("".join(h.sshd.known_hosts_path.read_text() for h in hosts))
        yield HostPool(f"{subnet}.0.1", hosts, key, known)
    finally:
        for server in sshds:
            server.stop()
        for ns in namespaces:
            kill_in_netns(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


def can_make_namespaces() -> str | None:
    """Why host pools cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"ecprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          timeout=30)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@pytest.fixture
def pool3(tmp_path: Path) -> Iterator[HostPool]:
    """Three namespace hosts; skipped, saying why, where namespaces cannot be made."""
    why = can_make_namespaces()
    if why:
        print(f"\nSKIPPING host pool tests: {why}")
        pytest.skip(why)
    with host_pool(tmp_path, 3) as pool:
        yield pool
