"""worker.transport without SSH: line framing, direct TCP, errors and boss URLs."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import worker.transport as transport_module
from protocol import messages
from protocol.errors import EcloudError, SettingsError
from tests.echo import EchoServer
from worker import ssh_tunnel
from worker.transport import (
    LineChannel,
    SshTunnelTransport,
    TcpTransport,
    TransportError,
    transport_from_url,
)


@pytest.fixture
def pair() -> Iterator[tuple[LineChannel, socket.socket]]:
    """A LineChannel on one end of a socket pair; the test plays the boss on the other."""
    ours, theirs = socket.socketpair()
    ours.settimeout(2.0)
    channel = LineChannel(ours, ours.close, "the test peer", 2.0)
    try:
        yield channel, theirs
    finally:
        channel.close()
        theirs.close()


def test_lines_are_split_joined_and_kept_in_order(
        pair: tuple[LineChannel, socket.socket]) -> None:
    channel, peer = pair
    peer.sendall(b'{"a":1}\n{"b":2}\n{"c"')
    assert channel.recv_line() == b'{"a":1}\n'
    assert channel.recv_line() == b'{"b":2}\n'
    peer.sendall(b':3}\n')
    assert channel.recv_line() == b'{"c":3}\n'
    channel.send(b"ping\n")
    assert peer.recv(100) == b"ping\n"


def test_end_of_stream_mid_line_is_an_error_and_closes(
        pair: tuple[LineChannel, socket.socket]) -> None:
    channel, peer = pair
    peer.sendall(b'{"half":')
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(TransportError, match=r"closed the connection in the middle of a line"):
        channel.recv_line()
    with pytest.raises(TransportError, match=r"is closed; call Transport\.connect"):
        channel.recv_line()


def test_a_line_longer_than_max_line_is_refused(pair: tuple[LineChannel, socket.socket],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "MAX_LINE", 1000)
    channel, peer = pair
    peer.sendall(b"x" * 70_000)  # more than one recv chunk, no newline
    with pytest.raises(TransportError, match="longer than 1000 bytes"):
        channel.recv_line()


def test_no_reply_times_out(pair: tuple[LineChannel, socket.socket]) -> None:
    channel, _ = pair
    channel._stream.settimeout(0.05)  # type: ignore[attr-defined]
    with pytest.raises(TransportError, match="no reply from the test peer") as err:
        channel.recv_line()
    assert isinstance(err.value.__cause__, TimeoutError)


def test_tcp_transport_round_trips() -> None:
    with EchoServer() as echo:
        channel = TcpTransport("127.0.0.1", echo.port, timeout=5).connect()
        try:
            for i in range(100):
                channel.send(messages.request(i, "pop", {"n": 1}))
                assert messages.parse_reply(channel.recv_line())[0] == i
        finally:
            channel.close()
        assert echo.connections == 1


def test_tcp_transport_names_the_boss_it_cannot_reach() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(TransportError, match=f"127.0.0.1:{port}.*refused") as err:
            TcpTransport("127.0.0.1", port).connect()
    assert "boss serve" in str(err.value)
    assert isinstance(err.value, EcloudError) and isinstance(err.value.__cause__, OSError)


def test_tcp_transport_times_out_waiting_for_a_reply() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        channel = TcpTransport("127.0.0.1", silent.getsockname()[1], timeout=0.1).connect()
        channel.send(messages.request(1, "pop", {"n": 1}))
        with pytest.raises(TransportError, match=r"within 0\.1 s"):
            channel.recv_line()


def test_urls_build_the_right_transport(tmp_path: Path) -> None:
    tcp = transport_from_url("tcp://127.0.0.1:7000")
    assert isinstance(tcp, TcpTransport) and (tcp.host, tcp.port) == ("127.0.0.1", 7000)
    ssh = transport_from_url("ssh://ecloud@boss.example.org?port=9000",
                             key_path=tmp_path / "k", known_hosts=tmp_path / "kh")
    assert isinstance(ssh, SshTunnelTransport)
    assert (ssh.user, ssh.host, ssh.port, ssh.remote_port) == ("ecloud", "boss.example.org",
                                                                22, 9000)
    assert ssh.host_key_name == "boss.example.org"
    other = transport_from_url("ssh://u@10.0.0.5:2222", key_path="k", known_hosts="kh")
    assert isinstance(other, SshTunnelTransport)
    assert (other.port, other.remote_port, other.host_key_name) == (2222, 7878,
                                                                    "[10.0.0.5]:2222")


@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.1:7878", "scheme must be one of tcp://, ssh://"),
    ("127.0.0.1:7878", "scheme must be one of"),
    ("tcp://10.1.2.3:7878", "this machine only"),
    ("tcp://127.0.0.1", "give the boss's port"),
    ("tcp://127.0.0.1:99999", "bad port"),
    ("tcp://127.0.0.1:7878/x", "write it as tcp://"),
    ("ssh://boss.example.org", "write it as ssh://USER@HOST"),
    ("ssh://u:secret@boss.example.org", "no password"),
    ("ssh://u@boss.example.org?port=abc", "port='abc' must be"),
    ("ssh://u@boss.example.org?port=0", "port='0' must be"),
    ("ssh://u@boss.example.org?bossport=1", "unknown parameter"),
    ("ssh://u@boss.example.org/path", "unexpected path"),
])
def test_bad_urls_are_refused_naming_the_url(url: str, why: str) -> None:
    with pytest.raises(SettingsError, match=why.replace("?", r"\?")) as err:
        transport_from_url(url, key_path="k", known_hosts="kh")
    assert repr(url) in str(err.value)


def test_ssh_url_needs_a_key_and_known_hosts() -> None:
    with pytest.raises(SettingsError, match="needs the worker's private key"):
        transport_from_url("ssh://u@h?port=1", known_hosts="kh")


def _pinned(tmp_path: Path) -> Path:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILmCYUOgSw0W"
                           "86jbFfCcuEhCU83A73wVN6hvXw1+qkZW\n")
    return known_hosts


def test_a_missing_key_is_refused_before_connecting(tmp_path: Path) -> None:
    # port 2222 is never contacted: the key is checked first
    ssh = SshTunnelTransport("127.0.0.1", 2222, "u", tmp_path / "absent", _pinned(tmp_path))
    with pytest.raises(TransportError, match="cannot load the worker's SSH private key") as err:
        ssh.connect()
    assert str(tmp_path / "absent") in str(err.value)


def test_an_encrypted_key_is_refused_with_the_reason(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = tmp_path / "locked"
    key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.BestAvailableEncryption(b"secret")))
    ssh = SshTunnelTransport("127.0.0.1", 2222, "u", key, _pinned(tmp_path))
    with pytest.raises(TransportError, match=r"is encrypted.*without a passphrase"):
        ssh.connect()


def test_ssh_argv_reads_no_config_and_never_takes_the_host_for_an_option() -> None:
    argv = ssh_tunnel.tunnel_argv(
        "/usr/bin/ssh", host="-oProxyCommand=touch /tmp/x", port=2222, user="-l",
        key_path=Path("/k"), known_hosts_path=Path("/kh"), remote_port=7000,
        connect_timeout=2.5, keepalive=15.0)
    assert argv[:3] == ["/usr/bin/ssh", "-F", "/dev/null"]
    assert argv[-8:] == ["-p", "2222", "-l", "-l", "-W", "127.0.0.1:7000", "--",
                         "-oProxyCommand=touch /tmp/x"]
    options = dict(a.split("=", 1) for a in argv[4:-8:2])
    assert options["ConnectTimeout"] == "3" and options["ServerAliveInterval"] == "15"
    assert (options["StrictHostKeyChecking"], options["IdentityAgent"]) == ("yes", "none")


@pytest.mark.parametrize(("path", "word"), [
    ("/a b/k", '"/a b/k"'),
    ("/a%h/k", '"/a%%h/k"'),
    ('/a"b\\c', '"/a\\"b\\\\c"'),
])
def test_paths_are_quoted_for_ssh_options(path: str, word: str) -> None:
    assert ssh_tunnel.config_word(Path(path)) == word


# ssh 9.2's own lines (LogLevel DEBUG2, debug lines dropped), as SshProcess keeps them
@pytest.mark.parametrize(("lines", "problem"), [
    (["Authenticated to 127.0.0.1 ([127.0.0.1]:41755) using \"publickey\".",
      "channel 0: open failed: administratively prohibited: open failed",
      "stdio forwarding failed"], ssh_tunnel.Problem.FORWARD_PROHIBITED),
    (["channel 0: open failed: connect failed: Connection refused",
      "stdio forwarding failed"], ssh_tunnel.Problem.FORWARD_FAILED),
    (["root@127.0.0.1: Permission denied (publickey)."], ssh_tunnel.Problem.KEY_REJECTED),
    (["Permissions 0644 for 'k644' are too open.", 'Load key "k644": bad permissions',
      "root@127.0.0.1: Permission denied (publickey)."], ssh_tunnel.Problem.KEY_PERMISSIONS),
    (["No ED25519 host key is known for [127.0.0.1]:41755 and you have requested strict "
      "checking.", "Host key verification failed."], ssh_tunnel.Problem.HOST_UNKNOWN),
    (["ssh: connect to host 127.0.0.1 port 1: Connection refused"],
     ssh_tunnel.Problem.SSHD_UNREACHABLE),
    (["client_loop: send disconnect: Broken pipe"], ssh_tunnel.Problem.CONNECTION_LOST),
])
def test_ssh_complaints_are_sorted(lines: list[str], problem: ssh_tunnel.Problem) -> None:
    found = ssh_tunnel.diagnose(lines)
    assert found.problem is problem
    assert "Authenticated to" not in found.said and lines[-1] in found.said


def test_a_changed_host_key_diagnosis_carries_the_offered_fingerprint() -> None:
    found = ssh_tunnel.diagnose([
        "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @",
        "The fingerprint for the ED25519 key sent by the remote host is",
        "SHA256:j5DEDgDeUyseXADCmKM9wL5+Fp8xYBjWPZt9YX+kaAM.",
        "Host key verification failed."])
    assert found.problem is ssh_tunnel.Problem.HOST_KEY_CHANGED
    assert found.offered_fingerprint == "ED25519 SHA256:j5DEDgDeUyseXADCmKM9wL5+Fp8xYBjWPZt9YX+kaAM"
