"""End to end, as a user runs it: `boss serve`, `worker run`, real sshd, real SFTP, podman.

The headline test is the example pipeline with the datastore on an SFTP host
and the worker reaching the boss through an SSH tunnel whose key is
restricted by `boss admin authorize-worker-key` to that one forward.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.podman_image import ensure_image, podman_missing_reason
from tests.ports import free_port
from tests.sshd import Sshd, sshd  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT = 120  # a bound on a hung command, never an assertion about speed




class Site:
    """One directory with settings for the boss and for a worker."""

    def __init__(self, root: Path, datastore: str) -> None:
        self.root = root
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
        self.env["NO_COLOR"] = "1"
        (root / "ecloud.toml").write_text(
            f'[boss]\nlisten = "127.0.0.1:{self.port}"\nlease_seconds = 20\nreap_seconds = 1\n'
            f'[datastore]\ndefault = "{datastore}"\n[datastore.buckets]\n'
            f'data = "{datastore}"\n'
            f'[worker]\nworkdir = "{root}/work"\ncache_dir = "{root}/cache"\n'
            'heartbeat_seconds = 1\npoll_seconds = 0.2\n'
            '[autoscale]\nenabled = false\n')
        self.serving: subprocess.Popen[bytes] | None = None

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(BIN / tool), *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=TIMEOUT)
        if check and done.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} -> {done.returncode}\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def serve(self) -> None:
        log = (self.root / "serve.log").open("ab")
        self.serving = subprocess.Popen([str(BIN / "boss"), "serve"], cwd=self.root,
                                        env=self.env, stdout=log, stderr=log)
        log.close()
        for _ in range(200):  # bounded: 200 x 50 ms
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.serving.poll() is not None:
                    break
                time.sleep(0.05)
        raise AssertionError(f"boss serve did not start:\n{self.log()}")

    def stop(self) -> None:
        if self.serving is not None and self.serving.poll() is None:
            self.serving.send_signal(signal.SIGTERM)
            try:
                self.serving.wait(30)
            except subprocess.TimeoutExpired:
                self.serving.kill()
                self.serving.wait(10)

    def log(self) -> str:
        return (self.root / "serve.log").read_text(errors="replace")

    def tasks(self) -> dict[str, str]:
        rows: list[dict[str, Any]] = json.loads(self.run("boss", "tasks", "--json").stdout)
        return {r["name"]: r["state"] for r in rows}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "site"
    root.mkdir()
    s = Site(root, f"file://{tmp_path}/store")
    yield s
    s.stop()


def put_example_input(store: Path) -> bytes:
    text = (REPO / "examples" / "data" / "md5" / "input" / "text.txt").read_bytes()
    (store / "md5" / "input").mkdir(parents=True, exist_ok=True)
    (store / "md5" / "input" / "text.txt").write_bytes(text)
    return text


def check_example_outputs(store: Path, text: bytes) -> None:
    whole = (store / "md5" / "result" / "text.md5").read_text().split()[0]
    assert whole == hashlib.md5(text).hexdigest()
    parts = sorted((store / "md5" / "parts").iterdir())
    assert b"".join(p.read_bytes() for p in parts) == text
    sums = (store / "md5" / "result" / "md5sums.txt").read_text().splitlines()
    assert [line.split()[0] for line in sums] == [
        hashlib.md5(p.read_bytes()).hexdigest() for p in parts]
    assert "join back" in (store / "md5" / "result" / "check.txt").read_text()


@pytest.mark.sshd
def test_example_over_ssh_tunnel_with_sftp_datastore(tmp_path: Path, sshd: Sshd) -> None:  # noqa: F811
    store = tmp_path / "sftp-store"
    store.mkdir()
    text = put_example_input(store)
    # the datastore is the sshd host, reached over SFTP with the unrestricted key
    sftp_url = (f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{store}"
                f"?key_filename={sshd.client_key_path}&known_hosts={sshd.known_hosts_path}")
    root = tmp_path / "site"
    root.mkdir()
    site = Site(root, sftp_url)
    try:
        site.run("boss", "init")
        site.run("boss", "push-tasks", str(REPO / "examples" / "md5.json"))
        site.run("boss", "admin", "add-worker", "--token-file", "tok", "--slots", "3")
        # the worker's own key, restricted to the tunnel, in the sshd's authorized_keys
        line = site.run("boss", "admin", "authorize-worker-key", "--generate", "keys",
                        "--install", "--authorized-keys", str(sshd.authorized_keys_path))
        assert f'permitopen="127.0.0.1:{site.port}"' in line.stdout
        assert 'command="/bin/false"' in line.stdout
        site.serve()
        boss_url = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}?port={site.port}"
        ran = site.run("worker", "run", "--boss", boss_url, "--token-file", "tok", "--burst",
                       "--key", "keys/ecloud_worker_ed25519",
                       "--known-hosts", str(sshd.known_hosts_path), "--slots", "3")
        summary = json.loads(ran.stdout)
        assert summary == {"ran": 8, "succeeded": 8, "failed": 0, "refused": 0,
                           "reason": "the queue is drained"}, ran.stderr
        assert set(site.tasks().values()) == {"succeeded"}
        check_example_outputs(store, text)
        # no temporary upload names are left (every command here redirects its
        # output, so there are no logs to copy: empty logs are not copied)
        assert not (store / "ecloud-logs").exists()
        assert not [p for p in store.rglob("*") if ".ecloud-tmp" in p.name or
                    p.name.endswith(".part")]
        # an unknown host key refuses to connect: nothing is trusted on first use
        (root / "empty_known_hosts").write_text("")
        refused = site.run("worker", "check", "--boss", boss_url, "--token-file", "tok",
                           "--key", "keys/ecloud_worker_ed25519",
                           "--known-hosts", "empty_known_hosts", check=False)
        assert refused.returncode == 2, refused.stderr
        assert "not in the known_hosts" in refused.stderr
    finally:
        site.stop()


def test_local_worker_over_tcp_failures_and_retry(site: Site, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    put_example_input(store)
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("\n".join(json.dumps(d) for d in [
        {"name": "flaky", "commands": [{"command": ["sh", "-c", "exit 3"]}], "retries": 1},
        {"name": "after-flaky", "after": ["flaky"], "commands": [{"command": ["true"]}]},
        {"name": "slow", "commands": [{"command": ["sleep", "30"]}], "timeout": 0.5},
        {"name": "fine", "inputs": {"md5/input/text.txt": "in.txt"},
         "outputs": {"out/wc.txt": "wc.txt"},
         "commands": [{"command": ["wc", "-c", "in.txt"], "stdout": "wc.txt"}]},
    ]) + "\n")
    site.run("boss", "init")
    site.run("boss", "push-tasks", str(tasks))
    site.run("boss", "admin", "add-worker", "--token-file", "tok", "--slots", "2")
    site.serve()
    ran = site.run("worker", "run", "--boss", f"tcp://127.0.0.1:{site.port}",
                   "--token-file", "tok", "--burst")
    summary = json.loads(ran.stdout)
    assert (summary["ran"], summary["succeeded"], summary["failed"]) == (4, 1, 3), ran.stderr
    assert site.tasks() == {"flaky": "failed", "after-flaky": "upstream_failed",
                            "slow": "failed", "fine": "succeeded"}
    shown = json.loads(site.run("boss", "show", "slow", "--json").stdout)
    assert shown["attempts"][0]["state"] == "timeout"
    flaky = json.loads(site.run("boss", "show", "flaky", "--json").stdout)
    assert [a["exit_status"] for a in flaky["attempts"]] == [3, 3]
    assert (store / "out" / "wc.txt").read_text().split()[0] == str(
        (store / "md5" / "input" / "text.txt").stat().st_size)
    # a worker with a wrong token is refused with a clear message, exit 2
    (site.root / "bad").write_text("nope\n")
    bad = site.run("worker", "run", "--boss", f"tcp://127.0.0.1:{site.port}",
                   "--token-file", "bad", check=False)
    assert bad.returncode == 2 and "unknown worker token" in bad.stderr


@pytest.mark.podman
def test_sisyphus_document_in_a_container(site: Site, tmp_path: Path) -> None:
    why = podman_missing_reason()
    if why:
        print(f"\nSKIPPING podman test: {why}")
        pytest.skip(why)
    image = ensure_image()
    store = tmp_path / "store"
    (store / "md5").mkdir(parents=True)
    (store / "md5" / "clear").write_bytes(b"the quick brown fox\n")
    # the sisyphus seed's document, with its image replaced by the local one
    doc = {"image": image, "inputs": {"data:md5/clear": "/mnt/clear"},
           "outputs": {"data:md5/crypt": "/mnt/crypt"},
           "commands": [{"command": ["md5sum", "/mnt/clear"], "stdout": "/mnt/crypt"}]}
    (tmp_path / "d.json").write_text(json.dumps([doc]))
    site.run("boss", "init")
    site.run("boss", "push-tasks", str(tmp_path / "d.json"))
    site.run("boss", "admin", "add-worker", "--token-file", "tok")
    site.serve()
    ran = site.run("worker", "run", "--boss", f"tcp://127.0.0.1:{site.port}",
                   "--token-file", "tok", "--burst")
    assert json.loads(ran.stdout)["succeeded"] == 1, ran.stderr
    crypt = (store / "md5" / "crypt").read_text().split()
    assert crypt == [hashlib.md5(b"the quick brown fox\n").hexdigest(), "/mnt/clear"]


def test_boss_restart_mid_task(site: Site, tmp_path: Path) -> None:
    """The boss goes away while a task runs; the worker reconnects and reports it."""
    (tmp_path / "store").mkdir()
    (tmp_path / "t.json").write_text(json.dumps([
        {"name": "long", "commands": [{"command": ["sleep", "3"]}]}]))
    site.run("boss", "init")
    site.run("boss", "push-tasks", str(tmp_path / "t.json"))
    site.run("boss", "admin", "add-worker", "--token-file", "tok")
    site.serve()
    worker = subprocess.Popen(
        [str(BIN / "worker"), "run", "--boss", f"tcp://127.0.0.1:{site.port}",
         "--token-file", "tok", "--burst"], cwd=site.root, env=site.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):  # bounded: until the task runs (at most 20 s)
            if site.tasks()["long"] == "running":
                break
            time.sleep(0.1)
        site.stop()
        time.sleep(1)
        site.serve()
        out, err = worker.communicate(timeout=TIMEOUT)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate(timeout=10)
    assert worker.returncode == 0, err
    assert json.loads(out)["succeeded"] == 1, err
    assert site.tasks() == {"long": "succeeded"}
    assert "lost the boss" in err or "cannot reach the boss" in err


def test_workers_need_no_boss_package() -> None:
    """A worker VM runs `worker` without SQLAlchemy or the Google client installed."""
    code = ("import sys, worker.cli, worker.daemon, worker.attempt; "
            "bad = [m for m in ('boss', 'sqlalchemy', 'googleapiclient', 'alembic') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert shutil.which("true")
