"""Commands in a real podman container (a local busybox image; nothing is pulled).

Skipped, with the reason printed, only when podman is not installed.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocol.messages import Assignment, Result
from protocol.settings import WorkerSettings
from tests import waiting
from tests.podman_image import ensure_image, podman_missing_reason
from worker.attempt import AttemptEnv, run_attempt
from worker.cache import Cache
from worker.containers import CliRuntime, ContainerSpec, Mount, container_name, runtime_for
from worker.errors import ContainerError
from worker.execution import Step, run_steps
from worker.workdirs import JANITOR

pytestmark = pytest.mark.podman

WAIT = 60.0  # seconds; a bound on every wait, never an expectation
_ids = itertools.count(int(time.time()) % 1_000_000 * 1000)


@pytest.fixture(scope="module")
def image() -> str:
    why = podman_missing_reason()
    if why is not None:
        print(f"\nSKIPPING podman tests: {why}")
        pytest.skip(why)
    return ensure_image()


def podman() -> CliRuntime:
    runtime = runtime_for(WorkerSettings())
    assert isinstance(runtime, CliRuntime)
    return runtime


def containers_named(prefix: str) -> list[str]:
    """Every container (running or not) whose name starts with ``prefix``."""
    out = subprocess.run(["podman", "--runtime", "runc", "ps", "--all", "--format",
                          "{{.Names}}"], capture_output=True, text=True, check=True,
                         timeout=WAIT).stdout
    return [n for n in out.split() if n.startswith(prefix)]


def run_in(tmp_path: Path, image: str, argv: list[str], *, mounts: tuple[Mount, ...] = (),
           env: dict[str, str] | None = None, timeout: float | None = None,
           cancel: threading.Event | None = None, stdout: Path | None = None
           ) -> tuple[Any, ContainerSpec]:
    runtime = podman()
    spec = ContainerSpec(image, container_name(next(_ids), 0), mounts, env or {})
    step = Step(runtime.run_argv(spec, argv), argv[0], stdout=stdout,
                on_kill=lambda: runtime.remove(spec.name))
    ex = run_steps([step], cwd=tmp_path, env=dict(os.environ), timeout=timeout,
                   cancel=cancel or threading.Event(), log_dir=tmp_path / "logs",
                   tail_bytes=4096)
    return ex, spec


# ---- the runtime ---------------------------------------------------------------------------


def test_mounts_network_env_and_removal(tmp_path: Path, image: str) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.txt").write_text("from the host\n")
    (tmp_path / "out").mkdir()
    script = ("cat /mnt/in/data.txt; echo \"$GREETING\"; ls /sys/class/net;"
              " echo made > /mnt/out/new.txt")
    ex, spec = run_in(tmp_path, image, ["sh", "-c", script],
                      mounts=(Mount(tmp_path / "in", "/mnt/in", read_only=True),
                              Mount(tmp_path / "out", "/mnt/out")),
                      env={"GREETING": "hello container"})
    assert ex.outcome == "succeeded", (ex.reason, ex.last and ex.last.stderr_tail)
    # the input is seen at its internal path, the env var is set, the network is only lo
    assert ex.steps[0].stdout_tail == "from the host\nhello container\nlo\n"
    assert (tmp_path / "out" / "new.txt").read_text() == "made\n"
    assert containers_named(spec.name) == []  # --rm


def test_read_only_mount_is_read_only(tmp_path: Path, image: str) -> None:
    (tmp_path / "in").mkdir()
    ex, _ = run_in(tmp_path, image, ["sh", "-c", "echo x > /mnt/in/new"],
                   mounts=(Mount(tmp_path / "in", "/mnt/in", read_only=True),))
    assert ex.outcome == "failed"
    assert not (tmp_path / "in" / "new").exists()


def test_timeout_kills_and_removes_the_container(tmp_path: Path, image: str) -> None:
    ex, spec = run_in(tmp_path, image, ["sleep", "100"], timeout=2.0)
    assert ex.outcome == "timeout"
    assert containers_named(spec.name) == []


def test_timeout_while_the_container_is_being_created(tmp_path: Path, image: str) -> None:
    # the kill can land before the container exists; it must not outlive its client
    names = []
    for bound in (0.001, 0.01, 0.03, 0.08):
        ex, spec = run_in(tmp_path, image, ["sleep", "100"], timeout=bound)
        assert ex.outcome == "timeout"
        names.append(spec.name)
    left = containers_named("ecloud-")
    assert [n for n in names if n in left] == []


def test_cancel_kills_and_removes_the_container(tmp_path: Path, image: str) -> None:
    (tmp_path / "out").mkdir()
    cancel = threading.Event()
    box: list[Any] = []

    def target() -> None:
        box.append(run_in(tmp_path, image, ["sh", "-c", "echo up > /mnt/out/up; sleep 100"],
                          mounts=(Mount(tmp_path / "out", "/mnt/out"),), cancel=cancel,
                          timeout=WAIT * 2))

    runner = threading.Thread(target=target)
    runner.start()
    wait_for(lambda: (tmp_path / "out" / "up").is_file(), "the container to start")
    cancel.set()
    runner.join(WAIT)
    assert not runner.is_alive()
    ex, spec = box[0]
    assert ex.outcome == "cancelled"
    assert containers_named(spec.name) == []


def test_program_missing_from_the_image_is_explained(tmp_path: Path, image: str) -> None:
    ex, _ = run_in(tmp_path, image, ["no-such-program"])
    assert ex.outcome == "failed"
    assert ex.steps[0].exit_status == 127
    assert podman().explain(127) == "the program was not found in the image"


def test_missing_runtime_says_what_to_install() -> None:
    with pytest.raises(ContainerError, match="apt-get install no-such-runtime-ecloud"):
        CliRuntime("no-such-runtime-ecloud").check()


def test_comma_in_a_mount_path_is_refused(tmp_path: Path) -> None:
    spec = ContainerSpec("img", "n", (Mount(tmp_path / "a,b", "/mnt/x"),))
    with pytest.raises(ContainerError, match="contains ','"):
        podman().run_argv(spec, ["true"])


# ---- a task with an image, end to end ------------------------------------------------------


def wait_for(condition: Callable[[], object], what: str) -> None:
    waiting.wait_for(condition, what, WAIT, every=0.01)


def attempt(tmp_path: Path, document: dict[str, Any], *, cancel: threading.Event | None = None
            ) -> tuple[Result, list[tuple[str, dict[str, Any]]], int]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    env = AttemptEnv(workdir_root=tmp_path / "work", cache=Cache(tmp_path / "cache", 10**8),
                     buckets={"data": f"file://{data}"}, default_url=f"file://{data}",
                     settings=WorkerSettings())
    events: list[tuple[str, dict[str, Any]]] = []
    attempt_id = next(_ids)
    result = run_attempt(Assignment(attempt_id, 1, str(document.get("name", "t")), 1, document),
                         env, lambda kind, d: events.append((kind, d)),
                         cancel or threading.Event())
    JANITOR.flush()  # the work directory is removed in the background
    return result, events, attempt_id


def test_task_with_image_mounts_inputs_and_returns_outputs(tmp_path: Path, image: str) -> None:
    data = tmp_path / "data"
    (data / "in").mkdir(parents=True)
    clear = b"the clear text\n" * 100
    (data / "in" / "clear.txt").write_bytes(clear)
    (data / "tree" / "sub").mkdir(parents=True)
    (data / "tree" / "a").write_text("A\n")
    (data / "tree" / "sub" / "b").write_text("B\n")
    doc = {
        "name": "md5-clear",
        "image": image,
        "inputs": {"data:in/clear.txt": "/mnt/clear", "data:tree/": "/mnt/tree/"},
        "outputs": {"data:out/crypt": "/mnt/crypt", "data:out/copy/": "/mnt/copy/",
                    "data:out/net": "/results/net"},
        "env": {"SUFFIX": "done"},
        "commands": [
            {"command": ["md5sum", "/mnt/clear"], "stdout": "/mnt/crypt"},
            {"command": ["sh", "-c", "cp -r /mnt/tree/. /mnt/copy/ && echo $SUFFIX > "
                         "/mnt/copy/sub/suffix"]},
            {"command": ["ls", "/sys/class/net"], "stdout": "/results/net"},
        ],
    }
    result, events, attempt_id = attempt(tmp_path, doc)
    assert result.outcome == "succeeded", (result.reason, result.stderr_tail)
    assert (data / "out" / "crypt").read_text() == \
        f"{hashlib.md5(clear).hexdigest()}  /mnt/clear\n"
    assert (data / "out" / "copy" / "a").read_text() == "A\n"
    assert (data / "out" / "copy" / "sub" / "b").read_text() == "B\n"
    assert (data / "out" / "copy" / "sub" / "suffix").read_text() == "done\n"
    assert (data / "out" / "net").read_text() == "lo\n"  # --network none
    assert sorted(p.name for p in (data / "out").iterdir()) == ["copy", "crypt", "net"]
    assert containers_named(f"ecloud-{attempt_id}-") == []
    kinds = [k for k, _ in events]
    assert kinds == ["stage-in.started", "stage-in.finished", "execution.started",
                     "execution.finished", "stage-out.started", "stage-out.finished"]
    assert result.metrics["bytes_in"] == len(clear) + 4
    assert not (tmp_path / "work" / str(attempt_id)).exists()


def test_task_with_image_timeout_removes_its_container(tmp_path: Path, image: str) -> None:
    doc = {"name": "sleepy", "image": image, "timeout": 2,
           "outputs": {"data:never": "/mnt/never"},
           "commands": [{"command": ["sh", "-c", "echo x > /mnt/never; sleep 100"]}]}
    result, _, attempt_id = attempt(tmp_path, doc)
    assert result.outcome == "timeout"
    assert containers_named(f"ecloud-{attempt_id}-") == []
    assert not (tmp_path / "data" / "never").exists()


def test_task_with_image_program_missing(tmp_path: Path, image: str) -> None:
    doc = {"name": "typo", "image": image, "commands": [{"command": ["md5summ", "/etc/passwd"]}]}
    result, _, _ = attempt(tmp_path, doc)
    assert result.outcome == "failed"
    assert result.exit_status == 127
    assert "the program was not found in the image" in result.reason
    assert image in result.reason


def test_task_with_image_output_not_produced(tmp_path: Path, image: str) -> None:
    doc = {"name": "lazy", "image": image, "outputs": {"data:out": "/mnt/out"},
           "commands": [{"command": ["true"]}]}
    result, _, _ = attempt(tmp_path, doc)
    assert result.outcome == "failed"
    assert "did not produce the file '/mnt/out'" in result.reason
    assert not (tmp_path / "data" / "out").exists()


def test_task_with_image_needs_absolute_internal_paths(tmp_path: Path, image: str) -> None:
    doc = {"name": "rel", "image": image, "outputs": {"data:out": "out.txt"},
           "commands": [{"command": ["true"]}]}
    result, _, _ = attempt(tmp_path, doc)
    assert result.outcome == "failed"
    assert "must be absolute when the task has an 'image'" in result.reason


def test_task_with_image_redirections(tmp_path: Path, image: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "clear").write_text("shout this\n")
    doc = {"name": "redirects", "image": image,
           "inputs": {"data:clear": "/mnt/clear"},
           "outputs": {"data:count": "/mnt/count", "data:upper": "/mnt/upper"},
           "commands": [
               # stdin from an input; stdout to a scratch path that is not declared
               {"command": ["tr", "a-z", "A-Z"], "stdin": "/mnt/clear",
                "stdout": "/scratch/upper"},
               # the scratch file is visible inside the next containers
               {"command": ["sh", "-c", "wc -c < /scratch/upper"], "stdout": "/mnt/count",
                "stderr": "/scratch/err"},
               {"command": ["cat"], "stdin": "/scratch/upper", "stdout": "/mnt/upper"},
           ]}
    result, _, _ = attempt(tmp_path, doc)
    assert result.outcome == "succeeded", (result.reason, result.stderr_tail)
    assert (data / "upper").read_text() == "SHOUT THIS\n"
    assert (data / "count").read_text().strip() == "11"
    # every output was redirected: no log had anything in it, so none was copied
    assert sorted(p.name for p in data.iterdir()) == ["clear", "count", "upper"]
