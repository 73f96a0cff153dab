"""OpenSSH's client as the carrier of a worker's tunnel: ``ssh -W 127.0.0.1:BOSSPORT``.

Why a process and not paramiko: with paramiko the worker's own interpreter did
the packet framing, the MAC and a hand-off between paramiko's transport thread
and the caller, 1.6-1.8 ms of CPU per task against sshd's 0.15 ms (see
benchmarks/RESULTS.md, "Workers through real SSH tunnels"). ``ssh`` does the
same work in C, in its own process, and the worker only moves bytes through a
socket pair, as it does with a boss on direct TCP.

:class:`SshProcess` runs one ``ssh`` whose stdin and stdout are one end of a
socket pair; the caller reads and writes the other end. ssh logs at DEBUG2 to a
pipe that one thread drains (a full pipe would stall ssh): the line ``channel
0: open confirm`` is the only sign that the boss's port was reached (the RPC
server speaks only when spoken to), and the last plain (non-debug) lines say why
ssh gave up. :func:`diagnose` sorts those lines into a :class:`Problem`.

Everything here is about the ``ssh`` program; what a problem means for the
worker (which error, what to fix) is decided in ``worker/transport.py``.
"""

from __future__ import annotations

import enum
import itertools
import math
import re
import shutil
import socket
import subprocess
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROGRAM = "ssh"
INSTALL_HINT = "install the OpenSSH client (Debian/Ubuntu: apt-get install openssh-client)"
_OPEN_CONFIRMED = "channel 0: open confirm"  # DEBUG2, channels.c: the forward is open
_KEPT_LINES = 40  # plain lines kept for error messages; debug lines are dropped once read
_LINE_CHARS = 500  # ssh's lines are short; this bounds a pathological one
STOP_WAIT = 5.0  # seconds for ssh to exit after SIGTERM (then SIGKILL, same again)
# "The fingerprint for the ED25519 key sent by the remote host is" / "SHA256:...."
_OFFERED = re.compile(r"The fingerprint for the (\S+) key sent by the remote host is")
_FINGERPRINT = re.compile(r"^(SHA256:[A-Za-z0-9+/=]+|MD5:[0-9a-f:]+)\.?$")
# the banner box, the version, and VERBOSE notes on login and byte counts explain nothing
_NOT_REASONS = ("@", "OpenSSH_", "Authenticated to ", "Transferred: ", "Bytes per second")


class Problem(enum.Enum):
    """Why an ``ssh -W`` ended, as far as its log tells."""

    HOST_KEY_CHANGED = "host key changed"
    HOST_UNKNOWN = "host not in known_hosts"
    HOST_KEY_REFUSED = "host key verification failed"
    KEY_PERMISSIONS = "private key readable by others"
    KEY_UNUSABLE = "private key cannot be loaded"
    MORE_AUTH = "public key alone not enough"
    KEY_REJECTED = "public key rejected"
    FORWARD_PROHIBITED = "forward not permitted"
    FORWARD_FAILED = "forward target unreachable"
    SSHD_UNREACHABLE = "sshd unreachable"
    CONNECTION_LOST = "connection lost"
    OTHER = "other"


@dataclass(frozen=True)
class Diagnosis:
    """A :class:`Problem`, ssh's own words for it, and the host key ssh was offered
    ("ED25519 SHA256:...", only for HOST_KEY_CHANGED, when ssh printed it)."""

    problem: Problem
    said: str
    offered_fingerprint: str = ""


def diagnose(lines: Sequence[str]) -> Diagnosis:
    """Sort ssh's plain log lines (oldest first) into a :class:`Diagnosis`."""
    text = "\n".join(lines)
    said = "; ".join(line for line in lines if not line.startswith(_NOT_REASONS))

    def has(*needles: str) -> bool:
        return any(n in text for n in needles)

    if has("REMOTE HOST IDENTIFICATION HAS CHANGED", "has changed and you have requested"):
        offered = ""
        for before, line in itertools.pairwise(lines):
            kind = _OFFERED.search(before)
            if kind and _FINGERPRINT.match(line):
                offered = f"{kind.group(1)} {line.rstrip('.')}"
        return Diagnosis(Problem.HOST_KEY_CHANGED, said, offered)
    if has("host key is known for", "authenticity of host"):
        return Diagnosis(Problem.HOST_UNKNOWN, said)
    if has("Host key verification failed"):
        return Diagnosis(Problem.HOST_KEY_REFUSED, said)
    if has("UNPROTECTED PRIVATE KEY FILE", "bad permissions"):
        return Diagnosis(Problem.KEY_PERMISSIONS, said)
    if has("partial success"):
        return Diagnosis(Problem.MORE_AUTH, said)
    if has("Load key"):
        return Diagnosis(Problem.KEY_UNUSABLE, said)
    if has("Permission denied", "Too many authentication failures"):
        return Diagnosis(Problem.KEY_REJECTED, said)
    if has("open failed: administratively prohibited"):
        return Diagnosis(Problem.FORWARD_PROHIBITED, said)
    if has("open failed", "stdio forwarding failed"):
        return Diagnosis(Problem.FORWARD_FAILED, said)
    if has("ssh: connect to host", "Could not resolve hostname", "during banner exchange",
           "kex_exchange_identification"):
        return Diagnosis(Problem.SSHD_UNREACHABLE, said)
    if has("closed by remote host", "Connection closed by", "Connection reset",
           "not responding", "Broken pipe", "client_loop"):
        return Diagnosis(Problem.CONNECTION_LOST, said)
    return Diagnosis(Problem.OTHER, said)


class ConfigWordError(ValueError):
    """A path ssh would rewrite (``${VAR}``) or cannot take (a control character)."""


def config_word(path: Path) -> str:
    """``path`` as one word of an ``ssh -o`` option, taken literally by ssh.

    ssh splits option values on blanks, reads quotes and backslashes, and expands
    ``%`` tokens, ``${VAR}`` and a leading ``~`` in IdentityFile and
    UserKnownHostsFile; the path is made absolute, so never starts with ``~``.
    """
    text = str(path.absolute())
    if "${" in text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ConfigWordError(f"{text!r}: ssh would not read this path as written (it "
                              "expands ${...} and stops at control characters); move the "
                              "file to a plainer path")
    escaped = text.replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def tunnel_argv(program: str, *, host: str, port: int, user: str, key_path: Path,
                known_hosts_path: Path, remote_port: int, connect_timeout: float,
                keepalive: float) -> list[str]:
    """The ``ssh`` command line for one tunnel to ``127.0.0.1:remote_port`` on ``host``.

    Nothing outside the command line counts (``-F /dev/null``: neither the user's
    nor the system's ssh_config), only the given key is offered (no agent), the
    known_hosts file is only read (strict checking, no host key updates), and
    nothing ever prompts. ``-W`` implies ``-N -T``, ExitOnForwardFailure and
    ClearAllForwardings.
    """
    options = {
        "BatchMode": "yes",
        "LogLevel": "DEBUG2",  # for "open confirm": see the module docstring
        "IdentityFile": config_word(key_path),
        "IdentitiesOnly": "yes",
        "IdentityAgent": "none",
        "PreferredAuthentications": "publickey",
        "UserKnownHostsFile": config_word(known_hosts_path),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
        "UpdateHostKeys": "no",
        "CheckHostIP": "no",
        "VerifyHostKeyDNS": "no",
        "ControlMaster": "no",
        "ControlPath": "none",
        "ForwardAgent": "no",
        "ForwardX11": "no",
        "PermitLocalCommand": "no",
        "ConnectTimeout": str(max(1, math.ceil(connect_timeout))),
        # ServerAliveCountMax (default 3) unanswered probes end ssh: a dead link is
        # noticed even while the worker is idle
        "ServerAliveInterval": str(max(1, round(keepalive))),
    }
    argv = [program, "-F", "/dev/null"]
    for name, value in options.items():
        argv += ["-o", f"{name}={value}"]
    # "--": a host name can never be read as an option
    return [*argv, "-p", str(port), "-l", user, "-W", f"127.0.0.1:{remote_port}", "--",
            host]


def find_program() -> str | None:
    """The ``ssh`` on PATH, or None."""
    return shutil.which(PROGRAM)


class SshProcess:
    """One running ``ssh``: its stdio is ``peer``'s other end, its log is drained.

    Start it with :meth:`start`; :meth:`wait_open` tells whether the forward
    opened; :meth:`stop` ends and reaps it (idempotent, thread-safe).
    """

    def __init__(self, process: subprocess.Popen[bytes], peer: socket.socket) -> None:
        self.process = process
        self.peer = peer
        self._lines: deque[str] = deque(maxlen=_KEPT_LINES)
        self._opened = False
        self._settled = threading.Event()  # the forward opened, or ssh's log ended
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._reader = threading.Thread(target=self._drain, name=f"ssh-log-{process.pid}",
                                        daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, argv: list[str]) -> SshProcess:
        """Spawn ``argv`` on a new socket pair; OSError if it cannot be run."""
        ours, theirs = socket.socketpair()
        try:
            # a session of its own: a Ctrl-C meant for the worker must not kill the
            # tunnel its graceful shutdown still says goodbye through
            process = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=theirs.fileno(),
                                       stderr=subprocess.PIPE, start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(process, ours)

    def _drain(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        try:
            for raw in stream:
                line = raw[:_LINE_CHARS].decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("debug"):
                    if not self._opened and _OPEN_CONFIRMED in line:
                        self._opened = True
                        self._settled.set()
                    continue
                self._lines.append(line)
        except (OSError, ValueError):
            pass  # the pipe was closed under us by stop(): nothing more to read
        finally:
            self._settled.set()

    def wait_open(self, timeout: float) -> bool | None:
        """True once the forward is open, False if ssh ended first, None on timeout."""
        if not self._settled.wait(timeout):
            return None
        return self._opened

    def lines(self) -> list[str]:
        """ssh's last plain log lines, oldest first."""
        return list(self._lines)

    def exited(self, within: float) -> int | None:
        """ssh's exit status once it has exited (waiting up to ``within`` s), else None."""
        try:
            status = self.process.wait(within)
        except subprocess.TimeoutExpired:
            return None
        # the log ends with the process: read it to the end for the reason
        self._reader.join(STOP_WAIT)
        return status

    def stop(self) -> None:
        """Close our end, end ssh (SIGTERM, then SIGKILL) and reap it; bounded."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.peer.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                try:
                    self.process.wait(STOP_WAIT)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL ends it
                    pass
        self._reader.join(STOP_WAIT)
        if not self._reader.is_alive() and self.process.stderr is not None:
            self.process.stderr.close()
