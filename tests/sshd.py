"""A real OpenSSH sshd on 127.0.0.1 for tests and benchmarks.

``start_sshd(tmp_path)`` writes its own config, host key, client key and
known_hosts under ``tmp_path``, starts ``/usr/sbin/sshd -D`` on a free port and
returns once the server greets with an SSH banner. Use it as a context manager
or call ``stop()``; the ``sshd`` pytest fixture does both::

    from tests.sshd import sshd  # the fixture

    def test_x(sshd: Sshd) -> None:
        ...  # sshd.port, sshd.user, sshd.client_key_path, sshd.known_hosts_path

sshd re-reads authorized_keys on every connection, so ``add_authorized_key`` /
``set_authorized_keys`` take effect for the next connection without a restart.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest

from tests.ports import free_port

SSHD = Path("/usr/sbin/sshd")
HOST = "127.0.0.1"
START_TIMEOUT = 10.0  # seconds; sshd listens within ~10 ms, this is only a backstop
_PORT_ATTEMPTS = 3  # another process may take the free port between probe and bind


class SshdError(RuntimeError):
    """sshd could not be started; the message carries its log."""


def ssh_keygen(path: Path, comment: str) -> str:
    """Generate an ed25519 key pair at ``path`` (no passphrase); return the public line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, capture_output=True, timeout=30,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, from /proc (children before grandchildren)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the command name in field 2 may hold spaces: split after its ')'
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process exited while we looked
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found




@dataclass
class Sshd:
    """A running sshd; every path lives under the directory it was started in."""

    port: int
    process: subprocess.Popen[bytes]
    host_key_pub: str  # "ssh-ed25519 AAAA... comment"
    known_hosts_path: Path  # pins host_key_pub for [127.0.0.1]:port
    client_key_path: Path  # ed25519 private key, authorized without restrictions
    client_key_pub: str
    authorized_keys_path: Path
    config_path: Path
    log_path: Path
    host: str = HOST
    user: str = field(default_factory=getpass.getuser)

    @property
    def log(self) -> str:
        """sshd's log so far (LogLevel VERBOSE): why a key or a forward was refused."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def add_authorized_key(self, line: str) -> None:
        """Append one authorized_keys line; it applies to the next connection."""
        with self.authorized_keys_path.open("a") as f:
            f.write(line.rstrip("\n") + "\n")

    def set_authorized_keys(self, lines: list[str]) -> None:
        """Replace authorized_keys (e.g. with only a restricted worker key)."""
        self.authorized_keys_path.write_text("".join(line.rstrip("\n") + "\n" for line in lines))

    def stop(self) -> None:
        """Kill sshd and its per-connection children, so open sessions drop too; idempotent."""
        # each connection's sshd child calls setsid(), so a process-group kill misses it
        children = _descendants(self.process.pid) if self.process.poll() is None else []
        if self.process.poll() is None:
            self.process.kill()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - kill -9 does not hang
            pass

    def __enter__(self) -> Sshd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _config(root: Path, host: str, port: int, extra_config: str) -> str:
    return f"""\
ListenAddress {host}
Port {port}
HostKey {root / "host_ed25519"}
AuthorizedKeysFile {root / "authorized_keys"}
PidFile {root / "sshd.pid"}
UsePAM no
# the keys live in a pytest tmp dir, whose modes sshd would otherwise reject
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
X11Forwarding no
Subsystem sftp internal-sftp
LogLevel VERBOSE
{extra_config}
"""


def _wait_for_banner(proc: subprocess.Popen[bytes], host: str, port: int,
                     log_path: Path) -> bool:
    """True once sshd on ``host:port`` greets with an SSH banner; False if sshd exited."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                # the banner proves it is our sshd, not whoever else owns the port
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=10)
    raise SshdError(f"sshd did not accept connections on {host}:{port} within "
                    f"{START_TIMEOUT:.0f} s; its log {log_path}:\n{_read(log_path)}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"


def start_sshd(tmp_path: Path, authorized_keys: list[str] | None = None,
               extra_config: str = "", host: str = HOST, netns: str | None = None,
               port: int | None = None) -> Sshd:
    """Start sshd with its own keys under ``tmp_path / "sshd"``; return once it answers.

    ``authorized_keys`` are written after the generated client key's line (pass
    ``[]``, the default, for the client key alone; use ``set_authorized_keys`` to
    drop it). ``extra_config`` lines are appended to sshd_config. ``netns``: run
    sshd inside that network namespace (``ip netns exec``), listening on ``host``
    (an address there, reachable from here) and ``port`` (default: a free one).
    """
    if not SSHD.exists():
        raise SshdError(f"{SSHD} is missing: apt-get install openssh-server")
    # privilege separation directory; sshd refuses to start without it
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    root = tmp_path / "sshd"
    root.mkdir(parents=True, exist_ok=True)
    host_key_pub = ssh_keygen(root / "host_ed25519", "ecloud-test-host")
    client_key_path = root / "client_ed25519"
    client_key_pub = ssh_keygen(client_key_path, "ecloud-test-client")
    authorized = root / "authorized_keys"
    authorized.write_text("".join(k.rstrip("\n") + "\n"
                                  for k in [client_key_pub, *(authorized_keys or [])]))
    authorized.chmod(0o600)
    key_type, key_b64 = host_key_pub.split()[:2]
    log_path = root / "sshd.log"
    config_path = root / "sshd_config"
    stderr_path = root / "sshd.stderr"

    prefix = ["ip", "netns", "exec", netns] if netns else []
    for _ in range(_PORT_ATTEMPTS):
        port = port or free_port(host)
        config_path.write_text(_config(root, host, port, extra_config))
        log_path.write_text("")
        # stderr to a file, not a pipe: nobody drains a pipe while sshd runs, and an
        # unclosed pipe object is a ResourceWarning (an error under filterwarnings)
        with stderr_path.open("wb") as stderr_file:
            proc = subprocess.Popen(
                [*prefix, str(SSHD), "-f", str(config_path), "-D", "-E", str(log_path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr_file,
            )
        if _wait_for_banner(proc, host, port, log_path):
            known_hosts = root / "known_hosts"
            # ssh writes port 22 hosts bare, and so looks them up
            where = host if port == 22 else f"[{host}]:{port}"
            known_hosts.write_text(f"{where} {key_type} {key_b64}\n")
            return Sshd(port=port, process=proc, host_key_pub=host_key_pub,
                        known_hosts_path=known_hosts, client_key_path=client_key_path,
                        client_key_pub=client_key_pub, authorized_keys_path=authorized,
                        config_path=config_path, log_path=log_path, host=host)
        stderr = _read(stderr_path)
        if "Address already in use" not in _read(log_path) + stderr:
            break
        port = None
    raise SshdError(f"sshd exited at start (config {config_path}); log {log_path}:\n"
                    f"{_read(log_path)}\n{stderr}")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A fresh sshd for one test; skipped (with the reason) when sshd is not installed."""
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        why = f"needs {SSHD} and ssh-keygen: apt-get install openssh-server"
        print(f"\nSKIPPING sshd tests: {why}")
        pytest.skip(why)
    with start_sshd(tmp_path) as server:
        yield server
