"""A containerised task sees only its declared paths, and cannot smuggle host files out.

Real podman with the local busybox image (skipped, with the reason, when podman
is missing). The task reads its own ``/proc/self/mountinfo`` and environment
from inside the container; the worker's secrets (a token file and a key file
beside the work directory, an ``ECLOUD_`` variable in its environment) must
not be reachable from there.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.messages import Assignment, Result
from protocol.settings import WorkerSettings
from tests.podman_image import ensure_image, podman_missing_reason
from worker.attempt import AttemptEnv, run_attempt
from worker.cache import Cache
from worker.workdirs import JANITOR

pytestmark = pytest.mark.podman

_ids = itertools.count(int(time.time()) % 1_000_000 * 1000 + 700)
SECRET = "worker-secret-7c1d9e"
# what podman itself puts in every container (not a host directory of ours)
RUNTIME_MOUNTS = {"/", "/proc", "/dev", "/dev/pts", "/dev/mqueue", "/dev/shm", "/sys",
                  "/sys/fs/cgroup", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf",
                  "/run/.containerenv", "/dev/console", "/etc/passwd", "/etc/group",
                  "/run/secrets"}


@pytest.fixture(scope="module")
def image() -> str:
    why = podman_missing_reason()
    if why is not None:
        print(f"\nSKIPPING podman tests: {why}")
        pytest.skip(why)
    return ensure_image()


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        self.data.mkdir()
        (tmp / "default").mkdir()
        # the worker's own secrets, where a worker keeps them: beside its work directory
        self.secrets = tmp / "worker"
        self.secrets.mkdir()
        (self.secrets / "token").write_text(SECRET + "\n")
        (self.secrets / "worker_key").write_text(f"-----BEGIN KEY-----\n{SECRET}\n")
        self.env = AttemptEnv(workdir_root=self.secrets / "work",
                              cache=Cache(self.secrets / "cache", 10**8),
                              buckets={"data": f"file://{self.data}"},
                              default_url=f"file://{tmp / 'default'}",
                              settings=WorkerSettings(log_tail_bytes=4000))

    def run(self, doc: dict[str, Any]) -> Result:
        aid = next(_ids)
        result = run_attempt(Assignment(aid, 1, str(doc.get("name", "t")), 1, doc), self.env,
                             lambda kind, data: None, threading.Event())
        JANITOR.flush()
        return result


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.setenv("ECLOUD_WORKER_TOKEN_PROBE", SECRET)
    yield Site(tmp_path)


def bind_mounts(mountinfo: str) -> dict[str, str]:
    """Mount point -> root (the source path within its filesystem) of each mount."""
    out = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        out[fields[4]] = fields[3]
    return out


def test_only_declared_paths_are_mounted(site: Site, image: str) -> None:
    (site.data / "in.txt").write_text("input-marker-5b\n")
    probe = ("cat /proc/self/mountinfo > /out/mountinfo; env > /out/env; "
             f"for p in {site.secrets}/token {site.secrets}/worker_key {site.tmp} /root/.ssh; "
             "do test -e $p && echo FOUND $p; done > /outdir/found; "
             # every directory but the kernel's (grep -r on /dev would read /dev/zero forever)
             f"grep -rl {SECRET} $(ls -d /* | grep -v -e ^/proc -e ^/sys -e ^/dev) "
             "2>/dev/null > /outdir/grep; "
             "grep -rl input-marker-5b $(ls -d /* | grep -v -e ^/proc -e ^/sys -e ^/dev) "
             "2>/dev/null > /outdir/control; true")
    doc = {"image": image,
           "inputs": {"data:in.txt": "/in/in.txt"},
           "outputs": {"data:res/mountinfo": "/out/mountinfo", "data:res/env": "/out/env",
                       "data:res/dir/": "/outdir/"},
           "env": {"GREETING": "hi"}, "timeout": 120,
           "commands": [{"command": ["sh", "-c", probe], "stderr": "/logs/err.txt"}]}
    result = site.run(doc)
    assert result.outcome == "succeeded", result.reason + result.stderr_tail
    mounts = bind_mounts((site.data / "res" / "mountinfo").read_text())
    declared = {"/in/in.txt", "/out/mountinfo", "/out/env", "/outdir", "/logs/err.txt"}
    ours = {point: root for point, root in mounts.items()
            if point not in RUNTIME_MOUNTS and not point.startswith(("/proc/", "/sys/",
                                                                     "/dev/"))}
    assert set(ours) == declared, ours
    # each one is from the attempt's own work directory, nothing above it
    for point, root in ours.items():
        assert "/work/" in root and root.endswith(point), (point, root)
    assert not any(str(site.secrets) == root or root.endswith(("/token", "/worker_key"))
                   for root in mounts.values())
    env = (site.data / "res" / "env").read_text()
    assert "GREETING=hi" in env  # the control: the declared variable is there
    assert SECRET not in env and "ECLOUD_" not in env, env
    assert (site.data / "res" / "dir" / "found").read_text() == ""
    assert (site.data / "res" / "dir" / "grep").read_text() == ""
    # the control: the same search does find what is mounted
    assert "/in/in.txt" in (site.data / "res" / "dir" / "control").read_text()
    print(f"\n{len(mounts)} mounts in the container, {len(ours)} from the host: "
          f"{sorted(ours)}; no secret file or variable visible")


@pytest.mark.parametrize("target", ["abs", "rel"])
def test_a_symlink_made_in_the_container_cannot_exfiltrate(site: Site, image: str,
                                                           target: str) -> None:
    """Inside the container a link to a host path means nothing; the worker, staging
    out on the host, would follow it. It refuses instead."""
    secret = site.secrets / "token"
    link = (str(secret) if target == "abs"
            else "../" * (len(site.secrets.parts) + 6) + str(secret).lstrip("/"))
    doc = {"image": image, "outputs": {"data:stolen/": "/outdir/"},
           "commands": [{"command": [
                "sh", "-c", f"echo ok > /outdir/ok; ln -s {link} /outdir/token"]}]}
    result = site.run(doc)
    assert result.outcome == "failed"
    assert "outside the work directory" in result.reason, result.reason
    assert not (site.data / "stolen").exists()
    assert [p for p in site.data.rglob("*")] == []
    # and a declared single-file output cannot be swapped for a link: it is a mount point
    doc = {"image": image, "outputs": {"data:stolen.txt": "/out/o"},
           "commands": [{"command": ["sh", "-c", f"rm -f /out/o; ln -sf {link} /out/o"]}]}
    result = site.run(doc)
    assert result.outcome == "failed", result.reason
    assert not (site.data / "stolen.txt").exists()


def test_a_later_command_cannot_mount_a_host_file_through_a_planted_link(
        site: Site, image: str) -> None:
    """Each command is a new container whose mounts are host paths under the work dir.

    The first command renames a directory holding a declared path and puts a
    link to the worker's secrets directory in its place; the second command's
    mount of that declared path would then bind the worker's token into the
    container, where it could be copied to a legitimate output. The worker
    must vet every mount source again just before each command.
    """
    plant = f"mv /outdir/sub /outdir/old && ln -s {site.secrets} /outdir/sub && echo planted"
    doc = {"image": image,
           "outputs": {"data:res/": "/outdir/", "data:token": "/outdir/sub/token"},
           "commands": [{"command": ["sh", "-c", plant], "stdout": "/outdir/log"},
                        {"command": ["sh", "-c", "cat /outdir/sub/token"]}]}
    result = site.run(doc)
    # a failed attempt still reports its output's tail and uploads its logs
    assert SECRET not in result.stdout_tail + result.stderr_tail + result.reason
    leaked = [p for p in site.tmp.glob("[dd]*/**/*")
              if p.is_file() and SECRET in p.read_text(errors="replace")]
    assert leaked == [], leaked
    assert result.outcome == "failed", result.reason
    assert "outside the work directory" in result.reason, result.reason
    assert (site.secrets / "token").read_text() == SECRET + "\n"  # not written either
