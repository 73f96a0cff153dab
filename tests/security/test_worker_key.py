"""What a worker's restricted key can do on the boss machine: tunnel to one port, nothing else.

Every check runs against a real OpenSSH sshd whose authorized_keys holds only the
line from ``boss.keys.authorized_keys_line``. Each refusal is paired with a
control that succeeds, so a refusal for an unrelated reason would show.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from boss.keys import (
    authorized_keys_line,
    generate_worker_keypair,
    install_authorized_key,
    sshd_config_match_block,
)
from protocol import messages
from tests import sshd as sshd_helper
from tests.echo import EchoServer
from tests.sshd import Sshd, start_sshd
from worker.transport import SshTunnelTransport, TransportRefused

pytestmark = pytest.mark.sshd
sshd = sshd_helper.sshd  # the fixture; assigned, not imported, so ruff sees no F811

WAIT = 10.0  # seconds; bound on every wait for sshd


@dataclass
class Worker:
    """An SSH login with the restricted worker key, and the port it may reach."""

    ssh: paramiko.Transport
    key_path: Path
    permitted_port: int


def login(server: Sshd, key_path: Path) -> paramiko.Transport:
    sock = socket.create_connection((server.host, server.port), timeout=WAIT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ssh = paramiko.Transport(sock)
    ssh.start_client(timeout=WAIT)
    offered = ssh.get_remote_server_key()
    assert f"{offered.get_name()} {offered.get_base64()}" == " ".join(
        server.host_key_pub.split()[:2])
    ssh.auth_publickey(server.user, paramiko.PKey.from_path(key_path))
    return ssh


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


@pytest.fixture
def worker(sshd: Sshd, echo: EchoServer, tmp_path: Path) -> Iterator[Worker]:
    private, public = generate_worker_keypair(tmp_path / "keys")
    sshd.set_authorized_keys([])  # nothing but the restricted key may log in
    install_authorized_key(sshd.authorized_keys_path, authorized_keys_line(public, echo.port))
    ssh = login(sshd, private)
    try:
        yield Worker(ssh, private, echo.port)
    finally:
        ssh.close()


def finish(chan: paramiko.Channel) -> tuple[int, bytes, bytes]:
    """Read a session to its end (bounded by WAIT); return (exit status, stdout, stderr)."""
    chan.settimeout(WAIT)
    out, err = b"", b""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if chan.recv_ready():
            out += chan.recv(65536)
        elif chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        elif chan.exit_status_ready() and chan.eof_received:
            return chan.recv_exit_status(), out, err
        else:
            time.sleep(0.01)
    raise AssertionError(f"session did not end within {WAIT} s (out={out!r}, err={err!r})")


def test_the_permitted_tunnel_works(worker: Worker) -> None:
    """The control for every test below: the key does log in and does tunnel."""
    chan = worker.ssh.open_channel("direct-tcpip", ("127.0.0.1", worker.permitted_port),
                                   ("127.0.0.1", 0), timeout=WAIT)
    chan.settimeout(WAIT)
    chan.sendall(messages.request(1, "hello", {}))
    assert chan.recv(65536).endswith(b"\n")
    chan.close()


def test_no_terminal_and_the_shell_is_bin_false(worker: Worker, tmp_path: Path) -> None:
    marker = tmp_path / "shell-was-here"
    pty = worker.ssh.open_session(timeout=WAIT)
    with pytest.raises(paramiko.SSHException):
        pty.get_pty()  # `restrict` implies no-pty
    shell = worker.ssh.open_session(timeout=WAIT)
    shell.invoke_shell()
    try:
        shell.sendall(f"touch {marker}\n".encode())
    except OSError:
        pass  # /bin/false may already have exited and closed the channel
    assert finish(shell) == (1, b"", b"")
    assert not marker.exists()


def test_exec_runs_bin_false_instead(worker: Worker, sshd: Sshd, tmp_path: Path) -> None:
    marker = tmp_path / "exec-was-here"
    chan = worker.ssh.open_session(timeout=WAIT)
    chan.exec_command(f"touch {marker}; echo pwned")
    assert finish(chan) == (1, b"", b"")
    assert not marker.exists()
    assert "forced-command (key-option) '/bin/false'" in sshd.log


def test_sftp_subsystem_is_refused(worker: Worker) -> None:
    # the forced command replaces the subsystem too: /bin/false never speaks SFTP
    with pytest.raises((paramiko.SSHException, EOFError)):
        paramiko.SFTPClient.from_transport(worker.ssh)


def test_tunnel_to_another_port_is_refused(worker: Worker) -> None:
    with EchoServer() as other:
        with pytest.raises(paramiko.ChannelException) as err:
            worker.ssh.open_channel("direct-tcpip", ("127.0.0.1", other.port),
                                    ("127.0.0.1", 0), timeout=WAIT)
        assert err.value.code == 1  # administratively prohibited, not "connect failed"
        assert other.connections == 0


def test_tunnel_by_another_name_for_the_same_port_is_refused(worker: Worker,
                                                             echo: EchoServer) -> None:
    # permitopen compares the literal host: "localhost" is not "127.0.0.1"
    for host in ("localhost", "127.0.0.2", "::1"):
        with pytest.raises(paramiko.ChannelException) as err:
            worker.ssh.open_channel("direct-tcpip", (host, worker.permitted_port),
                                    ("127.0.0.1", 0), timeout=WAIT)
        assert err.value.code == 1, host
    assert echo.connections == 0


def test_transport_reports_a_refused_forward_clearly(sshd: Sshd, worker: Worker) -> None:
    with EchoServer() as other:
        transport = SshTunnelTransport(sshd.host, sshd.port, sshd.user, worker.key_path,
                                       sshd.known_hosts_path, other.port, connect_timeout=WAIT)
        with pytest.raises(TransportRefused, match="permitopen"):
            transport.connect()


def test_remote_forwards_are_refused(worker: Worker) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    for address, port in (("127.0.0.1", 0), ("127.0.0.1", free), ("0.0.0.0", 0),
                          ("localhost", free), ("", free)):
        with pytest.raises(paramiko.SSHException, match="denied"):
            worker.ssh.request_port_forward(address, port)
    with socket.socket() as check:  # and nothing listens there now
        assert check.connect_ex(("127.0.0.1", free)) != 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may bind port 1")
def test_as_root_permitlisten_port_1_needs_the_sshd_config_block(worker: Worker, sshd: Sshd,
                                                                 echo: EchoServer,
                                                                 tmp_path: Path) -> None:
    """The authorized_keys line alone lets a root login listen on 127.0.0.1:1.

    This pins a known gap (sshd refuses privileged ports only to non-root users):
    the boss machine's sshd_config needs ``sshd_config_match_block(user)``, which
    refuses it. If this first assertion ever fails, OpenSSH closed the gap.
    """
    assert worker.ssh.request_port_forward("127.0.0.1", 1) == 1
    worker.ssh.cancel_port_forward("127.0.0.1", 1)

    block = sshd_config_match_block(sshd.user)
    with start_sshd(tmp_path / "hardened", extra_config=block) as hardened:
        hardened.set_authorized_keys(sshd.authorized_keys_path.read_text().splitlines())
        ssh = login(hardened, worker.key_path)
        try:
            with pytest.raises(paramiko.SSHException, match="denied"):
                ssh.request_port_forward("127.0.0.1", 1)
            # and the tunnel the worker needs still works under the hardened config
            chan = ssh.open_channel("direct-tcpip", ("127.0.0.1", echo.port),
                                    ("127.0.0.1", 0), timeout=WAIT)
            chan.settimeout(WAIT)
            chan.sendall(messages.request(1, "hello", {}))
            assert chan.recv(65536).endswith(b"\n")
        finally:
            ssh.close()
