"""SshTunnelTransport against a real sshd on 127.0.0.1 and a JSON-lines echo server."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from boss.keys import authorized_keys_line, generate_worker_keypair, install_authorized_key
from protocol import messages
from tests import sshd as sshd_helper
from tests.echo import EchoServer
from tests.sshd import Sshd, _descendants, ssh_keygen
from worker.transport import SshTunnelTransport, TransportError, TransportRefused

pytestmark = pytest.mark.sshd
sshd = sshd_helper.sshd  # the fixture; assigned, not imported, so ruff sees no F811


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


def tunnel(server: Sshd, remote_port: int, *, key: Path | None = None,
           known_hosts: Path | None = None, timeout: float = 10.0) -> SshTunnelTransport:
    return SshTunnelTransport(server.host, server.port, server.user,
                              key or server.client_key_path,
                              known_hosts or server.known_hosts_path, remote_port,
                              timeout=timeout, connect_timeout=10.0)


def round_trip(channel: object, i: int) -> dict[str, object]:
    assert hasattr(channel, "send") and hasattr(channel, "recv_line")
    channel.send(messages.request(i, "heartbeat", {"attempts": [i]}))
    rid, result = messages.parse_reply(channel.recv_line())
    assert rid == i
    return result


def test_1000_lines_over_one_channel(sshd: Sshd, echo: EchoServer) -> None:
    channel = tunnel(sshd, echo.port).connect()
    try:
        for i in range(1000):
            assert round_trip(channel, i) == {"call": "heartbeat", "args": {"attempts": [i]}}
    finally:
        channel.close()
    # one SSH login and one channel carried every call
    assert echo.connections == 1
    assert sshd.log.count("Accepted publickey") == 1


def test_lines_are_split_and_joined_correctly(sshd: Sshd, echo: EchoServer) -> None:
    channel = tunnel(sshd, echo.port).connect()
    try:
        # two requests in one write come back as two lines, in order
        channel.send(messages.request(1, "pop", {"n": 1}) + messages.request(2, "pop", {"n": 2}))
        assert messages.parse_reply(channel.recv_line())[0] == 1
        assert messages.parse_reply(channel.recv_line())[0] == 2
        # a 2 MB line crosses many SSH packets and recv chunks
        big = "x" * 2_000_000
        channel.send(messages.request(3, "event", {"data": big}))
        assert messages.parse_reply(channel.recv_line())[1]["args"] == {"data": big}
    finally:
        channel.close()


def test_changed_host_key_is_refused_before_login(sshd: Sshd, echo: EchoServer,
                                                  tmp_path: Path) -> None:
    other = ssh_keygen(tmp_path / "impostor", "impostor").split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    with pytest.raises(TransportRefused) as err:
        tunnel(sshd, echo.port, known_hosts=known_hosts).connect()
    message = str(err.value)
    assert f"HOST KEY MISMATCH for [127.0.0.1]:{sshd.port}" in message
    assert str(known_hosts) in message
    assert "publickey" not in sshd.log  # the worker never tried to log in
    assert echo.connections == 0


def test_unknown_host_is_refused(sshd: Sshd, echo: EchoServer, tmp_path: Path) -> None:
    # the right key, filed under another port: not this host as far as ssh is concerned
    key_type, key_data = sshd.host_key_pub.split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port + 1} {key_type} {key_data}\n"
                           f"127.0.0.1 {key_type} {key_data}\n")
    with pytest.raises(TransportRefused, match=r"is not in the known_hosts file") as err:
        tunnel(sshd, echo.port, known_hosts=known_hosts).connect()
    assert f"[127.0.0.1]:{sshd.port}" in str(err.value) and str(known_hosts) in str(err.value)
    assert known_hosts.read_text().count("\n") == 2  # nothing was added (no TOFU)


def test_missing_known_hosts_file_is_refused(sshd: Sshd, echo: EchoServer,
                                             tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "known_hosts"
    with pytest.raises(TransportRefused, match="cannot read the known_hosts file") as err:
        tunnel(sshd, echo.port, known_hosts=missing).connect()
    assert str(missing) in str(err.value)


def test_wrong_user_key_is_refused(sshd: Sshd, echo: EchoServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    ssh_keygen(stranger, "stranger")
    with pytest.raises(TransportRefused, match="refused the key") as err:
        tunnel(sshd, echo.port, key=stranger).connect()
    assert str(stranger) in str(err.value) and repr(sshd.user) in str(err.value)
    assert "Permission denied (publickey)" in str(err.value)  # ssh's own words


def test_restricted_worker_key_tunnels_to_its_port_only(sshd: Sshd, echo: EchoServer,
                                                         tmp_path: Path) -> None:
    private, public = generate_worker_keypair(tmp_path / "keys")
    sshd.set_authorized_keys([])  # only the restricted key may log in
    install_authorized_key(sshd.authorized_keys_path, authorized_keys_line(public, echo.port))
    channel = tunnel(sshd, echo.port, key=private).connect()
    try:
        for i in range(10):
            assert round_trip(channel, i)["call"] == "heartbeat"
    finally:
        channel.close()
    with EchoServer() as elsewhere:
        with pytest.raises(TransportRefused, match=f'permitopen="127.0.0.1:{elsewhere.port}"'):
            tunnel(sshd, elsewhere.port, key=private).connect()
        assert elsewhere.connections == 0


def test_boss_not_listening_is_a_retryable_error(sshd: Sshd, tmp_path: Path) -> None:
    with EchoServer() as gone:
        port = gone.port  # a port that was free a moment ago and is closed now
    with pytest.raises(TransportError, match="is `boss serve` running") as err:
        tunnel(sshd, port).connect()
    assert not isinstance(err.value, TransportRefused)


def test_channel_reports_the_boss_going_away(sshd: Sshd, echo: EchoServer) -> None:
    channel = tunnel(sshd, echo.port).connect()
    round_trip(channel, 1)
    echo.close()
    with pytest.raises(TransportError, match="closed the connection"):
        channel.recv_line()
    with pytest.raises(TransportError, match=r"is closed; call Transport\.connect"):
        channel.send(b"{}\n")


def test_sshd_going_away_fails_the_channel(sshd: Sshd, echo: EchoServer) -> None:
    channel = tunnel(sshd, echo.port, timeout=5.0).connect()
    round_trip(channel, 1)
    sshd.stop()
    with pytest.raises(TransportError, match=r"the SSH connection to .* ended") as err:
        round_trip(channel, 2)
    assert not isinstance(err.value, TransportRefused)  # the worker reconnects
    with pytest.raises(TransportError, match="cannot connect to the boss's sshd"):
        tunnel(sshd, echo.port).connect()



def ssh_children() -> set[int]:
    """This process's ``ssh`` descendants (sshd's own children are named sshd)."""
    found = set()
    for pid in _descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "ssh":
                found.add(pid)
        except OSError:
            continue  # exited while we looked
    return found


def test_close_ends_and_reaps_ssh(sshd: Sshd, echo: EchoServer) -> None:
    before = ssh_children()
    channel = tunnel(sshd, echo.port).connect()
    spawned = ssh_children() - before
    assert len(spawned) == 1  # one ssh carries the tunnel
    round_trip(channel, 1)
    channel.close()
    # reaped, not a zombie: a zombie keeps its /proc entry until waited for
    assert not [pid for pid in spawned if Path(f"/proc/{pid}").exists()]
    with pytest.raises(TransportError):
        tunnel(sshd, 1).connect()  # a failed connect leaves nothing behind either
    assert ssh_children() == before


def test_no_ssh_program_is_refused_naming_the_package(sshd: Sshd, echo: EchoServer,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(TransportRefused, match="openssh-client") as err:
        tunnel(sshd, echo.port).connect()
    assert "`ssh`, which is not on PATH" in str(err.value) and str(empty) in str(err.value)
    assert "publickey" not in sshd.log  # nothing was tried


def test_a_key_readable_by_others_is_refused_saying_chmod(sshd: Sshd, echo: EchoServer,
                                                          tmp_path: Path) -> None:
    key = tmp_path / "loose_key"
    shutil.copyfile(sshd.client_key_path, key)
    key.chmod(0o644)  # as a careless copy or umask leaves it; OpenSSH ignores such a key
    with pytest.raises(TransportRefused, match=rf"mode 0644.*chmod 600 {key}"):
        tunnel(sshd, echo.port, key=key).connect()
    key.chmod(0o600)  # the control: the same key, protected, logs in
    channel = tunnel(sshd, echo.port, key=key).connect()
    try:
        assert round_trip(channel, 1)["call"] == "heartbeat"
    finally:
        channel.close()


def test_paths_with_blanks_quotes_and_percent_reach_ssh_as_written(
        sshd: Sshd, echo: EchoServer, tmp_path: Path) -> None:
    odd = tmp_path / 'a dir %h "quoted" \\ %%'
    odd.mkdir()
    key, known_hosts = odd / "key %r", odd / "known hosts"
    shutil.copyfile(sshd.client_key_path, key)
    key.chmod(0o600)
    shutil.copyfile(sshd.known_hosts_path, known_hosts)
    channel = tunnel(sshd, echo.port, key=key, known_hosts=known_hosts).connect()
    try:
        assert round_trip(channel, 1)["call"] == "heartbeat"
    finally:
        channel.close()
    expanding = tmp_path / "${HOME}"
    expanding.mkdir()
    shutil.copyfile(sshd.known_hosts_path, expanding / "known_hosts")
    with pytest.raises(TransportRefused, match=r"expands \$\{\.\.\.\}"):
        tunnel(sshd, echo.port, known_hosts=expanding / "known_hosts").connect()


def test_an_sshd_that_never_greets_is_given_up_on(sshd: Sshd, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never speaks
        port = silent.getsockname()[1]
        known_hosts = tmp_path / "known_hosts"
        key_type, key_data = sshd.host_key_pub.split()[:2]
        known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_data}\n")
        stuck = SshTunnelTransport("127.0.0.1", port, sshd.user, sshd.client_key_path,
                                   known_hosts, 1, connect_timeout=1.0)
        before = ssh_children()
        with pytest.raises(TransportError, match=f"127.0.0.1:{port}") as err:
            stuck.connect()
    assert not isinstance(err.value, TransportRefused)  # a slow sshd may answer later
    assert ssh_children() == before
