"""Running commands on the host: real processes, real signals, real files.

Durations are only ever bounds (a timeout the command would need 100 s to
outlive); the assertions are about what happened, never about how long it took.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import waiting
from tests.processes import alive
from worker.errors import PathError
from worker.execution import Execution, Step, base_env, run_steps, tail

WAIT = 30.0  # seconds; a bound on every wait, never an expectation
PY = sys.executable


def run(tmp_path: Path, steps: list[Step], *, timeout: float | None = None,
        cancel: threading.Event | None = None, tail_bytes: int = 4096,
        env: dict[str, str] | None = None,
        guard: Callable[[Path], None] | None = None) -> Execution:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return run_steps(steps, cwd=work, env=env if env is not None else base_env({}),
                     timeout=timeout, cancel=cancel or threading.Event(),
                     log_dir=tmp_path / "logs", tail_bytes=tail_bytes, guard=guard)


def py(code: str, *args: str) -> Step:
    return Step([PY, "-c", code, *args], "python")


def sh(script: str) -> Step:
    return Step(["/bin/sh", "-c", script], "sh")


def wait_for(condition: Callable[[], object], what: str) -> None:
    waiting.wait_for(condition, what, WAIT, every=0.01)


def read_pid(path: Path) -> int:
    wait_for(lambda: path.is_file() and path.read_text().strip() != "", f"pid in {path}")
    return int(path.read_text())


# ---- argv, redirections, env, status -------------------------------------------------------


def test_argv_is_passed_literally(tmp_path: Path) -> None:
    args = ["two words", "$HOME", "; rm -rf /", "*", "'quoted'", ""]
    ex = run(tmp_path, [py("import sys; print(repr(sys.argv[1:]))", *args)])
    assert ex.outcome == "succeeded", ex.reason
    assert ex.steps[0].stdout_tail == repr(args) + "\n"
    assert ex.steps[0].exit_status == 0


def test_redirections_and_working_directory(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "in.txt").write_text("line one\nline two\n")
    step = Step(
        [PY, "-c", "import os, sys; data = sys.stdin.read(); print(data.upper(), end='');"
         " print('cwd=' + os.getcwd(), file=sys.stderr)"],
        "python", stdin=work / "in.txt", stdout=work / "out.txt", stderr=work / "err.txt")
    ex = run(tmp_path, [step])
    assert ex.outcome == "succeeded", ex.reason
    assert (work / "out.txt").read_text() == "LINE ONE\nLINE TWO\n"
    assert (work / "err.txt").read_text() == f"cwd={work}\n"
    res = ex.steps[0]
    # redirected streams are the user's files, not logs
    assert (res.stdout_log, res.stderr_log) == (None, None)
    assert (res.stdout_tail, res.stderr_tail) == ("", "")


def test_unredirected_streams_are_logged_and_stdin_is_empty(tmp_path: Path) -> None:
    ex = run(tmp_path, [py("import sys; print('got', repr(sys.stdin.read()));"
                           " print('to err', file=sys.stderr)")])
    res = ex.steps[0]
    assert res.stdout_log == tmp_path / "logs" / "0.stdout"
    assert res.stderr_log == tmp_path / "logs" / "0.stderr"
    assert res.stdout_log.read_text() == "got ''\n"
    assert res.stderr_tail == "to err\n"


def test_commands_share_files_in_order(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    steps = [Step(["/bin/echo", "hello"], "echo", stdout=work / "a"),
             Step(["/usr/bin/tr", "a-z", "A-Z"], "tr", stdin=work / "a", stdout=work / "b")]
    ex = run(tmp_path, steps)
    assert ex.outcome == "succeeded", ex.reason
    assert (work / "b").read_text() == "HELLO\n"
    assert [s.label for s in ex.steps] == ["echo", "tr"]


def test_env_is_minimal_plus_the_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECLOUD_WORKER_TOKEN", "secret-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-key")
    env = base_env({"GREETING": "hi there", "LANG": "C"})
    assert "ECLOUD_WORKER_TOKEN" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    ex = run(tmp_path, [py("import os, json; print(json.dumps(dict(os.environ)))")], env=env)
    seen = json.loads(ex.steps[0].stdout_tail)
    assert seen["GREETING"] == "hi there"
    assert seen["LANG"] == "C"  # the task's value wins over the default
    assert seen["PATH"] == os.environ["PATH"]
    assert not any("secret" in v for v in seen.values())


def test_nonzero_exit_stops_the_list(tmp_path: Path) -> None:
    steps = [sh("echo first"), sh("echo failing >&2; exit 3"), sh("touch never")]
    ex = run(tmp_path, steps)
    assert ex.outcome == "failed"
    assert ex.reason == "exit status 3 from sh (command 2 of 3 (sh))"
    assert [s.exit_status for s in ex.steps] == [0, 3]
    assert ex.last is not None and ex.last.stderr_tail == "failing\n"
    assert not (tmp_path / "work" / "never").exists()


def test_killed_by_a_signal(tmp_path: Path) -> None:
    ex = run(tmp_path, [sh("kill -KILL $$")])
    assert ex.outcome == "failed"
    assert ex.steps[0].exit_status == -9
    assert ex.reason == "sh was killed by SIGKILL"


def test_program_not_found_or_not_executable(tmp_path: Path) -> None:
    ex = run(tmp_path, [Step(["no-such-program-ecloud"], "no-such-program-ecloud")])
    assert ex.outcome == "failed"
    assert "program 'no-such-program-ecloud' not found" in ex.reason
    assert ex.steps == []
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    ex = run(tmp_path, [Step([str(script)], "script.sh")])
    assert ex.outcome == "failed"
    assert "is not executable" in ex.reason


def test_missing_stdin_file_is_a_failure(tmp_path: Path) -> None:
    ex = run(tmp_path, [Step(["/bin/cat"], "cat", stdin=tmp_path / "absent")])
    assert ex.outcome == "failed"
    assert "cannot open stdin redirection" in ex.reason


def test_guard_vets_redirections_before_each_command(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    seen: list[Path] = []

    def guard(path: Path) -> None:
        seen.append(path)
        if path.name == "escape":
            raise PathError(f"{path} leaves the work directory")

    steps = [Step(["/bin/echo", "a"], "echo", stdout=work / "ok"),
             Step(["/bin/echo", "b"], "echo", stdout=work / "escape")]
    ex = run(tmp_path, steps, guard=guard)
    assert ex.outcome == "failed"
    assert "leaves the work directory" in ex.reason
    assert seen == [work / "ok", work / "escape"]
    assert not (work / "escape").exists()


# ---- timeout and cancel --------------------------------------------------------------------


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    # a background grandchild that ignores SIGTERM, so only the SIGKILL gets it
    step = sh(f"trap '' TERM; sleep 100 & echo $! > {pidfile}; sleep 100")
    ex = run(tmp_path, [step, sh("touch never")], timeout=1.0)
    assert ex.outcome == "timeout"
    assert ex.reason == "timed out after 1 s in command 1 of 2 (sh)"
    assert ex.steps[0].exit_status is not None and ex.steps[0].exit_status < 0
    grandchild = read_pid(pidfile)
    wait_for(lambda: not alive(grandchild), "the grandchild to die")
    assert not (tmp_path / "work" / "never").exists()


def test_timeout_bounds_the_whole_list(tmp_path: Path) -> None:
    # each command alone is well within the timeout, together they are not
    ex = run(tmp_path, [sh("sleep 0.6"), sh("sleep 0.6"), sh("touch never")], timeout=1.0)
    assert ex.outcome == "timeout"
    assert ex.reason.startswith("timed out after 1 s")
    assert not (tmp_path / "work" / "never").exists()


def test_background_children_do_not_outlive_their_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    ex = run(tmp_path, [sh(f"sleep 100 & echo $! > {pidfile}")])
    assert ex.outcome == "succeeded", ex.reason
    grandchild = read_pid(pidfile)
    wait_for(lambda: not alive(grandchild), "the background child to die")


def test_cancel_kills_the_running_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    cancel = threading.Event()
    outcome: list[Execution] = []
    step = sh(f"sleep 100 & echo $! > {pidfile}; wait")
    runner = threading.Thread(
        target=lambda: outcome.append(run(tmp_path, [step], cancel=cancel, timeout=WAIT * 2)))
    runner.start()
    grandchild = read_pid(pidfile)
    assert alive(grandchild)
    cancel.set()
    runner.join(WAIT)
    assert not runner.is_alive()
    (ex,) = outcome
    assert ex.outcome == "cancelled"
    assert ex.reason == "cancelled during command 1 of 1 (sh)"
    wait_for(lambda: not alive(grandchild), "the grandchild to die")


def test_cancel_before_start_runs_nothing(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    ex = run(tmp_path, [sh("touch ran")], cancel=cancel)
    assert ex.outcome == "cancelled"
    assert ex.steps == []
    assert not (tmp_path / "work" / "ran").exists()


def test_on_kill_runs_on_timeout_only(tmp_path: Path) -> None:
    called: list[tuple[str, bool]] = []
    pidfile = tmp_path / "sleep.pid"

    def on_kill(label: str) -> Callable[[], None]:
        # records whether the command was still running at each call
        return lambda: called.append((label, alive(read_pid(pidfile))))

    quick = Step(["/bin/true"], "true", on_kill=on_kill("quick"))
    slow = Step(["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 100"], "sleep",
                on_kill=on_kill("slow"))
    ex = run(tmp_path, [quick, slow], timeout=1.0)
    assert ex.outcome == "timeout"
    # before the kill (a container is removed first) and after it (one created late)
    assert called == [("slow", True), ("slow", False)]


# ---- metrics and tails ---------------------------------------------------------------------


def test_metrics_wall_cpu_and_max_rss(tmp_path: Path) -> None:
    # burns CPU for a bounded count of iterations and touches 64 MiB of memory
    code = "b = b'x' * (64 << 20); n = 0\nfor i in range(3_000_000): n += i\nprint(len(b), n > 0)"
    ex = run(tmp_path, [py(code), sh("true")])
    assert ex.outcome == "succeeded", ex.reason
    first = ex.steps[0]
    assert first.stdout_tail == f"{64 << 20} True\n"
    assert first.wall > 0 and first.cpu > 0
    assert first.max_rss >= 64 << 20
    m = ex.metrics()
    assert set(m) == {"wall", "cpu", "max_rss"}
    assert m["wall"] == pytest.approx(sum(s.wall for s in ex.steps))
    assert m["cpu"] >= first.cpu
    assert m["max_rss"] == max(s.max_rss for s in ex.steps)


def test_tails_are_bounded(tmp_path: Path) -> None:
    code = ("import sys\nfor i in range(20000): print(f'line {i}')\n"
            "sys.stderr.write('\\u00e9' * 3000)")
    ex = run(tmp_path, [py(code)], tail_bytes=1001)
    res = ex.steps[0]
    assert res.stdout_log is not None and res.stdout_log.stat().st_size > 100_000
    assert len(res.stdout_tail.encode()) <= 1001
    assert res.stdout_tail.endswith("line 19999\n")
    # cut in the middle of a 2-byte character: the half is dropped, not garbled
    assert res.stderr_tail == "\u00e9" * 500
    assert run(tmp_path, [py("print('x')")], tail_bytes=0).steps[0].stdout_tail == ""


def test_tail_of_missing_or_short_file(tmp_path: Path) -> None:
    assert tail(None, 10) == ""
    assert tail(tmp_path / "absent", 10) == ""
    (tmp_path / "short").write_bytes(b"abc")
    assert tail(tmp_path / "short", 10) == "abc"
