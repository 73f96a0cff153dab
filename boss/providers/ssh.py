"""The ``ssh`` provider: workers on an existing pool of hosts, started over SSH (fabric).

The hosts are ``[ssh] hosts``. The boss logs in to each with ``[ssh] key_file``
(pinned by ``[ssh] known_hosts``: an unknown or changed host key is refused)
and, for each worker, writes a directory ``REMOTE_DIR/workers/NAME/`` holding
the worker's token, its SSH key and a known_hosts line pinning the boss (all
0600), and an ``ecloud.toml`` with its ``[worker]`` table. It then starts

    PYTHON REMOTE_DIR/ecloud-worker-HASH.pyz --settings .../NAME/ecloud.toml run --burst

in a session of its own, with its output in ``.../NAME/worker.log``. The
``.pyz`` is the boss's own ``protocol`` and ``worker`` packages (install =
``upload``), uploaded once per host and named by its content, so a host always
runs the boss's exact version; with install = ``none`` the hosts'
``worker_command`` runs instead. The worker reaches the boss through its own
SSH tunnel to ``[boss] ssh_host`` (:mod:`boss.providers.reach`), never through
the boss's login.

A worker's reference is ``HOST/NAME/PID`` (HOST as written in the settings).
``delete`` sends SIGTERM to its process group, SIGKILL after a grace period,
and removes its secrets (the log stays). ``list`` finds the processes whose
``--settings`` lies under ``REMOTE_DIR/workers/``. A host holds at most
``workers_per_host`` workers: ``create`` fills the hosts with the most room
first and reports the rest as :class:`Failed` ("no free host").

Everything a host runs is a short Python program given to ``[ssh] python``
on the command line (``/proc`` is read there, no ``ps`` or ``pgrep`` needed),
with every value passed as a shell-quoted argument.

    ProviderError (boss.providers)   no hosts configured, a host cannot be
                                     reached or refused a command; ``create``
                                     turns it into a Failed per worker
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import logging
import re
import shlex
import threading
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from boss.providers import (
    Created,
    Failed,
    Instance,
    Provider,
    ProviderError,
    WorkerSpec,
    register,
)
from boss.providers.reach import Boot, boot_for
from boss.startup import toml_string, worker_tuning
from protocol.settings import Settings, SshSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.-]+$")  # a worker name: one path segment

GRACE_SECONDS = 10.0  # after SIGTERM, before SIGKILL: time to finish and say goodbye
MAX_PARALLEL = 16  # hosts worked on at once

# Run by [ssh] python on a host. argv: marker (REMOTE_DIR/workers/). Prints [[pid, name], ...].
_LIST = r"""
import json, os, sys
marker = sys.argv[1]
found = []
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        argv = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        state = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        continue
    if state == "Z":
        continue
    for a in argv:
        a = a.decode(errors="replace")
        if a.startswith(marker) and a.endswith("/ecloud.toml"):
            found.append([int(d), a[len(marker):].split("/")[0]])
            break
print(json.dumps(found))
"""

# argv: worker dir, then the worker's command. Prints the pid of the new session.
_START = r"""
import subprocess, sys
d = sys.argv[1]
with open(d + "/worker.log", "ab") as log:
    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True, cwd=d)
print(p.pid)
"""

# argv: pid, marker, grace seconds, worker dir. Stops the worker's process group if it
# is ours, then removes the worker's secrets (its log stays).
_STOP = r"""
import os, signal, sys, time
pid, marker, grace, wdir = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
def ours():
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and any(a.decode(errors="replace").startswith(marker) for a in argv)
def kill(sig):
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
if ours():
    kill(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and ours():
        time.sleep(0.05)
    if ours():
        kill(signal.SIGKILL)
for name in ("token", "worker_key"):
    try:
        os.remove(os.path.join(wdir, name))
    except FileNotFoundError:
        pass
"""


@dataclass(frozen=True)
class Host:
    """One pool host, as written in ``[ssh] hosts``: ``[USER@]HOST[:PORT]``."""

    entry: str
    user: str | None
    hostname: str
    port: int

    @classmethod
    def parse(cls, entry: str) -> Host:
        user, _, rest = entry.rpartition("@")
        hostname, port = rest, 22
        if rest.startswith("["):  # [::1]:2222
            hostname, _, tail = rest[1:].partition("]")
            port = int(tail[1:]) if tail.startswith(":") else 22
        elif rest.count(":") == 1:
            hostname, _, p = rest.partition(":")
            port = int(p)
        return cls(entry, user or None, hostname, port)


def worker_archive() -> bytes:
    """This boss's ``protocol`` and ``worker`` packages as a runnable zip (``python X.pyz``).

    Deterministic (sorted names, fixed timestamps), so equal code gives an equal
    file name on the hosts and is uploaded once.
    """
    import protocol
    import worker

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        def add(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)

        add("__main__.py", b"from worker.cli import main\nmain()\n")
        for package in (protocol, worker):
            root = Path(package.__file__ or "").parent
            for path in sorted(root.rglob("*")):
                if path.is_file() and path.suffix in (".py", ".typed"):
                    add(f"{root.name}/{path.relative_to(root).as_posix()}", path.read_bytes())
    return buf.getvalue()


@register("ssh")
class SshProvider(Provider):
    """Starts, stops and lists this boss's workers on the ``[ssh] hosts`` pool."""

    name = "ssh"

    def __init__(self, settings: Settings, *, boot: Boot | None = None,
                 grace_seconds: float = GRACE_SECONDS) -> None:
        self.settings = settings
        self.ssh: SshSettings = settings.ssh
        if not self.ssh.hosts:
            raise ProviderError("ssh: no hosts: list them in [ssh] hosts "
                                '(e.g. hosts = ["ecloud@10.0.0.2", "ecloud@10.0.0.3:2222"])')
        self.hosts = {h: Host.parse(h) for h in self.ssh.hosts}
        self._boot = boot
        self.grace_seconds = grace_seconds
        self._archive: tuple[str, bytes] | None = None
        self._conns: dict[str, Any] = {}
        self._homes: dict[str, str] = {}
        self._locks = {h: threading.Lock() for h in self.hosts}

    # ------------------------------------------------------------ the interface

    def create(self, specs: Sequence[WorkerSpec]) -> builtins.list[Created | Failed]:
        if not specs:
            return []
        try:
            boot = self.boot()
        except ProviderError as exc:
            return [Failed(s.worker_id, str(exc)) for s in specs]
        placed, failed = self._place(specs)
        out: dict[int, Created | Failed] = dict(failed)

        def start(item: tuple[WorkerSpec, str]) -> Created | Failed:
            spec, host = item
            try:
                pid = self._start(host, spec, boot)
            except ProviderError as exc:
                return Failed(spec.worker_id, str(exc))
            return Created(spec.worker_id, f"{host}/{spec.name}/{pid}",
                           self.hosts[host].hostname)

        for result in self._each(start, placed):
            out[result.worker_id] = result
        return [out[s.worker_id] for s in specs]

    def plan(self, specs: Sequence[WorkerSpec]) -> builtins.list[dict[str, Any]]:
        """Where each worker would go (the hosts are asked what they run) and what runs."""
        placed, failed = self._place(specs)
        where = {spec.worker_id: host for spec, host in placed}
        out: builtins.list[dict[str, Any]] = []
        for spec in specs:
            if spec.worker_id in failed:
                out.append({"worker": spec.name, "error": failed[spec.worker_id].error})
                continue
            host = where[spec.worker_id]
            wdir = self._worker_dir(host, spec)
            out.append({"worker": spec.name, "host": host,
                        "files": [f"{wdir}/{n}" for n in ("token", "known_hosts", "worker_key",
                                                          "ecloud.toml")],
                        "argv": self._worker_argv(host, wdir, upload=False)})
        return out

    def delete(self, reference: str) -> None:
        rest, _, pid = reference.rpartition("/")
        host, _, name = rest.rpartition("/")
        if host not in self.hosts or not pid.isdigit() or not _NAME.match(name):
            raise ProviderError(f"ssh: {reference!r} is not a worker of this pool "
                                "(HOST/NAME/PID with HOST one of [ssh] hosts)")
        marker = self._marker(host)
        self._python(host, _STOP, pid, marker, str(self.grace_seconds), marker + name,
                     timeout=self.grace_seconds + self.ssh.command_seconds)

    def list(self) -> builtins.list[Instance]:
        running, unreachable = self._survey()
        for host, why in unreachable.items():
            log.warning("ssh: %s not listed: %s", host, why)
        return [Instance(f"{host}/{name}/{pid}", name, True)
                for host, found in running.items() for pid, name in found]

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    # ------------------------------------------------------------ parts

    def boot(self) -> Boot:
        if self._boot is None:
            self._boot = boot_for(self.settings, "ssh")
        return self._boot

    def _place(self, specs: Sequence[WorkerSpec]
               ) -> tuple[builtins.list[tuple[WorkerSpec, str]], dict[int, Failed]]:
        """Each spec on the host with the most room; a Failed for those that do not fit."""
        running, unreachable = self._survey()
        room = {h: self.ssh.workers_per_host - len(running.get(h, []))
                for h in self.hosts if h not in unreachable}
        placed: builtins.list[tuple[WorkerSpec, str]] = []
        failed: dict[int, Failed] = {}
        for spec in specs:
            host = max(room, key=lambda h: room[h], default=None)
            if host is None or room[host] <= 0:
                failed[spec.worker_id] = Failed(spec.worker_id, self._no_room(unreachable))
                continue
            room[host] -= 1
            placed.append((spec, host))
        return placed, failed

    def _no_room(self, unreachable: dict[str, str]) -> str:
        n, per = len(self.hosts), self.ssh.workers_per_host
        why = f"no free host in the ssh pool ({n} hosts x {per} workers each"
        if unreachable:
            why += f"; {len(unreachable)} unreachable, e.g. {next(iter(unreachable.values()))}"
        return why + ")"

    def _survey(self) -> tuple[dict[str, builtins.list[tuple[int, str]]], dict[str, str]]:
        """The workers running on each host, and the hosts that could not be asked (why)."""
        def ask(host: str) -> tuple[str, builtins.list[tuple[int, str]] | str]:
            try:
                text = self._python(host, _LIST, self._marker(host))
                return host, [(int(p), str(n)) for p, n in json.loads(text)]
            except ProviderError as exc:
                return host, str(exc)
            except (ValueError, TypeError):
                return host, f"ssh {host}: unexpected answer to the worker listing"

        running: dict[str, builtins.list[tuple[int, str]]] = {}
        unreachable: dict[str, str] = {}
        for host, found in self._each(ask, builtins.list(self.hosts)):
            if isinstance(found, str):
                unreachable[host] = found
            else:
                running[host] = found
        return running, unreachable

    def _worker_dir(self, host: str, spec: WorkerSpec) -> str:
        return f"{self._remote_dir(host)}/workers/{spec.name}"

    def _start(self, host: str, spec: WorkerSpec, boot: Boot) -> int:
        if not _NAME.match(spec.name):
            raise ProviderError(f"ssh: worker name {spec.name!r} is not one path segment")
        remote = self._remote_dir(host)
        wdir = self._worker_dir(host, spec)
        self._run(host, f"umask 077 && mkdir -p {shlex.quote(wdir)} {shlex.quote(remote)}/work "
                        f"{shlex.quote(remote)}/cache && chmod 700 {shlex.quote(wdir)}")
        files = {"token": spec.token + "\n",
                 "known_hosts": boot.known_hosts + "\n",
                 "ecloud.toml": self._worker_toml(remote, wdir, spec, boot)}
        if boot.worker_key:
            files["worker_key"] = boot.worker_key + "\n"
        for name, text in files.items():
            self._put(host, text.encode(), f"{wdir}/{name}")
        out = self._python(host, _START, wdir, *self._worker_argv(host, wdir, upload=True))
        try:
            return int(out.strip())
        except ValueError:
            raise ProviderError(f"ssh {host}: the worker did not start: {out.strip()!r}"
                                ) from None

    def _worker_toml(self, remote: str, wdir: str, spec: WorkerSpec, boot: Boot) -> str:
        lines = ["[worker]",
                 f"boss = {toml_string(boot.boss_url)}",
                 f"token_file = {toml_string(wdir + '/token')}",
                 f"known_hosts = {toml_string(wdir + '/known_hosts')}",
                 f"slots = {spec.slots}",
                 f"workdir = {toml_string(remote + '/work')}",
                 f"cache_dir = {toml_string(remote + '/cache')}",
                 worker_tuning(self.settings)]
        if boot.worker_key:
            lines.insert(3, f"ssh_key = {toml_string(wdir + '/worker_key')}")
        return "\n".join(lines) + "\n"

    def _worker_argv(self, host: str, wdir: str, upload: bool) -> builtins.list[str]:
        """``worker --settings WDIR/ecloud.toml run --burst``; ``upload``: the archive first."""
        tail = ["--settings", f"{wdir}/ecloud.toml", "run", "--burst"]
        if self.ssh.install == "none":
            return [*shlex.split(self.ssh.worker_command), *tail]
        digest, data = self._worker_archive()
        path = f"{self._remote_dir(host)}/ecloud-worker-{digest}.pyz"
        if upload:
            present = self._run(host, f"test -f {shlex.quote(path)} && echo yes || echo no")
            if present.strip() != "yes":
                self._put(host, data, path + ".part")
                self._run(host, f"mv -f {shlex.quote(path + '.part')} {shlex.quote(path)}")
        return [self.ssh.python, path, *tail]

    def _worker_archive(self) -> tuple[str, bytes]:
        if self._archive is None:
            data = worker_archive()
            self._archive = (hashlib.sha256(data).hexdigest()[:16], data)
        return self._archive

    def _marker(self, host: str) -> str:
        return f"{self._remote_dir(host)}/workers/"

    def _remote_dir(self, host: str) -> str:
        """``[ssh] remote_dir`` on ``host``: ``{host}`` filled in, ``~`` made absolute."""
        value = self.ssh.remote_dir.replace("{host}", self.hosts[host].hostname)
        if value == "~" or value.startswith("~/"):
            home = self._homes.get(host)
            if home is None:
                home = self._homes[host] = self._run(host, 'printf %s "$HOME"')
                if not home.startswith("/"):
                    raise ProviderError(f"ssh {host}: $HOME is {home!r}, not an absolute path")
            value = home + value[1:]
        return str(PurePosixPath(value))

    # ------------------------------------------------------------ SSH

    def _each(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> builtins.list[Any]:
        if len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(min(MAX_PARALLEL, len(items))) as pool:
            return builtins.list(pool.map(fn, items))

    def _python(self, host: str, program: str, *args: str, timeout: float | None = None) -> str:
        argv = [self.ssh.python, "-c", program, *args]
        return self._run(host, shlex.join(argv), timeout=timeout)

    def _run(self, host: str, command: str, timeout: float | None = None) -> str:
        """``command`` on ``host`` through its shell; its stdout, or ProviderError."""
        def go(conn: Any) -> str:
            result = conn.run(command, hide=True, warn=True, in_stream=False,
                              timeout=timeout or self.ssh.command_seconds)
            if result.exited != 0:
                err = (result.stderr.strip() or result.stdout.strip()).splitlines()
                raise ProviderError(f"ssh {host}: a command failed (exit {result.exited}): "
                                    f"{err[-1] if err else 'no output'}")
            return str(result.stdout)
        return self._with_connection(host, go)

    def _put(self, host: str, data: bytes, path: str) -> None:
        def go(conn: Any) -> None:
            sftp = conn.sftp()
            with sftp.open(path, "wb") as f:
                f.set_pipelined(True)
                f.write(data)
            sftp.chmod(path, 0o600 if not path.endswith(".part") else 0o644)
        self._with_connection(host, go)

    def _with_connection(self, host: str, go: Callable[[Any], T]) -> T:
        """``go(connection)`` under the host's lock; one fresh connection after a broken one."""
        from invoke.exceptions import CommandTimedOut

        with self._locks[host]:
            for attempt in range(2):
                conn = self._connection(host)
                try:
                    return go(conn)
                except ProviderError:
                    raise
                except CommandTimedOut as exc:
                    raise ProviderError(f"ssh {host}: a command ran past {exc.timeout} s"
                                        ) from None
                except (OSError, EOFError) as exc:
                    conn.close()
                    self._conns.pop(host, None)
                    if attempt == 1 or not _broken_session(exc):
                        raise ProviderError(f"ssh {host}: {exc}") from None
                except Exception as exc:  # paramiko's SSHException and relatives
                    conn.close()
                    self._conns.pop(host, None)
                    raise ProviderError(f"ssh {host}: {_ssh_error(exc)}") from None
            raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self, host: str) -> Any:
        conn = self._conns.get(host)
        if conn is not None and conn.is_connected:
            return conn
        import paramiko
        from fabric import Connection

        h = self.hosts[host]
        key = str(Path(self.ssh.key_file).expanduser()) if self.ssh.key_file else None
        kwargs: dict[str, Any] = ({"key_filename": key, "look_for_keys": False,
                                   "allow_agent": False} if key else {})
        kwargs["banner_timeout"] = self.ssh.connect_seconds
        kwargs["auth_timeout"] = self.ssh.connect_seconds
        conn = Connection(h.hostname, user=h.user, port=h.port,
                          connect_timeout=max(1, round(self.ssh.connect_seconds)),
                          connect_kwargs=kwargs)
        # fabric trusts unknown hosts on first use; the boss pins them instead
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        known = Path(self.ssh.known_hosts).expanduser()
        try:
            conn.client.load_host_keys(str(known))
        except OSError as exc:
            raise ProviderError(f"ssh: cannot read [ssh] known_hosts {known}: "
                                f"{exc.strerror or exc}") from None
        try:
            conn.open()
        except Exception as exc:
            conn.close()
            raise ProviderError(f"ssh {host}: cannot connect: {_ssh_error(exc)}") from None
        self._conns[host] = conn
        return conn


def _broken_session(exc: BaseException) -> bool:
    """An error of a connection that was open before (worth one reconnect)."""
    return isinstance(exc, EOFError | ConnectionError | BrokenPipeError)


def _ssh_error(exc: BaseException) -> str:
    import paramiko

    if isinstance(exc, paramiko.BadHostKeyException):
        return (f"its host key changed (got {exc.key.get_name()} "
                f"{exc.key.get_base64()[:16]}...): fix [ssh] known_hosts if that is expected")
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        return "its host key is not in [ssh] known_hosts (the boss does not trust on first use)"
    if isinstance(exc, paramiko.AuthenticationException):
        return f"login refused ({exc}); check [ssh] key_file and the host's authorized_keys"
    return str(exc) or type(exc).__name__
