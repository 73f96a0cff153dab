"""SshTunnelTransport against a real sshd on 127.0.0.1 and a JSON-lines echo server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from boss.keys import authorized_keys_line, generate_worker_keypair, install_authorized_key
from protocol import messages
from tests import sshd as sshd_helper
from tests.echo import EchoServer
from tests.sshd import Sshd, ssh_keygen
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
    assert isinstance(err.value.__cause__, Exception)  # paramiko's error, chained


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
    with pytest.raises(TransportError):
        round_trip(channel, 2)
    with pytest.raises(TransportError, match="cannot connect to the boss's sshd"):
        tunnel(sshd, echo.port).connect()
