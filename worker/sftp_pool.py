"""The downloads of one SFTP bucket: OpenSSH ``sftp`` processes and one SFTP stream.

- :class:`SftpPool` holds up to ``size`` ``sftp`` processes
  (:class:`worker.sftp_batch.SftpProcess`), one per thread downloading, so that
  big files are fetched over several connections at once. A server that
  refuses the extra logins (sshd's MaxStartups) just leaves fewer of them.
- :class:`SftpStream` fetches a directory's small files over one
  ``ssh -s sftp`` connection, ecloud speaking the SFTP protocol itself with
  many files in flight (one ``sftp`` fetches one file at a time, bound by its
  round trips per file).

The owner of the pool (a datastore) closes it, which ends every process: none
outlives its attempt.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from worker.sftp_batch import (
    STOP_SECONDS,
    Login,
    SftpError,
    SftpLoginError,
    SftpProcess,
    close_streams,
    end_process,
    get_command,
    landing,
    open_empty,
    stderr_tail,
    temp_beside,
)

_FXP_INIT, _FXP_VERSION, _FXP_OPEN, _FXP_CLOSE, _FXP_READ = 1, 2, 3, 4, 5
_FXP_STATUS, _FXP_HANDLE, _FXP_DATA = 101, 102, 103
_FX_EOF, _FX_NO_SUCH_FILE = 1, 2
READ_BYTES = 32 << 10  # per READ request: what every SFTP server must serve in one reply
STREAM_FILE_MAX = 1 << 20  # bytes: bigger files go through an sftp process


@dataclass
class _Reply:
    done: threading.Event = field(default_factory=threading.Event)
    kind: int = 0
    body: bytes = b""


@dataclass
class _Transfer:
    """One file being downloaded, driven by the reader thread from reply to reply."""

    remote: str
    fd: int
    size: int
    done: threading.Event = field(default_factory=threading.Event)
    handle: bytes = b""
    reads: int = 0  # READ requests not answered yet
    error: BaseException | None = None


@dataclass
class _Step:
    """What a request id stands for: a transfer's open, or one of its reads."""

    transfer: _Transfer
    offset: int = -1  # -1: the open
    length: int = 0


class SftpStream:
    """Many small downloads in flight over one ``ssh -s sftp`` connection.

    OpenSSH's ``sftp`` fetches one file at a time (a stat, an open, the reads,
    a close: about six round trips a file), so a directory of small files is
    bound by round trips, not bytes. Here the SFTP protocol (version 3: OPEN,
    READ, CLOSE) is spoken over the subsystem's pipes by any number of threads
    at once, each waiting only for its own replies (an open, then the reads,
    the close not awaited), while ssh carries the encryption in C. One reader
    thread routes the replies by request id. A file's size comes from the
    caller's listing; a short read asks again for the rest, so a server that
    serves less than ``READ_BYTES`` a reply is still read whole.
    """

    def __init__(self, login: Login, program: str = "ssh") -> None:
        self.login = login
        self._stderr: IO[bytes] = tempfile.TemporaryFile(prefix="ecloud-ssh-")
        try:
            self._proc = subprocess.Popen(
                login.subsystem_argv(program), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self._stderr, cwd="/", close_fds=True, bufsize=0)
        except OSError as exc:
            self._stderr.close()
            raise SftpLoginError(f"cannot start OpenSSH ssh for {login.where}: {exc}") from exc
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._waiting: dict[int, _Step] = {}
        self._next = 0
        self._broken = ""
        self._version = _Reply()
        self._reader = threading.Thread(target=self._read_loop, name="ecloud-sftp-stream",
                                        daemon=True)
        self._reader.start()
        self._send([_packet(_FXP_INIT, struct.pack(">I", 3))])
        if not self._version.done.wait(max(1.0, 4 * login.timeout)) or self._version.kind != \
                _FXP_VERSION:
            self.close()
            raise SftpLoginError(f"SFTP over ssh to {login.where} did not start: "
                                 f"{self._broken or 'no answer'}")

    def download(self, remote: str, local: Path, size: int) -> None:
        """Write ``size`` bytes of ``remote`` to ``local`` (created or truncated).

        The caller only opens the local file and waits: the reader thread sends
        the reads when the open is answered, writes the data as it comes and
        sends the close, so a file costs its caller one wake-up.
        """
        path = remote.encode("utf-8", "surrogateescape")
        fd = open_empty(local)
        try:
            transfer = _Transfer(remote, fd, size)
            self._post(_FXP_OPEN, _string(path) + struct.pack(">II", 1, 0), _Step(transfer))
            transfer.done.wait()
            error = transfer.error
            if isinstance(error, SftpError) and remote not in str(error):
                raise SftpError(f"download of {remote}: {error}") from error
            if error is not None:
                raise error
        finally:
            os.close(fd)

    def _opened(self, transfer: _Transfer, kind: int, body: bytes) -> None:
        """The reader thread: the open was answered; ask for every chunk at once."""
        if kind != _FXP_HANDLE:
            self._finish(transfer, self._status_error(transfer.remote, kind, body))
            return
        transfer.handle = _field(body, 4)
        chunks = [(offset, min(READ_BYTES, transfer.size - offset))
                  for offset in range(0, transfer.size, READ_BYTES)]
        if not chunks:
            self._finish(transfer, None)
        for offset, length in chunks:
            self._read(transfer, offset, length)

    def _read(self, transfer: _Transfer, offset: int, length: int) -> None:
        transfer.reads += 1
        self._post(_FXP_READ, _string(transfer.handle) + struct.pack(">QI", offset, length),
                   _Step(transfer, offset, length))

    def _data(self, step: _Step, kind: int, body: bytes) -> None:
        """The reader thread: a read was answered; write it, ask for a short read's rest."""
        transfer = step.transfer
        transfer.reads -= 1
        if transfer.done.is_set():
            return  # failed already: the rest of its replies are dropped
        try:
            if kind == _FXP_DATA:
                data = _field(body, 4)
                os.pwrite(transfer.fd, data, step.offset)
                if 0 < len(data) < step.length:  # a server that serves less: ask for the rest
                    self._read(transfer, step.offset + len(data), step.length - len(data))
            elif not (kind == _FXP_STATUS and struct.unpack_from(">I", body, 4)[0] == _FX_EOF):
                raise self._status_error(transfer.remote, kind, body)
            # EOF: the file shrank since the listing; the caller checks the size
        except Exception as exc:  # OSError writing (a full disk), or the server's error
            self._finish(transfer, exc)
            return
        if transfer.reads == 0:
            self._finish(transfer, None)

    def _finish(self, transfer: _Transfer, error: BaseException | None) -> None:
        if transfer.handle:
            try:
                self._post(_FXP_CLOSE, _string(transfer.handle), None)  # not awaited
            except SftpError:
                pass  # the connection is gone, and the handle with it
        transfer.error = error
        transfer.done.set()

    # ---- requests and replies ----------------------------------------------

    def _post(self, kind: int, payload: bytes, step: _Step | None) -> None:
        with self._lock:
            if self._broken:
                raise SftpError(f"SFTP over ssh to {self.login.where}: {self._broken}")
            self._next = (self._next + 1) & 0xFFFFFFFF
            rid = self._next
            if step is not None:
                self._waiting[rid] = step
        self._send([_packet(kind, struct.pack(">I", rid) + payload)])

    def _send(self, packets: list[bytes]) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            with self._send_lock:
                stdin.write(b"".join(packets))
        except (OSError, ValueError):
            self._fail(self._reason("the connection is gone"))

    def _read_loop(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        buf = bytearray()
        try:
            while True:
                chunk = stdout.read(1 << 18)
                if not chunk:
                    break
                buf += chunk
                start = 0
                while len(buf) - start >= 5:
                    length = struct.unpack_from(">I", buf, start)[0]
                    if len(buf) - start < 4 + length:
                        break
                    kind = buf[start + 4]
                    body = bytes(buf[start + 5:start + 4 + length])
                    start += 4 + length
                    self._route(kind, body)
                del buf[:start]
        except (OSError, ValueError):
            pass
        self._fail(self._reason("ssh ended"))

    def _route(self, kind: int, body: bytes) -> None:
        if kind == _FXP_VERSION:
            self._version.kind, self._version.body = kind, body
            self._version.done.set()
            return
        rid = struct.unpack_from(">I", body)[0] if len(body) >= 4 else -1
        with self._lock:
            step = self._waiting.pop(rid, None)
        if step is None:
            return  # a close's answer
        try:
            if step.offset < 0:
                self._opened(step.transfer, kind, body)
            else:
                self._data(step, kind, body)
        except Exception as exc:  # a request that could not be sent: the connection broke
            if not step.transfer.done.is_set():
                step.transfer.error = exc
                step.transfer.done.set()

    def _fail(self, reason: str) -> None:
        with self._lock:
            if not self._broken:
                self._broken = reason
            waiting, self._waiting = self._waiting, {}
        error = SftpError(f"SFTP over ssh to {self.login.where}: {self._broken}")
        for step in waiting.values():
            if not step.transfer.done.is_set():
                step.transfer.error = error
                step.transfer.done.set()
        self._version.done.set()  # kind 0: the start fails

    def _reason(self, what: str) -> str:
        return stderr_tail(self._stderr) or what

    def _status_error(self, remote: str, kind: int, body: bytes) -> Exception:
        if kind == _FXP_STATUS and len(body) >= 8:
            code = struct.unpack_from(">I", body, 4)[0]
            message = _field(body, 8).decode("utf-8", "replace") if len(body) >= 12 else ""
            if code == _FX_NO_SUCH_FILE:
                return FileNotFoundError(f"{remote}: {message or 'no such file'}")
            return SftpError(f"download of {remote} from {self.login.where}: {message} "
                             f"(SFTP status {code})")
        return SftpError(f"download of {remote} from {self.login.where}: unexpected SFTP "
                         f"reply {kind}")

    def close(self) -> None:
        """End ssh (EOF on its input, then a kill if it lingers) and fail what still waits."""
        end_process(self._proc)
        self._reader.join(STOP_SECONDS)
        self._fail("the connection was closed")
        close_streams(self._proc.stdin, self._proc.stdout, self._stderr)


def _packet(kind: int, payload: bytes) -> bytes:
    return struct.pack(">IB", len(payload) + 1, kind) + payload


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _field(body: bytes, offset: int) -> bytes:
    """The SFTP string at ``offset`` of a reply's body."""
    length = struct.unpack_from(">I", body, offset)[0]
    return body[offset + 4:offset + 4 + length]


class SftpPool:
    """Up to ``size`` sftp processes for one bucket, lent to one thread at a time."""

    def __init__(self, login: Login, size: int, program: str = "sftp",
                 ssh_program: str = "ssh") -> None:
        self.login = login
        self.size = size
        self.program = program
        self.ssh_program = ssh_program
        self._cond = threading.Condition()
        self._idle: list[SftpProcess] = []
        self._count = 0
        self._closed = False
        self._stream: SftpStream | None = None
        self._stream_tried = False
        self._stream_lock = threading.Lock()

    def stream_download(self, remote: str, local: Path, size: int, *,
                        in_place: bool = False) -> bool:
        """Download a small file of a directory over the pool's :class:`SftpStream`, through
        a temporary name unless ``in_place``; False when no stream could be had (the
        caller then uses an sftp process)."""
        stream = self._get_stream()
        if stream is None:
            return False
        temp = local if in_place else temp_beside(local)
        with landing(local, temp):
            stream.download(remote, temp, size)
        return True

    def _get_stream(self) -> SftpStream | None:
        stream = self._stream
        if stream is not None:
            return stream  # no lock once it is there: every small file asks
        with self._stream_lock:  # one login for every thread that asks at once
            if self._stream is None and not self._stream_tried:
                self._stream_tried = True
                with self._cond:
                    if self._closed:
                        raise SftpError(f"the connections to {self.login.where} were closed")
                    self._count += 1  # the stream is one of the pool's connections
                try:
                    self._stream = SftpStream(self.login, self.ssh_program)
                except SftpLoginError:
                    with self._cond:
                        self._count -= 1
                        self._cond.notify_all()
            return self._stream

    def download(self, remote: str, local: Path, *, in_place: bool = False) -> bool:
        """Download ``remote`` to ``local`` through a temporary name (straight to ``local``
        if ``in_place``: it is a temporary name already); False if sftp cannot name the
        paths (the caller then uses paramiko)."""
        temp = local if in_place else temp_beside(local)
        command = get_command(remote, str(temp), into_empty=in_place)
        if command is None:
            return False
        with landing(local, temp):
            self._run(remote, command)
        return True

    def _run(self, remote: str, command: bytes) -> None:
        while True:
            proc = self._take()
            try:
                proc.get(remote, command)
            except SftpLoginError:
                proc.close(kill=True)
                with self._cond:
                    self._count -= 1
                    # another process is logged in: the server refused one more login
                    # (MaxStartups, say); go on with the ones it took
                    retry = self._count > 0 or bool(self._idle)
                    if retry:
                        self.size = max(1, self._count)
                    self._cond.notify_all()
                if not retry:
                    raise
                continue
            except BaseException:
                proc.close(kill=True)
                with self._cond:
                    self._count -= 1
                    self._cond.notify_all()
                raise
            with self._cond:
                if self._closed:
                    proc.close()
                    self._count -= 1
                else:
                    self._idle.append(proc)
                self._cond.notify_all()
            return

    def _take(self) -> SftpProcess:
        with self._cond:
            while True:
                if self._closed:
                    raise SftpError(f"the connections to {self.login.where} were closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self.size:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return SftpProcess(self.login, self.program)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify_all()
            raise

    def processes(self) -> int:
        """OpenSSH processes alive now: sftp processes (idle or lent out) and the stream's
        ssh."""
        with self._cond:
            return self._count

    def close(self) -> None:
        """End the idle processes and the stream; a process lent out is ended when it
        comes back."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for proc in idle:
            proc.close()
        with self._stream_lock:
            stream, self._stream = self._stream, None
            self._stream_tried = True
        if stream is not None:
            stream.close()
            with self._cond:
                self._count -= 1
                self._cond.notify_all()
