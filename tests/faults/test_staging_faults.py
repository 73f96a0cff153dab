"""Fault 7: the disk fills, the work directory cannot be written, the datastore goes down.

Each case runs one task through the real pieces (the boss's claim and
complete on a real SQLite database, the worker's attempt code on real
files, a real tmpfs, a real bind mount, a real sshd) with the fault in
place, then clears the fault and lets the boss's retry run:

- the datastore's filesystem is full while outputs are uploaded;
- the worker's work directory's filesystem is full while the command writes;
- the work directory cannot be created (read-only mount; a file in its place);
- the SFTP datastore's sshd is killed when stage-out starts, or between the
  upload of the first output and the second (whose temporary is then left
  behind, by name only: no final path is touched).

Every time the first attempt must fail with a reason that names the cause,
in the database (what `boss show` prints), the task must go back to ready
for its retry, and no final output path may hold anything (a task's outputs
are published all or none, from ``.ecloud-part-*`` temporaries); the retry
must then succeed with complete outputs. The tmpfs and bind mounts need
root; the case without a mount runs as anyone.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from boss.service import Boss
from protocol.messages import Result
from protocol.settings import Settings, absolutize
from tests import sshd as sshd_helper
from tests.acceptance.helpers import Cli
from worker.attempt import AttemptEnv, run_attempt

BIG = 3_000_000  # bytes of the big output: three times the full filesystems below
SMALL_FS = "1m"
ROOMY_FS = "16m"
# written first, then the big one: a failure of the second must unpublish the first too
OUTPUTS = {"data:results/small.txt": "small.txt", "data:results/big.bin": "big.bin"}
COMMAND = f"echo small > small.txt && yes ecloud | head -c {BIG} > big.bin"
EXPECTED = hashlib.sha256((b"ecloud\n" * (BIG // 7 + 1))[:BIG]).hexdigest()

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="mounting a tmpfs or a read-only bind mount needs root")


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True,
                       timeout=30)


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` bind-mounted on itself, read-only (root ignores modes, not mounts)."""
    path.mkdir(parents=True, exist_ok=True)
    mount("--bind", str(path), str(path))
    try:
        mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True,
                       timeout=30)


@dataclass
class Site:
    """A boss on SQLite, one registered worker, and the worker's attempt environment."""

    root: Path
    boss: Boss
    worker_id: int
    settings_path: Path
    workdir: Path

    def push(self, name: str, **extra: Any) -> None:
        doc = {"name": name, "retries": 2, "outputs": OUTPUTS,
               "commands": [{"command": [COMMAND], "shell": True}], **extra}
        path = self.root / f"{name}.jsonl"
        path.write_text(json.dumps(doc) + "\n", encoding="utf-8")
        self.boss.push(path)

    def attempt(self, on_event: Callable[[str], None] | None = None,
                workdir: Path | None = None) -> Result:
        """Claim the task, run the attempt as a worker slot would, report the result."""
        claimed = self.boss.claim(self.worker_id, 1)
        assert len(claimed) == 1, claimed
        buckets, default = self.boss.buckets()
        env = AttemptEnv(workdir_root=workdir or self.workdir, cache=None, buckets=buckets,
                         default_url=default, settings=self.boss.settings.worker)

        def emit(kind: str, _data: dict[str, Any]) -> None:
            if on_event is not None:
                on_event(kind)

        result = run_attempt(claimed[0], env, emit, threading.Event())
        assert self.boss.complete(self.worker_id, result) is not None
        return result

    def task(self, name: str) -> dict[str, Any]:
        return self.boss.show(name)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "site"
    root.mkdir()
    settings_path = root / "settings.toml"
    settings_path.write_text(
        f'[boss]\ndatabase_url = "sqlite:///{root}/boss.db"\n'
        f'[datastore]\ndefault = "file://{root}/logs"\n'
        f'[datastore.buckets]\ndata = "file://{root}/bucket"\n'
        f'[worker]\nworkdir = "{root}/work"\ncache_dir = "{root}/cache"\n', encoding="utf-8")
    from protocol.settings import load_settings

    settings: Settings = absolutize(load_settings(str(settings_path), environ={}, cwd=root),
                                    root)
    boss = Boss(settings)
    boss.init()
    wid, _, _ = boss.add_worker(name="w0")
    (root / "bucket").mkdir()
    (root / "logs").mkdir()
    try:
        yield Site(root, boss, wid, settings_path, root / "work")
    finally:
        boss.close()


def published(bucket: Path) -> dict[str, int]:
    """Every file under the bucket's results/, with its size (temporaries included)."""
    out = bucket / "results"
    if not out.is_dir():
        return {}
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
            if p.is_file()}


def check_first_failed(site: Site, name: str, result: Result, cause: str,
                       bucket: Path) -> dict[str, Any]:
    """The first attempt failed for ``cause``, the task is queued again, nothing published."""
    shown = site.task(name)
    files = published(bucket)
    print(f"  attempt 1: {result.outcome}: {result.reason!r}")
    if result.stderr_tail:
        print(f"    stderr tail: {result.stderr_tail.strip()[-160:]!r}")
    print(f"    task now {shown['state']} (tries {shown['tries']}/{shown['max_tries']}); "
          f"files under results/: {files or 'none'}")
    assert result.outcome == "failed", result
    assert "internal worker error" not in result.reason, result.reason
    assert cause.lower() in (result.reason + result.stderr_tail).lower(), result
    assert shown["attempts"][0]["reason"] == result.reason
    assert shown["state"] == "ready" and shown["tries"] == 1, shown
    assert not any(f in files for f in ("small.txt", "big.bin")), \
        f"an output was published by a failed attempt: {files}"
    return shown


def check_retry_succeeded(site: Site, name: str, result: Result, bucket: Path,
                          stale: int = 0) -> None:
    shown = site.task(name)
    files = published(bucket)
    print(f"  attempt 2 (the retry): {result.outcome}; task {shown['state']}; "
          f"results/: {files}")
    assert result.outcome == "succeeded", result
    assert shown["state"] == "succeeded" and shown["tries"] == 2, shown
    assert files.get("small.txt") == len("small\n") and files.get("big.bin") == BIG, files
    big = (bucket / "results" / "big.bin").read_bytes()
    assert hashlib.sha256(big).hexdigest() == EXPECTED, "the published output is damaged"
    leftovers = [f for f in files if ".ecloud-part-" in f]
    assert len(leftovers) == stale, f"temporary uploads left behind: {leftovers}"


@needs_root
def test_datastore_disk_full_during_stage_out(site: Site) -> None:
    bucket = site.root / "bucket"
    print(f"\nfault 7a, datastore disk full: a {SMALL_FS} tmpfs as the bucket, outputs of "
          f"6 + {BIG} bytes")
    with tmpfs(bucket, SMALL_FS):
        site.push("full-store")
        first = site.attempt()
        check_first_failed(site, "full-store", first, "No space left on device", bucket)
        # what a user sees: `boss show`, the real command
        shown = Cli(site.root, site.settings_path).ok("show", "full-store").stdout
        print(f"    `boss show` names it: {'No space left on device' in shown}")
        assert "No space left on device" in shown, shown
        mount("-o", f"remount,size={ROOMY_FS}", str(bucket))
        second = site.attempt()
        check_retry_succeeded(site, "full-store", second, bucket)


@needs_root
def test_workdir_disk_full_while_the_command_writes(site: Site) -> None:
    bucket = site.root / "bucket"
    print(f"\nfault 7b, work directory disk full: a {SMALL_FS} tmpfs as the worker's "
          f"workdir, the command writes {BIG} bytes")
    with tmpfs(site.workdir, SMALL_FS):
        site.push("full-work")
        first = site.attempt()
        check_first_failed(site, "full-work", first, "No space left on device", bucket)
        mount("-o", f"remount,size={ROOMY_FS}", str(site.workdir))
        second = site.attempt()
        check_retry_succeeded(site, "full-work", second, bucket)


@needs_root
def test_workdir_read_only(site: Site) -> None:
    bucket = site.root / "bucket"
    print("\nfault 7c, work directory unwritable: the worker's workdir is a read-only "
          "bind mount")
    with read_only(site.workdir):
        site.push("ro-work")
        first = site.attempt()
        check_first_failed(site, "ro-work", first, "Read-only file system", bucket)
        assert str(site.workdir) in first.reason, first.reason
        mount("-o", "remount,rw,bind", str(site.workdir))
        second = site.attempt()
        check_retry_succeeded(site, "ro-work", second, bucket)


def test_workdir_is_a_file(site: Site) -> None:
    bucket = site.root / "bucket"
    print("\nfault 7d, work directory unusable: a file where the workdir should be")
    site.workdir.write_text("not a directory\n")
    site.push("file-work")
    first = site.attempt()
    check_first_failed(site, "file-work", first, "Not a directory", bucket)
    site.workdir.unlink()
    second = site.attempt()
    check_retry_succeeded(site, "file-work", second, bucket)


@pytest.mark.sshd
def test_sftp_datastore_down_at_stage_out(site: Site, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    (remote / "inputs").mkdir(parents=True)
    (remote / "inputs" / "in.txt").write_text("input\n")

    def sftp_url(server: sshd_helper.Sshd) -> str:
        from urllib.parse import quote

        return (f"sftp://{server.user}@{server.host}:{server.port}{remote}"
                f"?key_filename={quote(str(server.client_key_path))}"
                f"&known_hosts={quote(str(server.known_hosts_path))}")

    server = sshd_helper.start_sshd(tmp_path / "first")
    try:
        site.boss.set_bucket("data", sftp_url(server))
        print("\nfault 7e, datastore down during stage-out: an sftp:// bucket whose sshd is "
              "killed as stage-out starts (the input came in over it)")
        site.push("sftp-down", inputs={"data:inputs/in.txt": "in.txt"})
        seen: list[str] = []

        def kill_at_stage_out(kind: str) -> None:
            seen.append(kind)
            if kind == "stage-out.started":
                server.stop()  # sshd and its per-connection children: the session drops

        first = site.attempt(on_event=kill_at_stage_out)
        print(f"    events seen: {seen}")
        assert "stage-in.finished" in seen and "stage-out.started" in seen, seen
        check_first_failed(site, "sftp-down", first, "results/", remote)
    finally:
        server.stop()
    # the datastore comes back (a new sshd: new keys, port, so a new bucket URL)
    again = sshd_helper.start_sshd(tmp_path / "second")
    try:
        site.boss.set_bucket("data", sftp_url(again))
        second = site.attempt()
        check_retry_succeeded(site, "sftp-down", second, remote)
    finally:
        again.stop()


@pytest.mark.sshd
def test_sftp_datastore_down_between_two_uploads(site: Site, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The first output is uploaded (to its temporary name), then the datastore dies."""
    import worker.datastore

    remote = tmp_path / "remote"
    remote.mkdir()

    def sftp_url(server: sshd_helper.Sshd) -> str:
        from urllib.parse import quote

        return (f"sftp://{server.user}@{server.host}:{server.port}{remote}"
                f"?key_filename={quote(str(server.client_key_path))}"
                f"&known_hosts={quote(str(server.known_hosts_path))}")

    server = sshd_helper.start_sshd(tmp_path / "first")
    real_upload = worker.datastore.upload
    uploads: list[str] = []

    def upload_then_die(fs: Any, local: Path, rpath: str, **kw: Any) -> int:
        moved = real_upload(fs, local, rpath, **kw)
        uploads.append(rpath.rsplit("/", 1)[-1])
        if len(uploads) == 1:
            server.stop()  # between the first output and the second
        return moved

    try:
        site.boss.set_bucket("data", sftp_url(server))
        print("\nfault 7f, datastore down between two uploads: an sftp:// bucket whose sshd "
              "is killed once the first output is uploaded")
        site.push("sftp-mid")
        with monkeypatch.context() as patch:
            patch.setattr(worker.datastore, "upload", upload_then_die)
            first = site.attempt()
        print(f"    uploaded before the kill: {uploads}")
        check_first_failed(site, "sftp-mid", first, "results/big.bin", remote)
        stale = [f for f in published(remote) if ".ecloud-part-" in f]
        # the datastore was gone: the temporary could not be removed, but it is only that
        print(f"    temporaries left by the failed attempt (not final paths): {stale}")
        assert stale == ["small.txt.ecloud-part-1"], stale
    finally:
        server.stop()
    again = sshd_helper.start_sshd(tmp_path / "second")
    try:
        site.boss.set_bucket("data", sftp_url(again))
        second = site.attempt()
        check_retry_succeeded(site, "sftp-mid", second, remote, stale=1)
    finally:
        again.stop()
