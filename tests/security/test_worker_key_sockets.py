"""The worker key and Unix sockets on the boss machine (``direct-streamlocal``).

``permitopen`` names TCP host:port pairs; a forward to a Unix socket path
(``ssh -L PORT:/path/to.sock``) must be refused too, or a worker's key could
reach every socket its login user can open (PostgreSQL's, a container
runtime's API). OpenSSH 9.2 refuses it when ``permitopen`` is present; this
pins that, with the real OpenSSH client and a control forward to the permitted
TCP port through the same command.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boss.keys import authorized_keys_line, generate_worker_keypair
from tests.ports import free_port
from tests.sshd import Sshd, start_sshd

pytestmark = pytest.mark.sshd
WAIT = 10.0  # seconds; a bound on every wait


class Greeter:
    """A server (Unix socket, or TCP on 127.0.0.1) greeting each connection with a line."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX if path else socket.AF_INET,
                                  socket.SOCK_STREAM)
        self.sock.bind(str(path) if path else ("127.0.0.1", 0))
        self.target = str(path) if path else f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                conn.sendall(b"socket reached\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self.sock.close()


@pytest.fixture
def unix_greeter(tmp_path: Path) -> Iterator[Greeter]:
    server = Greeter(tmp_path / "private.sock")
    yield server
    server.close()


def forward(server: Sshd, key: Path, target: str) -> bytes:
    """``ssh -N -L PORT:TARGET`` with the worker key; what a client of PORT reads."""
    port = free_port()
    proc = subprocess.Popen(
        ["ssh", "-N", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={server.known_hosts_path}", "-o", "ExitOnForwardFailure=yes",
         "-i", str(key), "-p", str(server.port), "-L", f"127.0.0.1:{port}:{target}",
         f"{server.user}@{server.host}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:  # bounded: until the local listener is up
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
                    c.settimeout(WAIT)
                    try:
                        return c.recv(100)
                    except (TimeoutError, ConnectionError):
                        return b""
            except ConnectionRefusedError:
                if proc.poll() is not None:
                    return b""
                time.sleep(0.05)
        raise AssertionError("ssh -L did not listen")
    finally:
        # SIGKILL, not SIGTERM: an ssh busy with a refused channel was seen to
        # outlive a SIGTERM by more than WAIT in CI
        proc.kill()
        proc.wait(WAIT)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_no_forward_to_a_unix_socket(tmp_path: Path, unix_greeter: Greeter) -> None:
    private, public = generate_worker_keypair(tmp_path / "keys")
    boss_port = Greeter()
    try:
        with start_sshd(tmp_path / "sshd") as server:
            server.set_authorized_keys([authorized_keys_line(public, int(
                boss_port.target.rsplit(":", 1)[1]))])
            # the control: the same command does forward to the boss's port
            assert forward(server, private, boss_port.target) == b"socket reached\n"
            assert forward(server, private, unix_greeter.target) == b""
            assert unix_greeter.connections == 0
            assert (f"connect to path {unix_greeter.path}, but the request was denied"
                    in server.log), server.log[-2000:]
    finally:
        boss_port.close()
