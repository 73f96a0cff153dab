"""Transports: how a worker's newline-delimited JSON reaches the boss's RPC server.

The RPC client is handed a :class:`Transport` (as httpx takes
``Client(transport=...)``), calls ``connect()`` to get a :class:`Channel`, and
sends request lines / reads reply lines on it, one call at a time. Reconnecting
is the RPC client's job: when a channel fails it is closed, and the client
calls ``connect()`` again after a delay from :func:`worker.backoff.backoff_delays`.

Boss URLs (see :func:`transport_from_url` and :data:`TRANSPORTS`)::

    tcp://127.0.0.1:PORT                      a boss on this machine (no encryption)
    ssh://USER@HOST[:SSHPORT]?port=BOSSPORT   a remote boss through one SSH connection
                                              (OpenSSH's `ssh -W`, worker/ssh_tunnel.py);
                                              BOSSPORT is the boss's RPC port on the
                                              boss machine's 127.0.0.1 (default 7878),
                                              SSHPORT defaults to 22

Errors (``worker/errors.py`` did not exist when this was written, so the tree
hangs from the shared base directly)::

    EcloudError (protocol.errors)
    └── TransportError          the boss cannot be reached or the link broke:
        │                       reconnect with backoff
        └── TransportRefused    retrying will not help until someone fixes the
                                configuration: host key unknown or changed, key
                                rejected or unprotected, forward not permitted,
                                no `ssh` program
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn, Protocol
from urllib.parse import SplitResult, parse_qsl, urlsplit

import paramiko

from protocol.errors import EcloudError, SettingsError
from protocol.messages import MAX_LINE
from worker import ssh_tunnel

DEFAULT_BOSS_PORT = 7878  # the boss's default ``listen`` (protocol.settings)
DEFAULT_SSH_PORT = 22
DEFAULT_TIMEOUT = 30.0  # seconds for one send or one reply
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds for TCP connect, SSH handshake, auth, channel open
DEFAULT_KEEPALIVE = 15.0  # seconds; finds a dead SSH link even while the worker is idle
_RECV_CHUNK = 65536
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_SETTLE = 2.0  # seconds for a carrier whose stream ended to exit and say why


class TransportError(EcloudError):
    """The boss cannot be reached, or the connection to it broke; reconnect with backoff."""


class TransportRefused(TransportError):
    """The boss's side refused the connection for a reason retrying will not fix."""


class Channel(Protocol):
    """A connected byte stream to the boss's RPC server; one call at a time, not thread-safe.

    Any error closes the channel (a late reply would be matched to the wrong
    request); get a new one from ``Transport.connect()``.
    """

    def send(self, data: bytes) -> None:
        """Send all of ``data``; raise TransportError on failure or timeout."""

    def recv_line(self) -> bytes:
        """Return the next line, ending in ``b"\\n"``, at most ``MAX_LINE`` bytes long.

        Raise TransportError on timeout, on end of stream, or on an over-long line.
        """

    def close(self) -> None:
        """Close the channel and whatever connection carries it; idempotent."""


class Transport(Protocol):
    """A way to reach the boss: each ``connect()`` makes a new, independent channel."""

    def connect(self) -> Channel:
        """Open a channel to the boss's RPC server; raise TransportError if it cannot."""


class _SocketLike(Protocol):
    """What LineChannel needs of a stream (a socket)."""

    def sendall(self, data: bytes, /) -> object: ...
    def recv(self, size: int, /) -> bytes: ...


class LineChannel:
    """A :class:`Channel` over anything with ``sendall``/``recv`` (a socket).

    ``peer`` names the other end in error messages; ``closer`` releases the
    stream and its carrier (for SSH, the ``ssh`` process). The stream's own
    timeout (``settimeout``) bounds every send and receive. ``explain``, when
    given, is asked before closing a failed stream whether the carrier knows
    better why it failed (waiting up to the seconds it is passed); the error it
    returns is raised instead of the generic one (so an SSH refusal stays a
    TransportRefused).
    """

    def __init__(self, stream: _SocketLike, closer: Callable[[], None], peer: str,
                 timeout: float, *,
                 explain: Callable[[float], TransportError | None] | None = None) -> None:
        self._stream = stream
        self._closer = closer
        self._peer = peer
        self._timeout = timeout
        self._explain = explain
        self._buffer = bytearray()
        self._closed = False

    def send(self, data: bytes) -> None:
        self._check_open()
        try:
            self._stream.sendall(data)
        except TimeoutError as exc:
            self._fail(f"sending to {self._peer} did not finish within {self._timeout:g} s",
                       exc, 0.0)
        except OSError as exc:
            self._fail(f"sending to {self._peer} failed: {exc}", exc, _SETTLE)

    def recv_line(self) -> bytes:
        self._check_open()
        scanned = 0  # bytes already searched for a newline; avoids rescanning
        while True:
            end = self._buffer.find(b"\n", scanned)
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            scanned = len(self._buffer)
            if scanned > MAX_LINE:
                # the stream cannot be resynchronised after a runaway line
                self._fail(f"{self._peer} sent a line longer than {MAX_LINE} bytes without a "
                           "newline; is the boss URL pointing at the boss's RPC port?", None)
            try:
                chunk = self._stream.recv(_RECV_CHUNK)
            except TimeoutError as exc:
                self._fail(f"no reply from {self._peer} within {self._timeout:g} s", exc, 0.0)
            except OSError as exc:
                self._fail(f"receiving from {self._peer} failed: {exc}", exc, _SETTLE)
            if not chunk:
                partial = f" in the middle of a line ({scanned} bytes)" if scanned else ""
                self._fail(f"{self._peer} closed the connection{partial}", None, _SETTLE)
            self._buffer += chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        try:
            self._closer()
        except OSError:
            pass  # closing a broken link can fail; there is nothing left to release

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"the channel to {self._peer} is closed; call "
                                 "Transport.connect() for a new one")

    def _fail(self, message: str, cause: BaseException | None,
              explain_within: float | None = None) -> NoReturn:
        better = None
        if self._explain is not None and explain_within is not None and not self._closed:
            better = self._explain(explain_within)
        self.close()
        if better is not None:
            raise better from cause
        raise TransportError(f"{message}; reconnecting will open a new channel") from cause


def _tcp_connect(host: str, port: int, timeout: float, what: str) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError as exc:
        raise TransportError(f"cannot connect to {what} at {host}:{port}: no answer within "
                             f"{timeout:g} s") from exc
    except OSError as exc:
        raise TransportError(f"cannot connect to {what} at {host}:{port}: "
                             f"{exc.strerror or exc}") from exc
    # request/response lines are small: without NODELAY, Nagle + delayed ACK add ~40 ms
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class TcpTransport:
    """Direct TCP to a boss on this machine (``tcp://127.0.0.1:PORT``); not encrypted."""

    def __init__(self, host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def connect(self) -> Channel:
        """Open a new TCP connection; TransportError (e.g. boss not running) if it fails."""
        sock = _tcp_connect(self.host, self.port, self.connect_timeout,
                            "the boss (is `boss serve` running?)")
        sock.settimeout(self.timeout)
        return LineChannel(sock, sock.close, f"the boss at tcp://{self.host}:{self.port}",
                           self.timeout)

    def __repr__(self) -> str:
        return f"TcpTransport({self.host!r}, {self.port})"


class SshTunnelTransport:
    """A tunnel to the boss's RPC server carried by OpenSSH's client, ``ssh -W``.

    Each ``connect()`` starts one ``ssh`` (worker/ssh_tunnel.py) that logs in to the
    boss machine and forwards its stdin and stdout to ``127.0.0.1:remote_port``
    there, where the boss's RPC server listens; the channel is reused for every
    call until it fails, and closing it ends and reaps that ``ssh``. The boss's
    host key must already be in ``known_hosts_path`` (as ``[HOST]:PORT`` when the
    SSH port is not 22): an unknown host or a different key refuses the
    connection; nothing is ever added to the file. The worker authenticates with
    the private key at ``key_path`` only (no agent, no ssh_config).
    """

    def __init__(self, host: str, port: int, user: str, key_path: str | Path,
                 known_hosts_path: str | Path, remote_port: int = DEFAULT_BOSS_PORT, *,
                 timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 keepalive: float = DEFAULT_KEEPALIVE) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.key_path = Path(key_path)
        self.known_hosts_path = Path(known_hosts_path)
        self.remote_port = remote_port
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive

    @property
    def host_key_name(self) -> str:
        """The name the boss's key is filed under in known_hosts, as OpenSSH writes it."""
        return self.host if self.port == DEFAULT_SSH_PORT else f"[{self.host}]:{self.port}"

    @property
    def _where(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"

    def connect(self) -> Channel:
        """Start ``ssh`` and return once the tunnel to the boss's port is open.

        Raise TransportRefused for a configuration problem (unknown or changed
        host key, unreadable or unprotected key, key rejected, forward not
        permitted, no ``ssh`` program) and TransportError for the rest (boss
        machine or boss server down), all within ``connect_timeout``.
        """
        # what can be checked without a connection is, with messages ssh cannot give
        pinned = self._pinned_keys()
        self._check_client_key()
        program = ssh_tunnel.find_program()
        if program is None:
            raise TransportRefused(
                f"the worker reaches {self._where} through the OpenSSH client `ssh`, which "
                f"is not on PATH ({os.environ.get('PATH', '')}): {ssh_tunnel.INSTALL_HINT}")
        try:
            argv = ssh_tunnel.tunnel_argv(
                program, host=self.host, port=self.port, user=self.user,
                key_path=self.key_path, known_hosts_path=self.known_hosts_path,
                remote_port=self.remote_port, connect_timeout=self.connect_timeout,
                keepalive=self.keepalive)
        except ssh_tunnel.ConfigWordError as exc:
            raise TransportRefused(f"cannot give the worker's key or known_hosts file to "
                                   f"ssh: {exc}") from exc
        try:
            ssh = ssh_tunnel.SshProcess.start(argv)
        except OSError as exc:
            cls = TransportRefused if isinstance(exc, PermissionError) else TransportError
            raise cls(f"cannot run the OpenSSH client {program}: {exc}") from exc
        try:
            opened = ssh.wait_open(self.connect_timeout)
            if opened is None:
                said = ssh_tunnel.diagnose(ssh.lines()).said or "nothing"
                raise TransportError(
                    f"SSH to {self._where} did not open the tunnel to 127.0.0.1:"
                    f"{self.remote_port} within {self.connect_timeout:g} s (ssh said: {said})")
            if not opened:
                raise self._error(ssh, pinned, ssh.exited(ssh_tunnel.STOP_WAIT))
        except BaseException:
            ssh.stop()
            raise
        ssh.peer.settimeout(self.timeout)

        def explain(within: float) -> TransportError | None:
            status = ssh.exited(within)
            if status is None or status == 0:
                return None  # still running, or the boss's end closed: nothing to add
            return self._error(ssh, pinned, status)

        return LineChannel(ssh.peer, ssh.stop, f"the boss at {self._where} (tunnel to "
                           f"127.0.0.1:{self.remote_port})", self.timeout, explain=explain)

    def _error(self, ssh: ssh_tunnel.SshProcess, pinned: Mapping[str, paramiko.PKey],
               status: int | None) -> TransportError:
        """The error for an ``ssh`` that ended (with ``status``), from what it logged."""
        found = ssh_tunnel.diagnose(ssh.lines())
        said = found.said or "nothing"
        problem, where, key = found.problem, self._where, self.key_path
        name, known_hosts = self.host_key_name, self.known_hosts_path
        if problem is ssh_tunnel.Problem.HOST_KEY_CHANGED:
            pins = ", ".join(f"{k.get_name()} {k.fingerprint}" for k in pinned.values())
            return TransportRefused(
                f"HOST KEY MISMATCH for {name}: it presented "
                f"{found.offered_fingerprint or 'another key'} but the known_hosts file "
                f"{known_hosts} pins {pins}. Refusing to connect: someone may be "
                "intercepting the connection. If the boss's host key was changed on "
                f"purpose, replace the {name} line in that file")
        if problem is ssh_tunnel.Problem.HOST_UNKNOWN:
            return TransportRefused(
                f"the boss's host {name} offered no host key that the known_hosts file "
                f"{known_hosts} pins (ssh said: {said}); refusing to trust it on first use. "
                f"Add the line '{name} <the boss's host public key>' to that file")
        if problem is ssh_tunnel.Problem.HOST_KEY_REFUSED:
            return TransportRefused(f"ssh refused the host key of {name}, checked against "
                                    f"the known_hosts file {known_hosts}: {said}")
        if problem is ssh_tunnel.Problem.KEY_PERMISSIONS:
            return TransportRefused(
                f"ssh refuses the worker's SSH private key {key} because other users can "
                f"read it: chmod 600 {key} (ssh said: {said})")
        if problem is ssh_tunnel.Problem.KEY_UNUSABLE:
            return TransportRefused(
                f"ssh cannot load the worker's SSH private key {key} ({said}); point the "
                "worker at an OpenSSH private key file without a passphrase")
        if problem is ssh_tunnel.Problem.MORE_AUTH:
            return TransportRefused(
                f"{where} wants more than the key {key} to log in ({said}); the worker's "
                "user there must accept public-key authentication alone")
        if problem is ssh_tunnel.Problem.KEY_REJECTED:
            return TransportRefused(
                f"{where} refused the key {key} for user {self.user!r}: add the worker's "
                "public key to that user's authorized_keys on the boss machine "
                f"(boss.keys.authorized_keys_line); ssh said: {said}")
        if problem is ssh_tunnel.Problem.FORWARD_PROHIBITED:
            return TransportRefused(
                f"{where} does not let the key {key} forward to 127.0.0.1:"
                f"{self.remote_port}: its authorized_keys line must say "
                f'permitopen="127.0.0.1:{self.remote_port}" (and the port must be the '
                f"boss's RPC port); ssh said: {said}")
        if problem is ssh_tunnel.Problem.FORWARD_FAILED:
            return TransportError(
                f"the boss machine ({where}) could not connect to the boss's RPC server at "
                f"127.0.0.1:{self.remote_port} ({said}); is `boss serve` running there?")
        if problem is ssh_tunnel.Problem.SSHD_UNREACHABLE:
            return TransportError(
                f"cannot connect to the boss's sshd at {self.host}:{self.port}: {said}")
        return TransportError(f"the SSH connection to {where} ended (ssh exit status "
                              f"{status}, ssh said: {said}); reconnecting makes a new one")

    def _pinned_keys(self) -> dict[str, paramiko.PKey]:
        """The known_hosts keys for this host, by key type; re-read each connect."""
        host_keys = paramiko.HostKeys()
        try:
            host_keys.load(str(self.known_hosts_path))
        except (OSError, UnicodeDecodeError, paramiko.hostkeys.InvalidHostKey) as exc:
            raise TransportRefused(
                f"cannot read the known_hosts file {self.known_hosts_path} that pins the "
                f"boss's host key: {exc}") from exc
        entry = host_keys.lookup(self.host_key_name)
        if not entry:
            raise TransportRefused(
                f"the boss's host {self.host_key_name} is not in the known_hosts file "
                f"{self.known_hosts_path}; refusing to trust it on first use. Add the line "
                f"'{self.host_key_name} <the boss's host public key>' (from the boss "
                "machine's /etc/ssh/ssh_host_ed25519_key.pub) to that file")
        return {key_type: entry[key_type] for key_type in entry.keys()}

    def _check_client_key(self) -> None:
        """Refuse a key ssh could not use: unreadable, encrypted, or readable by others."""
        try:
            paramiko.PKey.from_path(self.key_path)
        except (paramiko.PasswordRequiredException, TypeError) as exc:
            # paramiko 5 hands OpenSSH-format keys to cryptography, which raises
            # TypeError("Key is password-protected, ...") instead of paramiko's error
            if isinstance(exc, TypeError) and "password" not in str(exc):
                raise TransportRefused(
                    f"cannot load the worker's SSH private key {self.key_path}: {exc}"
                ) from exc
            raise TransportRefused(
                f"the worker's SSH key {self.key_path} is encrypted; the worker runs "
                "unattended and needs a key without a passphrase "
                "(ssh-keygen -t ed25519 -N '')") from exc
        except (OSError, ValueError, paramiko.SSHException,
                paramiko.pkey.UnknownKeyType) as exc:
            raise TransportRefused(
                f"cannot load the worker's SSH private key {self.key_path}: {exc}; "
                "point the worker at an OpenSSH private key file") from exc
        info = self.key_path.stat()
        # OpenSSH's own rule (sshkey_perm_ok): only a key of one's own is judged
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            raise TransportRefused(
                f"the worker's SSH private key {self.key_path} can be read by other users "
                f"(mode {stat.S_IMODE(info.st_mode):04o}) and OpenSSH refuses such a key: "
                f"chmod 600 {self.key_path}")

    def __repr__(self) -> str:
        return (f"SshTunnelTransport({self.user}@{self.host}:{self.port} -> "
                f"127.0.0.1:{self.remote_port})")


# -- URLs ----------------------------------------------------------------------------------

_Builder = Callable[[str, SplitResult, Path | None, Path | None, float], Transport]


def _url_port(url: str, parts: SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError as exc:
        raise SettingsError(f"boss URL {url!r}: bad port: {exc}") from None


def _tcp(url: str, parts: SplitResult, key_path: Path | None, known_hosts: Path | None,
         timeout: float) -> Transport:
    host, port = parts.hostname, _url_port(url, parts)
    if parts.username or parts.query or parts.path not in ("", "/"):
        raise SettingsError(f"boss URL {url!r}: write it as tcp://127.0.0.1:PORT")
    if host not in _LOOPBACK:
        # the boss binds loopback only, and a token must not cross a network unencrypted
        raise SettingsError(f"boss URL {url!r}: tcp:// reaches a boss on this machine only "
                            "(127.0.0.1); for a remote boss use ssh://USER@HOST?port=PORT")
    if port is None:
        raise SettingsError(f"boss URL {url!r}: give the boss's port, e.g. "
                            f"tcp://127.0.0.1:{DEFAULT_BOSS_PORT}")
    return TcpTransport(host, port, timeout=timeout)


def _ssh(url: str, parts: SplitResult, key_path: Path | None, known_hosts: Path | None,
         timeout: float) -> Transport:
    form = f"ssh://USER@HOST[:SSHPORT]?port=BOSSPORT (BOSSPORT defaults to {DEFAULT_BOSS_PORT})"
    if not parts.hostname or not parts.username or parts.password is not None:
        raise SettingsError(f"boss URL {url!r}: write it as {form}; no password: the worker "
                            "logs in with its key")
    if parts.path not in ("", "/") or parts.fragment:
        raise SettingsError(f"boss URL {url!r}: unexpected path; write it as {form}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
    unknown = sorted(set(query) - {"port"})
    if unknown:
        raise SettingsError(f"boss URL {url!r}: unknown parameter(s) {', '.join(unknown)}; "
                            f"write it as {form}")
    raw = query.get("port", str(DEFAULT_BOSS_PORT))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"boss URL {url!r}: port={raw!r} must be the boss's RPC port "
                            "(1-65535)")
    if key_path is None or known_hosts is None:
        raise SettingsError(f"boss URL {url!r}: an ssh:// boss needs the worker's private key "
                            "file and a known_hosts file pinning the boss's host key")
    return SshTunnelTransport(parts.hostname, _url_port(url, parts) or DEFAULT_SSH_PORT,
                              parts.username, key_path, known_hosts, int(raw), timeout=timeout)


TRANSPORTS: dict[str, _Builder] = {"tcp": _tcp, "ssh": _ssh}
"""Boss URL scheme -> builder of the transport that reaches it."""


def transport_from_url(url: str, *, key_path: str | Path | None = None,
                       known_hosts: str | Path | None = None,
                       timeout: float = DEFAULT_TIMEOUT) -> Transport:
    """Build the transport for a boss URL (forms in the module docstring).

    ``key_path`` and ``known_hosts`` are required for ``ssh://``. The worker's
    token is not the transport's business: it travels in the ``hello`` call.
    Raise SettingsError naming the URL when it is malformed; nothing connects yet.
    """
    parts = urlsplit(url.strip())
    builder = TRANSPORTS.get(parts.scheme)
    if builder is None:
        raise SettingsError(f"boss URL {url!r}: scheme must be one of "
                            f"{', '.join(s + '://' for s in TRANSPORTS)}")
    return builder(url, parts, None if key_path is None else Path(key_path).expanduser(),
                   None if known_hosts is None else Path(known_hosts).expanduser(), timeout)
