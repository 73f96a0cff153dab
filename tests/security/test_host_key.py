"""Host key pinning, with the real `worker run`: a changed boss host key stops the worker.

The transport-level refusal is in tests/integration/test_tunnel.py. Here the
whole worker runs as a user starts it, through a real sshd, with the boss's
sshd replaced (same address and port, another host key) either before the
worker starts or while it is connected. Either way the worker must exit
non-zero, saying "HOST KEY MISMATCH", instead of reconnecting until
``give_up_seconds`` (an hour by default) runs out.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.test_worker_e2e import BIN, TIMEOUT, Site
from tests.sshd import Sshd, ssh_keygen, start_sshd
from tests.sshd import sshd as sshd  # the fixture
from tests.waiting import wait_for

pytestmark = pytest.mark.sshd


@pytest.fixture
def site(tmp_path: Path, sshd: Sshd) -> Iterator[Site]:
    root = tmp_path / "site"
    root.mkdir()
    s = Site(root, f"file://{tmp_path}/store")
    s.run("boss", "init")
    s.run("boss", "admin", "add-worker", "--token-file", "tok", "--name", "w1")
    s.run("boss", "admin", "authorize-worker-key", "--generate", "keys", "--install",
          "--authorized-keys", str(sshd.authorized_keys_path))
    s.serve()
    yield s
    s.stop()


def worker_argv(site: Site, sshd: Sshd, known_hosts: Path, *extra: str) -> list[str]:
    return [str(BIN / "worker"), "run",
            "--boss", f"ssh://{sshd.user}@127.0.0.1:{sshd.port}?port={site.port}",
            "--token-file", "tok", "--key", "keys/ecloud_worker_ed25519",
            "--known-hosts", str(known_hosts), *extra]


def impostor_known_hosts(tmp_path: Path, port: int) -> Path:
    other = ssh_keygen(tmp_path / "impostor_key", "impostor").split()
    path = tmp_path / "impostor_known_hosts"
    path.write_text(f"[127.0.0.1]:{port} {other[0]} {other[1]}\n")
    return path


def worker_state(site: Site) -> str:
    rows = json.loads(site.run("boss", "admin", "show-workers", "--json").stdout)
    return str(next((r["state"] for r in rows if r["name"] == "w1"), "absent"))


def test_worker_run_refuses_a_boss_with_another_host_key(site: Site, sshd: Sshd,
                                                        tmp_path: Path) -> None:
    known_hosts = impostor_known_hosts(tmp_path, sshd.port)
    # not --burst: a worker that treated the refusal as "boss unreachable" would retry
    # for give_up_seconds (an hour) and hit TIMEOUT here instead of exiting
    done = subprocess.run(worker_argv(site, sshd, known_hosts), cwd=site.root, env=site.env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0, done.stderr
    assert f"HOST KEY MISMATCH for [127.0.0.1]:{sshd.port}" in done.stderr, done.stderr
    assert str(known_hosts) in done.stderr
    assert "Traceback" not in done.stderr
    # ssh's own log and warning box are captured for the message, never passed through
    assert "debug1:" not in done.stdout + done.stderr and "@@@" not in done.stdout + done.stderr
    assert "publickey" not in sshd.log  # nothing was offered to the impostor
    assert worker_state(site) == "provisioning"  # never said hello


def test_host_key_changed_while_connected_stops_the_worker(site: Site, sshd: Sshd,
                                                           tmp_path: Path) -> None:
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(worker_argv(site, sshd, sshd.known_hosts_path, "-v"),
                                  cwd=site.root, env=site.env, stdout=log, stderr=log)
    try:
        wait_for(lambda: worker_state(site) in ("idle", "busy") or worker.poll() is not None,
                 "the worker to say hello through the tunnel", bound=60)
        assert worker.poll() is None, log_path.read_text()
        # the boss machine's sshd is replaced by one with another host key, same port
        authorized = sshd.authorized_keys_path.read_text().splitlines()
        sshd.stop()
        impostor = start_sshd(tmp_path / "impostor", authorized_keys=authorized,
                              port=sshd.port)
        try:
            assert impostor.port == sshd.port
            assert impostor.host_key_pub.split()[1] != sshd.host_key_pub.split()[1]
            try:
                code = worker.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                raise AssertionError("the worker kept reconnecting to a host with a changed "
                                     f"key:\n{log_path.read_text()}") from None
            out = log_path.read_text()
            assert code != 0, out
            assert f"HOST KEY MISMATCH for [127.0.0.1]:{sshd.port}" in out, out
            assert "Traceback" not in out, out
            # refused before authentication: the impostor never saw the worker's key
            assert "publickey" not in impostor.log, impostor.log
        finally:
            impostor.stop()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
