"""``boss serve`` holds more worker connections than its soft limit on open files.

Each connected worker holds one file descriptor in the boss for as long as it
runs. A common soft default is 1,024 (hard limits are much higher): benchmark
5 (benchmarks/many_workers.py --workers 1100 --boss-nofile 1024:20000) saw
``accept()`` fail with EMFILE and SQLite answer "unable to open database file"
to hellos at about 1,000 workers. ``boss serve`` therefore raises its soft
limit to the hard one. Here it is started with a soft limit of 64 (the hard
one unchanged) and 120 workers connect and say hello, each on its own
connection, then all heartbeat.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from boss.service import Boss
from protocol.errors import ProtocolError
from protocol.settings import load_settings
from tests.ports import free_port
from tests.waiting import wait_for
from worker.client import BossClient
from worker.transport import TcpTransport, TransportError

SOFT = 64
WORKERS = 120
BIN = Path(sys.executable).parent




def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_boss_serve_holds_more_workers_than_its_soft_fd_limit(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    if hard != resource.RLIM_INFINITY and hard < 4 * WORKERS:
        pytest.skip(f"the hard limit on open files ({hard}) leaves no room to raise")
    port = free_port()
    toml = tmp_path / "ecloud.toml"
    toml.write_text(f'[boss]\nlisten = "127.0.0.1:{port}"\n'
                    f'database_url = "sqlite:///{tmp_path}/boss.db"\n')
    boss = Boss(load_settings(str(toml), environ={}, cwd=tmp_path))
    try:
        boss.init()
        tokens = [boss.add_worker(name=f"w{i}")[2] for i in range(WORKERS)]
    finally:
        boss.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
    env["ECLOUD_SETTINGS"] = str(toml)
    limit = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        ["prlimit", f"--nofile={SOFT}:{limit}", "--", str(BIN / "boss"), "serve",
         "--no-autoscale"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    clients: list[BossClient] = []
    try:
        wait_for(lambda: _listening(port) or proc.poll() is not None, "boss serve listening")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        for i, token in enumerate(tokens):
            client = BossClient(TcpTransport("127.0.0.1", port, timeout=10), token, slots=1,
                                give_up_after=1, backoff_base=0.1)
            clients.append(client)
            try:
                client.hello()
            except (TransportError, ProtocolError) as exc:
                pytest.fail(f"worker {i} of {WORKERS} could not say hello: {exc}\n"
                            + (tmp_path / "serve.log").read_text()[-2000:])
        assert [c.heartbeat([]) for c in clients] == [[]] * WORKERS
    finally:
        for c in clients:
            c.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
