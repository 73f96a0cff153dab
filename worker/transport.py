"""Transports: how a worker's newline-delimited JSON reaches the boss's RPC server.

The RPC client is handed a :class:`Transport` (as httpx takes
``Client(transport=...)``), calls ``connect()`` to get a :class:`Channel`, and
sends request lines / reads reply lines on it, one call at a time. Reconnecting
is the RPC client's job: when a channel fails it is closed, and the client
calls ``connect()`` again after a delay from :func:`worker.backoff.backoff_delays`.

Boss URLs (see :func:`transport_from_url` and :data:`TRANSPORTS`)::

    tcp://127.0.0.1:PORT                      a boss on this machine (no encryption)
    ssh://USER@HOST[:SSHPORT]?port=BOSSPORT   a remote boss through one SSH connection;
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
                                rejected, forward not permitted
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn, Protocol
from urllib.parse import SplitResult, parse_qsl, urlsplit

import paramiko

from protocol.errors import EcloudError, SettingsError
from protocol.messages import MAX_LINE

DEFAULT_BOSS_PORT = 7878  # the boss's default ``listen`` (protocol.settings)
DEFAULT_SSH_PORT = 22
DEFAULT_TIMEOUT = 30.0  # seconds for one send or one reply
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds for TCP connect, SSH handshake, auth, channel open
DEFAULT_KEEPALIVE = 15.0  # seconds; finds a dead SSH link even while the worker is idle
_RECV_CHUNK = 65536
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_OPEN_ADMINISTRATIVELY_PROHIBITED = 1  # RFC 4254 §5.1: sshd's "not permitted"


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
    """What a socket and a paramiko channel have in common."""

    def sendall(self, data: bytes, /) -> object: ...
    def recv(self, size: int, /) -> bytes: ...


class LineChannel:
    """A :class:`Channel` over anything with ``sendall``/``recv`` (a socket, an SSH channel).

    ``peer`` names the other end in error messages; ``closer`` releases the
    stream and its carrier (for SSH, the channel and the connection). The
    stream's own timeout (``settimeout``) bounds every send and receive.
    """

    def __init__(self, stream: _SocketLike, closer: Callable[[], None], peer: str,
                 timeout: float) -> None:
        self._stream = stream
        self._closer = closer
        self._peer = peer
        self._timeout = timeout
        self._buffer = bytearray()
        self._closed = False

    def send(self, data: bytes) -> None:
        self._check_open()
        try:
            self._stream.sendall(data)
        except TimeoutError as exc:
            self._fail(f"sending to {self._peer} did not finish within {self._timeout:g} s",
                       exc)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._fail(f"sending to {self._peer} failed: {exc}", exc)

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
                self._fail(f"no reply from {self._peer} within {self._timeout:g} s", exc)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self._fail(f"receiving from {self._peer} failed: {exc}", exc)
            if not chunk:
                partial = f" in the middle of a line ({scanned} bytes)" if scanned else ""
                self._fail(f"{self._peer} closed the connection{partial}", None)
            self._buffer += chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        try:
            self._closer()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # closing a broken link can fail; there is nothing left to release

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"the channel to {self._peer} is closed; call "
                                 "Transport.connect() for a new one")

    def _fail(self, message: str, cause: BaseException | None) -> NoReturn:
        self.close()
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
    """One SSH connection to the boss machine carrying one ``direct-tcpip`` channel.

    The channel goes to ``127.0.0.1:remote_port`` on the boss machine, where the
    boss's RPC server listens; it is reused for every call until it fails.
    The boss's host key must already be in ``known_hosts_path`` (as
    ``[HOST]:PORT`` when the SSH port is not 22): an unknown host or a different
    key refuses the connection; nothing is ever added to the file. The worker
    authenticates with the private key at ``key_path`` only.
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

    def connect(self) -> Channel:
        """Open the SSH connection and the tunnel channel.

        Raise TransportRefused for a configuration problem (unknown or changed
        host key, unreadable key, key rejected, forward not permitted) and
        TransportError for the rest (boss machine or boss server down).
        """
        pinned = self._pinned_keys()
        key = self._client_key()
        where = f"ssh://{self.user}@{self.host}:{self.port}"
        sock = _tcp_connect(self.host, self.port, self.connect_timeout, "the boss's sshd")
        ssh: paramiko.Transport | None = None
        try:
            ssh = paramiko.Transport(sock)
            ssh.banner_timeout = ssh.handshake_timeout = self.connect_timeout
            ssh.auth_timeout = self.connect_timeout
            # ask for the pinned key type first, as OpenSSH does, so a server with
            # several host keys presents the one we can check
            options = ssh.get_security_options()
            options.key_types = ([t for t in options.key_types if t in pinned]
                                 + [t for t in options.key_types if t not in pinned])
            ssh.start_client(timeout=self.connect_timeout)
            # check the host key before authenticating: nothing goes to an impostor
            self._check_host_key(ssh.get_remote_server_key(), pinned)
            remaining = ssh.auth_publickey(self.user, key)
            if remaining or not ssh.is_authenticated():
                raise TransportRefused(
                    f"{where} wants more than the key {self.key_path} to log in "
                    f"(also {', '.join(remaining) or 'something'}); the worker's user there "
                    "must accept public-key authentication alone")
            ssh.set_keepalive(int(self.keepalive))
            chan = ssh.open_channel("direct-tcpip", dest_addr=("127.0.0.1", self.remote_port),
                                    src_addr=("127.0.0.1", 0), timeout=self.connect_timeout)
            chan.settimeout(self.timeout)
        except TransportError:
            _close_quietly(ssh, sock)
            raise
        except paramiko.AuthenticationException as exc:
            _close_quietly(ssh, sock)
            raise TransportRefused(
                f"{where} refused the key {self.key_path} for user {self.user!r}: add the "
                "worker's public key to that user's authorized_keys on the boss machine "
                f"(boss.keys.authorized_keys_line): {exc}") from exc
        except paramiko.ChannelException as exc:
            _close_quietly(ssh, sock)
            if exc.code == _OPEN_ADMINISTRATIVELY_PROHIBITED:
                raise TransportRefused(
                    f"{where} does not let the key {self.key_path} forward to "
                    f"127.0.0.1:{self.remote_port}: its authorized_keys line must say "
                    f'permitopen="127.0.0.1:{self.remote_port}" (and the port must be the '
                    "boss's RPC port)") from exc
            raise TransportError(
                f"the boss machine ({where}) could not connect to the boss's RPC server at "
                f"127.0.0.1:{self.remote_port} ({exc.text}); is `boss serve` running "
                "there?") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            _close_quietly(ssh, sock)
            raise TransportError(f"SSH to {where} failed: {exc or type(exc).__name__}") from exc
        except BaseException:
            _close_quietly(ssh, sock)
            raise

        carrier = ssh

        def close() -> None:
            chan.close()
            carrier.close()

        return LineChannel(chan, close, f"the boss at {where} (tunnel to 127.0.0.1:"
                           f"{self.remote_port})", self.timeout)

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

    def _check_host_key(self, offered: paramiko.PKey, pinned: Mapping[str, paramiko.PKey]
                        ) -> None:
        expected = pinned.get(offered.get_name())
        if expected is not None and expected.asbytes() == offered.asbytes():
            return
        pins = ", ".join(f"{k.get_name()} {k.fingerprint}" for k in pinned.values())
        raise TransportRefused(
            f"HOST KEY MISMATCH for {self.host_key_name}: it presented "
            f"{offered.get_name()} {offered.fingerprint} but the known_hosts file "
            f"{self.known_hosts_path} pins {pins}. Refusing to connect: someone may be "
            "intercepting the connection. If the boss's host key was changed on purpose, "
            f"replace the {self.host_key_name} line in that file")

    def _client_key(self) -> paramiko.PKey:
        try:
            return paramiko.PKey.from_path(self.key_path)
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

    def __repr__(self) -> str:
        return (f"SshTunnelTransport({self.user}@{self.host}:{self.port} -> "
                f"127.0.0.1:{self.remote_port})")


def _close_quietly(ssh: paramiko.Transport | None, sock: socket.socket) -> None:
    try:
        if ssh is not None:
            ssh.close()
    finally:
        sock.close()


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
