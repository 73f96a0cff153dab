"""One attempt end to end on the host: stage in, run, stage out, logs, events.

Real files in ``file://`` buckets (and one ``sftp://`` bucket through a real
sshd), real processes. Every storage mode (cloud, nfs, local) is exercised.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from protocol.messages import Assignment, Result
from protocol.settings import WorkerSettings
from tests import sshd as sshd_helper
from tests.sshd import Sshd
from worker.attempt import AttemptEnv, log_prefix, run_attempt
from worker.cache import Cache
from worker.workdirs import JANITOR

sshd = sshd_helper.sshd  # the fixture; assigned, not imported, so ruff sees no F811

WAIT = 30.0  # seconds; a bound on every wait, never an expectation
_ids = itertools.count(1)


@dataclass
class Harness:
    """A worker's shared attempt environment over a ``data`` bucket and a log bucket."""

    tmp: Path
    data: Path  # the "data" bucket's directory
    logs: Path  # the default bucket's directory (logs go there)
    env: AttemptEnv
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)

    def run(self, document: dict[str, Any], *, cancel: threading.Event | None = None,
            emit: Callable[[str, dict[str, Any]], None] | None = None,
            attempt_id: int | None = None) -> Result:
        aid = next(_ids) if attempt_id is None else attempt_id
        name = str(document.get("name", "task"))

        def record(kind: str, data: dict[str, Any]) -> None:
            self.events.append((aid, kind, data))

        result = run_attempt(Assignment(aid, 1, name, 1, document), self.env,
                             emit or record, cancel or threading.Event())
        JANITOR.flush()  # the work directory is removed in the background
        return result

    def kinds(self, attempt_id: int) -> list[str]:
        return [k for a, k, _ in self.events if a == attempt_id]

    def event(self, attempt_id: int, kind: str) -> dict[str, Any]:
        (data,) = [d for a, k, d in self.events if a == attempt_id and k == kind]
        return data


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    data = tmp_path / "data"
    logs = tmp_path / "default"
    data.mkdir()
    logs.mkdir()
    env = AttemptEnv(workdir_root=tmp_path / "work", cache=Cache(tmp_path / "cache", 10**8),
                     buckets={"data": f"file://{data}"}, default_url=f"file://{logs}",
                     settings=WorkerSettings(log_tail_bytes=200))
    return Harness(tmp_path, data, logs, env)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def temp_leftovers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".ecloud-part-" in p.name)


def put(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


MD5_DOC: dict[str, Any] = {
    "name": "md5-clear",
    "inputs": {"data:in/clear.txt": "/mnt/clear", "data:in/tree/": "tree/"},
    "outputs": {"data:out/crypt": "/mnt/crypt", "data:out/listing/": "listing/"},
    "commands": [
        {"command": ["md5sum", "mnt/clear"], "stdout": "mnt/crypt"},
        {"command": ["sh", "-c", "mkdir -p listing/deep && find tree -type f | sort "
                     "> listing/deep/files && echo to-stderr >&2 && echo to-stdout"]},
    ],
}


def put_md5_inputs(root: Path) -> bytes:
    clear = b"clear text\n" * 1000
    put(root, "in/clear.txt", clear)
    put(root, "in/tree/a", b"a")
    put(root, "in/tree/sub/b", b"bb")
    return clear


# ---- storage modes -------------------------------------------------------------------------


def test_cloud_mode_end_to_end(h: Harness) -> None:
    clear = put_md5_inputs(h.data)
    result = h.run(MD5_DOC, attempt_id=101)
    assert result.outcome == "succeeded", result.reason
    assert result.exit_status == 0
    assert tree(h.data / "out") == {
        "crypt": f"{hashlib.md5(clear).hexdigest()}  mnt/clear\n".encode(),
        "listing/deep/files": b"tree/a\ntree/sub/b\n",
    }
    assert temp_leftovers(h.data) == []
    assert result.stdout_tail == "to-stdout\n" and result.stderr_tail == "to-stderr\n"

    # events, in order, with what hyperflow published
    assert h.kinds(101) == ["stage-in.started", "stage-in.finished", "execution.started",
                            "execution.finished", "stage-out.started", "stage-out.finished"]
    stage_in = h.event(101, "stage-in.finished")
    assert stage_in["bytes"] == len(clear) + 3 and stage_in["seconds"] >= 0
    stage_out = h.event(101, "stage-out.finished")
    assert stage_out["bytes"] == len((h.data / "out" / "crypt").read_bytes()) + \
        len(b"tree/a\ntree/sub/b\n")
    assert stage_out["seconds"] >= 0
    finished = h.event(101, "execution.finished")
    assert finished["exit_status"] == 0 and finished["executable"] == "sh"
    assert set(finished["metrics"]) == {"wall", "cpu", "max_rss"}
    assert finished["metrics"]["max_rss"] > 0

    m = result.metrics
    assert m["bytes_in"] == stage_in["bytes"] and m["bytes_out"] == stage_out["bytes"]
    assert m["wall"] > 0 and m["max_rss"] > 0 and m["cpu"] >= 0
    assert "stage_in_seconds" in m and "stage_out_seconds" in m

    # full logs in the default bucket (empty ones are not copied); the work dir is gone
    assert tree(h.logs) == {"ecloud-logs/md5-clear/101/1.stdout": b"to-stdout\n",
                            "ecloud-logs/md5-clear/101/1.stderr": b"to-stderr\n"}
    assert list((h.tmp / "work").iterdir()) == []


def test_cloud_mode_reads_inputs_through_the_cache(h: Harness) -> None:
    put_md5_inputs(h.data)
    assert h.run(MD5_DOC).outcome == "succeeded"
    assert h.env.cache is not None
    assert (h.env.cache.downloads, h.env.cache.hits) == (3, 0)
    assert h.run(MD5_DOC).outcome == "succeeded"  # a retry, or another task, same inputs
    assert (h.env.cache.downloads, h.env.cache.hits) == (3, 3)
    assert len(h.env.cache.entries()) == 3


def test_nfs_mode_copies_directly(h: Harness) -> None:
    clear = put_md5_inputs(h.data)
    doc = {**MD5_DOC, "storage": "nfs", "workdir": str(h.tmp / "unused")}
    result = h.run(doc)
    assert result.outcome == "succeeded", result.reason
    assert (h.data / "out" / "crypt").read_text().startswith(hashlib.md5(clear).hexdigest())
    assert (h.data / "out" / "listing" / "deep" / "files").is_file()
    assert h.env.cache is not None and h.env.cache.entries() == []  # no second copy
    assert h.env.cache.downloads == 0
    assert temp_leftovers(h.data) == []


@pytest.mark.sshd
def test_nfs_mode_refuses_a_non_file_bucket(h: Harness, sshd: Sshd) -> None:
    h.env.buckets["remote"] = f"sftp://{sshd.user}@{sshd.host}:{sshd.port}/x"
    doc = {"storage": "nfs", "workdir": "/x", "inputs": {"remote:in": "in"},
           "commands": [{"command": ["true"]}]}
    result = h.run(doc)
    assert result.outcome == "failed"
    assert "storage 'nfs' needs file:// buckets" in result.reason


def test_local_mode_runs_in_place(h: Harness) -> None:
    workdir = h.tmp / "shared"
    put(workdir, "in/clear.txt", b"in place\n")
    doc = {"name": "in-place", "storage": "local", "workdir": str(workdir),
           "inputs": {"data:ignored/clear.txt": "in/clear.txt"},
           "outputs": {"data:out/upper": "out/upper"},
           "commands": [{"command": ["tr", "a-z", "A-Z"], "stdin": "in/clear.txt",
                         "stdout": "out/upper"}]}
    aid = next(_ids)
    result = h.run(doc, attempt_id=aid)
    assert result.outcome == "succeeded", result.reason
    assert (workdir / "out" / "upper").read_text() == "IN PLACE\n"  # left where it was made
    assert tree(h.data) == {}  # nothing copied in or out
    assert h.event(aid, "stage-in.finished")["bytes"] == 0
    assert h.event(aid, "stage-out.finished")["bytes"] == 0
    assert (workdir / "in" / "clear.txt").is_file()  # the shared directory is not removed
    assert tree(h.logs) == {}  # the command printed nothing: no empty log is copied


def test_local_mode_missing_input(h: Harness) -> None:
    workdir = h.tmp / "shared"
    workdir.mkdir()
    doc = {"storage": "local", "workdir": str(workdir), "inputs": {"data:x": "x"},
           "commands": [{"command": ["touch", "ran"]}]}
    result = h.run(doc)
    assert result.outcome == "failed"
    assert "input data:x not found at" in result.reason
    assert not (workdir / "ran").exists()
    doc = {"storage": "local", "workdir": str(h.tmp / "absent"),
           "commands": [{"command": ["true"]}]}
    assert "does not exist on this worker" in h.run(doc).reason


@pytest.mark.sshd
def test_cloud_mode_over_sftp(h: Harness, sshd: Sshd) -> None:
    remote = h.tmp / "sftp-root"
    clear = put_md5_inputs(remote)
    h.env.buckets["data"] = (
        f"sftp://{sshd.user}@{sshd.host}:{sshd.port}{remote}"
        f"?key_filename={quote(str(sshd.client_key_path))}"
        f"&known_hosts={quote(str(sshd.known_hosts_path))}")
    for _ in range(2):  # the second run replaces the first one's outputs
        result = h.run(MD5_DOC)
        assert result.outcome == "succeeded", result.reason
    assert tree(remote / "out") == {
        "crypt": f"{hashlib.md5(clear).hexdigest()}  mnt/clear\n".encode(),
        "listing/deep/files": b"tree/a\ntree/sub/b\n",
    }
    assert temp_leftovers(remote) == []
    assert h.env.cache is not None and h.env.cache.hits == 3


# ---- outputs are published only on success -------------------------------------------------


def test_failing_second_command_publishes_nothing(h: Harness) -> None:
    put(h.data, "out/a", b"from an earlier attempt\n")
    doc = {"name": "half", "outputs": {"data:out/a": "a", "data:out/dir/": "d/"},
           "commands": [{"command": ["sh", "-c", "echo made > a; mkdir d; echo x > d/f"]},
                        {"command": ["sh", "-c", "echo broken >&2; exit 4"]}]}
    aid = next(_ids)
    result = h.run(doc, attempt_id=aid)
    assert result.outcome == "failed"
    assert result.exit_status == 4
    assert result.reason == "exit status 4 from sh (command 2 of 2 (sh))"
    assert result.stderr_tail == "broken\n"
    # the earlier attempt's output is untouched; nothing new, no temporary names
    assert tree(h.data) == {"out/a": b"from an earlier attempt\n"}
    assert "stage-out.started" not in h.kinds(aid)
    assert h.event(aid, "execution.finished")["exit_status"] == 4
    # the logs of a failed attempt are what the user needs most
    assert tree(h.logs)[f"ecloud-logs/half/{aid}/1.stderr"] == b"broken\n"
    assert list((h.tmp / "work").iterdir()) == []


def test_an_output_not_produced_publishes_nothing(h: Harness) -> None:
    doc = {"outputs": {"data:out/a": "a", "data:out/b": "b"},
           "commands": [{"command": ["sh", "-c", "echo made > a"]}]}
    result = h.run(doc)
    assert result.outcome == "failed"
    assert "did not produce the file 'b'" in result.reason
    assert tree(h.data) == {}


def test_upload_failure_midway_publishes_nothing(h: Harness) -> None:
    put(h.data, "blocker", b"a file where a directory is needed")
    doc = {"outputs": {"data:out/a": "a", "data:blocker/b": "b"},
           "commands": [{"command": ["sh", "-c", "echo A > a; echo B > b"]}]}
    result = h.run(doc)
    assert result.outcome == "failed"
    assert "output data:blocker/b" in result.reason
    assert tree(h.data) == {"blocker": b"a file where a directory is needed"}


def test_publish_conflict_publishes_nothing(h: Harness) -> None:
    put(h.data, "taken/x", b"a directory where a file output goes")
    doc = {"outputs": {"data:out/a": "a", "data:taken": "b"},
           "commands": [{"command": ["sh", "-c", "echo A > a; echo B > b"]}]}
    result = h.run(doc)
    assert result.outcome == "failed"
    assert "already exists as a directory" in result.reason
    assert tree(h.data) == {"taken/x": b"a directory where a file output goes"}


def test_timeout_publishes_nothing(h: Harness) -> None:
    doc = {"timeout": 1, "outputs": {"data:out/a": "a"},
           "commands": [{"command": ["sh", "-c", "echo A > a; sleep 100"]}]}
    result = h.run(doc)
    assert result.outcome == "timeout"
    assert result.reason.startswith("timed out after 1 s")
    assert tree(h.data) == {}


def test_cancel_during_execution(h: Harness) -> None:
    cancel = threading.Event()
    marker = h.tmp / "started"
    doc = {"outputs": {"data:out/a": "a"},
           "commands": [{"command": ["sh", "-c", f"echo A > a; touch {marker}; sleep 100"]}]}
    box: list[Result] = []
    runner = threading.Thread(target=lambda: box.append(h.run(doc, cancel=cancel)))
    runner.start()
    deadline = time.monotonic() + WAIT
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    cancel.set()
    runner.join(WAIT)
    assert not runner.is_alive()
    assert box[0].outcome == "cancelled"
    assert tree(h.data) == {}


def test_cancel_before_stage_in(h: Harness) -> None:
    put(h.data, "in", b"x")
    cancel = threading.Event()
    cancel.set()
    result = h.run({"inputs": {"data:in": "in"}, "commands": [{"command": ["touch", "ran"]}]},
                   cancel=cancel)
    assert result.outcome == "cancelled"


# ---- staging errors ------------------------------------------------------------------------


def test_missing_remote_input_is_a_clear_failure(h: Harness) -> None:
    aid = next(_ids)
    result = h.run({"inputs": {"data:nope/x.txt": "x.txt"},
                    "commands": [{"command": ["touch", "ran"]}]}, attempt_id=aid)
    assert result.outcome == "failed"
    assert result.reason.startswith("staging: input data:nope/x.txt not found")
    assert "push it first or fix inputs['data:nope/x.txt']" in result.reason
    assert "execution.started" not in h.kinds(aid)
    result = h.run({"inputs": {"data:nope/": "d/"}, "commands": [{"command": ["true"]}]})
    assert result.outcome == "failed" and "data:nope/ not found" in result.reason


def test_unknown_bucket_is_a_clear_failure(h: Harness) -> None:
    result = h.run({"inputs": {"elsewhere:x": "x"}, "commands": [{"command": ["true"]}]})
    assert result.outcome == "failed"
    assert "bucket 'elsewhere' is not defined on this worker" in result.reason


def test_invalid_document_is_a_failure_not_a_crash(h: Harness) -> None:
    result = h.run({"commands": [], "bogus": 1})
    assert result.outcome == "failed"
    assert result.reason.startswith("invalid task document:")
    assert "bogus" in result.reason


def test_events_that_cannot_be_sent_do_not_fail_the_task(h: Harness) -> None:
    def broken(kind: str, data: dict[str, Any]) -> None:
        raise ConnectionError("boss unreachable")

    doc = {"outputs": {"data:o": "o"}, "commands": [{"command": ["sh", "-c", "echo o > o"]}]}
    result = h.run(doc, emit=broken)
    assert result.outcome == "succeeded", result.reason
    assert tree(h.data) == {"o": b"o\n"}


def test_tails_in_the_result_are_bounded(h: Harness) -> None:
    result = h.run({"commands": [{"command": ["sh", "-c", "seq 1 10000"]}]})
    assert result.outcome == "succeeded"
    assert len(result.stdout_tail.encode()) <= 200  # log_tail_bytes
    assert result.stdout_tail.endswith("9999\n10000\n")


def test_host_env_is_the_tasks(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECLOUD_WORKER_TOKEN", "secret")
    doc = {"env": {"GREETING": "hi"}, "outputs": {"data:env": "env"},
           "commands": [{"command": ["env"], "stdout": "env"}]}
    assert h.run(doc).outcome == "succeeded"
    seen = (h.data / "env").read_text()
    assert "GREETING=hi\n" in seen and "secret" not in seen


# ---- path escapes --------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [
    {"outputs": {"data:o": "../o"}, "commands": [{"command": ["true"]}]},
    {"inputs": {"data:../etc/passwd": "p"}, "commands": [{"command": ["true"]}]},
    {"commands": [{"command": ["true"], "stdout": "a/../../x"}]},
])
def test_dotdot_is_refused(h: Harness, doc: dict[str, Any]) -> None:
    result = h.run(doc)
    assert result.outcome == "failed"
    assert result.reason.startswith("invalid task document:")
    assert "'..'" in result.reason


def test_output_symlink_out_of_the_work_dir_is_refused(h: Harness) -> None:
    secret = h.tmp / "secret"
    secret.write_text("worker secret\n")
    doc = {"outputs": {"data:stolen": "o"},
           "commands": [{"command": ["ln", "-s", str(secret), "o"]}]}
    result = h.run(doc)
    assert result.outcome == "failed"
    assert "outside the work directory" in result.reason
    assert tree(h.data) == {}


def test_symlink_inside_an_output_directory_is_refused(h: Harness) -> None:
    secret = h.tmp / "secret"
    secret.write_text("worker secret\n")
    doc = {"outputs": {"data:stolen/": "d/"},
           "commands": [{"command": ["sh", "-c", f"mkdir d && echo ok > d/ok && "
                                     f"ln -s {secret} d/link"]}]}
    result = h.run(doc)
    assert result.outcome == "failed"
    assert "outside the work directory" in result.reason
    assert tree(h.data) == {}


def test_redirect_through_a_symlink_is_refused(h: Harness) -> None:
    victim = h.tmp / "victim"
    victim.write_text("untouched\n")
    doc = {"commands": [{"command": ["ln", "-s", str(victim), "link"]},
                        {"command": ["echo", "overwritten"], "stdout": "link"}]}
    result = h.run(doc)
    assert result.outcome == "failed"
    assert "outside the work directory" in result.reason
    assert victim.read_text() == "untouched\n"


def test_fifo_in_an_output_directory_is_refused(h: Harness) -> None:
    doc = {"outputs": {"data:d/": "d/"},
           "commands": [{"command": ["sh", "-c", "mkdir d && echo ok > d/ok && mkfifo d/pipe"]}]}
    result = h.run(doc)
    assert result.outcome == "failed"
    assert "is not a regular file" in result.reason
    assert tree(h.data) == {}


def test_internal_path_naming_the_work_dir_is_refused(h: Harness) -> None:
    result = h.run({"outputs": {"data:o/": "/"}, "commands": [{"command": ["true"]}]})
    assert result.outcome == "failed"
    assert "names the work directory itself" in result.reason


def test_leftover_work_dir_of_a_crashed_attempt_is_replaced(h: Harness) -> None:
    stale = h.tmp / "work" / "555" / "work"
    stale.mkdir(parents=True)
    (stale / "o").write_text("stale\n")
    doc = {"outputs": {"data:o": "o"},
           "commands": [{"command": ["sh", "-c", "test ! -e o && echo fresh > o"]}]}
    result = h.run(doc, attempt_id=555)
    assert result.outcome == "succeeded", result.reason
    assert (h.data / "o").read_text() == "fresh\n"
    assert not (h.tmp / "work" / "555").exists()
    assert os.listdir(h.tmp / "work") == []


@pytest.mark.parametrize("name", ["../../escaped", "..", "a/../../../escaped", "./x//y"])
def test_task_name_cannot_move_logs_out_of_ecloud_logs(h: Harness, name: str) -> None:
    """Such names are refused at push; a worker handed one anyway refuses to run it."""
    aid = next(_ids)
    result = h.run({"name": name, "commands": [{"command": ["sh", "-c", "echo out"]}]},
                   attempt_id=aid)
    assert result.outcome == "failed" and "name" in result.reason, result.reason
    assert tree(h.logs) == {}
    assert not (h.tmp / "escaped").exists()
    assert "escaped" not in os.listdir(h.tmp)


def test_log_prefix_escapes_dot_segments() -> None:
    assert log_prefix("../../x", 3) == "ecloud-logs/%2E%2E/%2E%2E/x/3"
    assert log_prefix("./x//y", 4) == "ecloud-logs/%2E/x/y/4"
