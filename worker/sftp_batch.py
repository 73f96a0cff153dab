"""OpenSSH's own ``sftp`` client as the download engine of an SFTP datastore.

paramiko handles every 32 KiB SFTP packet in Python: about 64 MB/s in one
process and a few ms of CPU per small file. OpenSSH's ``sftp`` speaks the same
protocol in C with many requests in flight, as fast as ``scp``. An SFTP bucket
therefore keeps its paramiko session for metadata (stat, listing), uploads and
renames, and downloads big files and whole directories through ``sftp -b -``:

- :class:`Login` is how OpenSSH reaches the bucket: the bucket's key only
  (no agent, no ssh config), its pinned known_hosts with
  ``StrictHostKeyChecking=yes`` (never trust on first use), ``BatchMode=yes``
  (it never prompts). Nothing secret is on the command line: the key is a path.
- :class:`SftpProcess` is one ``sftp`` in batch mode, logged in once, fed one
  ``get`` at a time; an ``lpwd`` after each marks its end on stdout. A failed
  command ends a batch-mode sftp, whose last stderr lines (bounded) become the
  error's reason.
- :class:`worker.sftp_pool.SftpPool` holds up to ``size`` of them, one per
  thread downloading, and one SFTP stream for a directory's small files.

A download always goes to a temporary name beside the target and is renamed
into place, so a failed or interrupted one never leaves a partial file at the
target. The owner of the pool (a datastore) closes it, which ends every sftp
process: none outlives its attempt.

OpenSSH cannot be used, and paramiko stays, when the bucket logs in with a
password (ssh takes none non-interactively, and never on argv), without a
key_filename, with options only paramiko knows, when ``sftp`` is not
installed, or with ``openssh=no`` in the URL; and for one path OpenSSH's batch
syntax cannot carry (a control character, a command line over 2 KiB).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from worker.errors import DatastoreError

LINE_MAX = 2047  # sftp reads a batch command into a 2048-byte buffer
STDERR_TAIL = 2000  # bytes of sftp's stderr kept for an error message
STOP_SECONDS = 10.0  # how long a closing sftp may take to exit before it is killed
ALIVE_SECONDS = 15  # keepalive interval: a dead server is noticed within 4 of these
_MARK = b"Local working directory: /\n"  # lpwd's answer (the process runs in /)


class SftpError(DatastoreError):
    """An OpenSSH ``sftp`` download failed; the message names the store, path and reason."""


class SftpLoginError(SftpError):
    """An ``sftp`` process ended before it completed a command: it did not log in."""


@dataclass(frozen=True)
class Login:
    """How OpenSSH reaches an SFTP bucket; ``where`` names it in messages (no query)."""

    host: str
    port: int
    user: str | None
    key_filename: str
    known_hosts: str
    timeout: float
    where: str

    def ssh_options(self) -> list[str]:
        """``-o``/``-i`` options for ssh, scp or sftp: this key and host key, nothing else."""
        options = {
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": _config_path(self.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "UpdateHostKeys": "no",
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "ControlMaster": "no",
            "ControlPath": "none",
            "ConnectTimeout": str(max(1, math.ceil(self.timeout))),
            "ServerAliveInterval": str(ALIVE_SECONDS),
            "ServerAliveCountMax": "4",
            "LogLevel": "ERROR",
        }
        if self.user:
            options["User"] = self.user
        argv = ["-F", "/dev/null", "-i", self.key_filename.replace("%", "%%")]
        for key, value in options.items():
            argv += ["-o", f"{key}={value}"]
        return argv

    def sftp_argv(self, program: str = "sftp") -> list[str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return [program, "-b", "-", *self.ssh_options(), "-P", str(self.port), "--", host]

    def subsystem_argv(self, program: str = "ssh") -> list[str]:
        """``ssh ... -s HOST sftp``: the server's SFTP subsystem on stdin and stdout."""
        return [program, *self.ssh_options(), "-p", str(self.port), "-s", "--", self.host,
                "sftp"]


def usable(login: Login) -> bool:
    """Whether ssh's option syntax can carry this login's paths and names."""
    fields = (login.key_filename, login.known_hosts, login.user or "", login.host)
    return not any('"' in f or _has_control(f) for f in fields) and not any(
        c.isspace() for c in (login.user or "") + login.host)


def open_empty(path: Path) -> int:
    """Open ``path`` to write it from scratch; an existing empty file (a reservation) is
    not truncated, which on ext4 would flush the whole file to disk when it is closed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def temp_beside(path: Path) -> Path:
    """A unique temporary name in ``path``'s directory that starts with its name.

    The prefix keeps the name's owner recognisable: the input cache sweeps its
    temporary directory by the key its names start with.
    """
    return path.with_name(f"{path.name[:128]}.ecloud-part-{uuid.uuid4().hex}")


@contextmanager
def landing(local: Path, temp: Path) -> Iterator[None]:
    """A download to ``temp`` (``local`` itself for a caller whose ``local`` is a
    temporary name already): renamed to ``local`` when the block ends, removed when
    it fails, so ``local`` never holds part of a file."""
    try:
        yield
        if temp != local:
            os.replace(temp, local)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def end_process(proc: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    """End ``proc``: EOF on its input (or a kill), then a kill if it lingers."""
    if proc.poll() is not None:
        return
    if kill:
        proc.kill()
    else:
        try:
            assert proc.stdin is not None
            proc.stdin.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stderr_tail(stderr: IO[bytes]) -> str:
    """The last (at most three) lines an OpenSSH program wrote to its stderr file,
    joined by "; "; empty when it wrote none or the file is closed."""
    try:
        size = stderr.seek(0, os.SEEK_END)
        stderr.seek(max(0, size - STDERR_TAIL))
        tail = stderr.read().decode("utf-8", "replace").strip()
    except (OSError, ValueError):  # already closed
        return ""
    return "; ".join([ln for ln in tail.splitlines() if ln.strip()][-3:])


def close_streams(*streams: IO[bytes] | None) -> None:
    for stream in streams:
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass


def _config_path(path: str) -> str:
    """A path as an ssh_config value: ``%`` is a token there, whitespace splits a list."""
    path = path.replace("%", "%%")
    return f'"{path}"' if any(c.isspace() for c in path) else path


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None  # a regex: a loop over characters cost ~70 µs a path


def _quoted(path: str) -> str:
    r"""A path as one argument of an sftp batch command.

    Inside double quotes sftp takes ``*?[`` literally; only ``"`` and ``\``
    need a backslash.
    """
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def get_command(remote: str, local: str, *, into_empty: bool = False) -> bytes | None:
    """The batch lines that download ``remote`` to ``local``, or None if sftp cannot say it.

    ``into_empty``: ``local`` is empty or missing, and is written without being
    truncated (``reget`` from offset 0): on ext4 a write into a file truncated
    by its opener is flushed to disk when it is closed (auto_da_alloc), which
    cost 0.2 to 0.9 s for 512 MiB.
    """
    if _has_control(remote) or _has_control(local):
        return None
    line = f"@{'reget' if into_empty else 'get'} {_quoted(remote)} {_quoted(local)}"
    data = line.encode("utf-8", "surrogateescape")
    if len(data) > LINE_MAX:
        return None
    return data + b"\n@lpwd\n"  # "@": no echo, so stdout holds only the marks


class SftpProcess:
    """One ``sftp -b -`` logged in to the bucket, downloading one file at a time."""

    def __init__(self, login: Login, program: str = "sftp") -> None:
        self.login = login
        self.done = 0  # commands completed: 0 means it may not have logged in yet
        self._stderr: IO[bytes] = tempfile.TemporaryFile(prefix="ecloud-sftp-")
        try:
            self._proc = subprocess.Popen(
                login.sftp_argv(program), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self._stderr, cwd="/", close_fds=True)
        except OSError as exc:
            self._stderr.close()
            raise SftpLoginError(f"cannot start OpenSSH sftp for {login.where}: {exc}") from exc

    def get(self, remote: str, command: bytes) -> None:
        """Run one download (``get_command``'s lines); raises SftpError when it fails."""
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(command)
            stdin.flush()
            while True:
                line = stdout.readline()
                if not line or line == _MARK:
                    break
        except OSError:  # the pipe broke: sftp is gone, its stderr says why
            line = b""
        if line == _MARK:
            self.done += 1
            return
        status = self._end()
        kind = SftpLoginError if self.done == 0 else SftpError
        reason = self.reason(status)
        if "Host key verification failed" in reason:
            reason += ("; add the server's public key to the bucket's known_hosts "
                       f"{self.login.known_hosts} (ssh-keyscan, checked out of band)")
        raise kind(f"download of {remote} from {self.login.where} through OpenSSH sftp "
                   f"failed: {reason}")

    def reason(self, status: int | None) -> str:
        """The last lines sftp wrote on stderr, else its exit status."""
        return stderr_tail(self._stderr) or f"sftp exited with status {status}"

    def _end(self) -> int | None:
        """Wait for a failed sftp to exit (it does, in batch mode) and reap it."""
        try:
            return self._proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()

    def close(self, *, kill: bool = False) -> None:
        """End the process: EOF on its commands, or a kill (a download in progress)."""
        end_process(self._proc, kill=kill)
        close_streams(self._proc.stdin, self._proc.stdout, self._stderr)
