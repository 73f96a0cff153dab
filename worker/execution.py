"""Run one attempt's commands: argv lists, redirections, timeout, cancel, usage.

Each command runs in its own session (``start_new_session=True``), so it and
everything it forks form one process group that is killed as a whole: on
timeout or cancel (SIGTERM, then SIGKILL after a short grace), and also when
the command itself exits, so that background children never outlive their
task. A process that calls ``setsid()`` itself escapes the group; containers
do not have that hole.

Resource usage comes from ``os.wait4`` on each command, which counts that
command and the descendants it waited for, and nothing of the other slots
running concurrently in other threads (``RUSAGE_CHILDREN`` would mix them).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from protocol.document import Command
from worker.errors import ExecutionError, WorkerError

KILL_GRACE = 0.5  # seconds between SIGTERM and SIGKILL: cancel must bite within 1 s
_POLL = 0.1  # how often a running command looks at the cancel event and the clock


def command_argv(command: Command) -> list[str]:
    """The argv to execute: the list as given, or ``/bin/sh -c`` when ``shell`` is set."""
    if command.shell:
        return ["/bin/sh", "-c", command.command[0], *command.command[1:]]
    return list(command.command)


def base_env(extra: Mapping[str, str], environ: Mapping[str, str] | None = None
             ) -> dict[str, str]:
    """A minimal environment (PATH, HOME, LANG, TZ, USER) with the task's ``env`` over it.

    The worker's own variables (tokens, ECLOUD_ settings, cloud credentials)
    are not passed on: a task gets only what it asks for.
    """
    source = os.environ if environ is None else environ
    env = {"PATH": source.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}
    for key in ("HOME", "USER", "LOGNAME", "TZ"):
        if key in source:
            env[key] = source[key]
    env.update(extra)
    return env


@dataclass(frozen=True)
class Step:
    """One command ready to run on this host, with redirections as host paths."""

    argv: list[str]
    label: str  # the user's program name, for messages ("md5sum", not "podman")
    stdin: Path | None = None
    stdout: Path | None = None
    stderr: Path | None = None
    # e.g. remove the step's container; on timeout or cancel it runs before the
    # process group is signalled and again once the command is dead
    on_kill: Callable[[], None] | None = None
    # host paths the command reaches besides its redirections (a container's bind
    # mount sources): vetted by ``guard`` just before it starts, like the redirections
    paths: tuple[Path, ...] = ()


@dataclass
class StepResult:
    """What one command did. ``exit_status`` is negative for a signal (-9 = SIGKILL)."""

    index: int
    label: str
    exit_status: int | None = None
    wall: float = 0.0
    cpu: float = 0.0
    max_rss: int = 0  # bytes
    stdout_log: Path | None = None
    stderr_log: Path | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""


@dataclass
class Execution:
    """The outcome of a command list: ``succeeded``, ``failed``, ``timeout``, ``cancelled``."""

    outcome: str
    reason: str = ""
    steps: list[StepResult] = field(default_factory=list)

    @property
    def last(self) -> StepResult | None:
        return self.steps[-1] if self.steps else None

    def metrics(self) -> dict[str, float]:
        """wall and cpu seconds summed over the commands, max_rss the largest (bytes)."""
        return {"wall": sum(s.wall for s in self.steps), "cpu": sum(s.cpu for s in self.steps),
                "max_rss": float(max((s.max_rss for s in self.steps), default=0))}


def run_steps(steps: Sequence[Step], *, cwd: Path, env: Mapping[str, str],
              timeout: float | None, cancel: threading.Event, log_dir: Path,
              tail_bytes: int, kill_grace: float = KILL_GRACE,
              guard: Callable[[Path], None] | None = None) -> Execution:
    """Run the steps in order; stop at the first that fails, times out or is cancelled.

    ``timeout`` bounds the whole list. A stream that is not redirected is
    captured to ``log_dir/<i>.stdout|stderr``; the result keeps its last
    ``tail_bytes`` bytes. ``guard`` vets each redirection path just before it
    is opened (an earlier command may have made it a symlink). A program that
    cannot start is a failed execution whose reason says why.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    result = Execution("succeeded")
    for i, step in enumerate(steps):
        where = f"command {i + 1} of {len(steps)} ({step.label})"
        if cancel.is_set():
            return Execution("cancelled", f"cancelled before {where}", result.steps)
        if deadline is not None and time.monotonic() >= deadline:
            return Execution("timeout", f"timed out after {timeout:g} s, before {where}",
                             result.steps)
        try:
            if guard is not None:
                for path in (step.stdin, step.stdout, step.stderr, *step.paths):
                    if path is not None:
                        guard(path)
            res, why = _run_one(i, step, cwd, env, deadline, cancel, log_dir, tail_bytes,
                                kill_grace)
        except WorkerError as exc:
            return Execution("failed", str(exc), result.steps)
        result.steps.append(res)
        if why == "cancelled":
            return Execution("cancelled", f"cancelled during {where}", result.steps)
        if why == "timeout":
            return Execution("timeout", f"timed out after {timeout:g} s in {where}",
                             result.steps)
        if res.exit_status != 0:
            return Execution("failed", _failure(res, where if len(steps) > 1 else ""),
                             result.steps)
    return result


def _failure(res: StepResult, where: str) -> str:
    status = res.exit_status
    if status is not None and status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"{res.label} was killed by {name}" + (f" ({where})" if where else "")
    return f"exit status {status} from {res.label}" + (f" ({where})" if where else "")


def _run_one(i: int, step: Step, cwd: Path, env: Mapping[str, str], deadline: float | None,
             cancel: threading.Event, log_dir: Path, tail_bytes: int, grace: float
             ) -> tuple[StepResult, str | None]:
    out_path = step.stdout or log_dir / f"{i}.stdout"
    err_path = step.stderr or log_dir / f"{i}.stderr"
    res = StepResult(i, step.label, stdout_log=None if step.stdout else out_path,
                     stderr_log=None if step.stderr else err_path)
    files: list[IO[Any]] = []
    try:
        stdin = _open(step.stdin, "rb", files, step, "stdin") if step.stdin else subprocess.DEVNULL
        stdout = _open(out_path, "wb", files, step, "stdout")
        stderr = _open(err_path, "wb", files, step, "stderr")
        start = time.monotonic()
        try:
            proc = subprocess.Popen(step.argv, cwd=cwd, env=dict(env), stdin=stdin,
                                    stdout=stdout, stderr=stderr, start_new_session=True,
                                    close_fds=True)
        except FileNotFoundError as exc:
            raise ExecutionError(
                f"command {i + 1} ({step.label}): program {step.argv[0]!r} not found "
                f"(PATH={env.get('PATH', '')}); install it or give its full path") from exc
        except PermissionError as exc:
            raise ExecutionError(f"command {i + 1} ({step.label}): {step.argv[0]!r} is not "
                                 "executable; chmod +x it or run it through an interpreter"
                                 ) from exc
        except OSError as exc:
            raise ExecutionError(f"command {i + 1} ({step.label}) could not start: {exc}"
                                 ) from exc
    finally:
        for f in files:
            f.close()  # the child has its own copies
    why = _wait_exit(proc.pid, deadline, cancel)
    if why is not None:
        _kill(proc.pid, grace, step.on_kill)
    else:
        _signal_group(proc.pid, signal.SIGKILL)  # leftovers; the zombie leader holds the pgid
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if why is not None and step.on_kill is not None:
        # again, now that the command is dead: a container runtime's client killed
        # while it was still creating the container may have created it after the
        # first call, and nothing else would ever remove it
        step.on_kill()
    res.exit_status = proc.returncode
    res.wall = time.monotonic() - start
    res.cpu = usage.ru_utime + usage.ru_stime
    res.max_rss = usage.ru_maxrss * 1024  # Linux reports KiB
    res.stdout_tail = tail(res.stdout_log, tail_bytes)
    res.stderr_tail = tail(res.stderr_log, tail_bytes)
    return res, why


def _open(path: Path, mode: str, files: list[IO[Any]], step: Step, what: str) -> IO[Any]:
    try:
        f = open(path, mode)  # closed by the caller once the child has its copy
    except OSError as exc:
        raise ExecutionError(f"{step.label}: cannot open {what} redirection {path}: "
                             f"{exc.strerror}") from exc
    files.append(f)
    return f


def _exited(pid: int) -> bool:
    """True once ``pid`` has exited; it stays a zombie (WNOWAIT) so its pgid is safe to kill."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _wait_exit(pid: int, deadline: float | None, cancel: threading.Event,
               until: float | None = None) -> str | None:
    """Wait for exit; return "cancelled" or "timeout" if that comes first, else None."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):  # old kernel: fall back to plain polling
        pidfd = None
    try:
        poller = select.poll()
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        while not _exited(pid):
            now = time.monotonic()
            if until is not None:
                if now >= until:
                    return "grace"
            elif cancel.is_set():
                return "cancelled"
            elif deadline is not None and now >= deadline:
                return "timeout"
            limit = min(x for x in (deadline, until, now + _POLL) if x is not None)
            wait_ms = max(1, int((limit - now) * 1000))
            if pidfd is not None:
                poller.poll(wait_ms)  # wakes at once when the process exits
            else:
                time.sleep(min(wait_ms / 1000, 0.02))
        return None
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill(pid: int, grace: float, on_kill: Callable[[], None] | None) -> None:
    """SIGTERM the group, SIGKILL it after ``grace``; ``on_kill`` runs first (containers)."""
    if on_kill is not None:
        on_kill()
    _signal_group(pid, signal.SIGTERM)
    _wait_exit(pid, None, threading.Event(), until=time.monotonic() + grace)
    _signal_group(pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already empty


def tail(path: Path | None, limit: int) -> str:
    """The last ``limit`` bytes of a file as text ("" when there is none)."""
    if path is None or limit <= 0:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        return ""
    if size > limit:
        # a cut multi-byte character would decode as garbage: drop continuation bytes
        while data and (data[0] & 0xC0) == 0x80:
            data = data[1:]
    return data.decode("utf-8", errors="replace")
