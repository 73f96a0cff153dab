"""`boss run`: the embedded default end to end, as README command 1 uses it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT = 300  # a bound on a hung command, never an assertion about speed


def boss(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
    env["NO_COLOR"] = "1"
    return subprocess.run([str(BIN / "boss"), *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def worker_processes(root: Path) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker.cli" in argv and any(str(root).encode() in a for a in argv):
            found.append(int(proc.name))
    return found


def test_boss_run_example_pipeline(tmp_path: Path) -> None:
    root = tmp_path / "site"
    (root / ".ecloud" / "data").mkdir(parents=True)
    text = (REPO / "examples" / "data" / "md5" / "input" / "text.txt").read_bytes()
    (root / ".ecloud" / "data" / "md5" / "input").mkdir(parents=True)
    (root / ".ecloud" / "data" / "md5" / "input" / "text.txt").write_bytes(text)
    (root / "ecloud.toml").write_text(
        '[datastore]\ndefault = "file://.ecloud/data"\n'
        '[datastore.buckets]\ndata = "file://.ecloud/data"\n')
    done = boss(root, "run", str(REPO / "examples" / "md5.json"), "--workers", "2")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["tasks"] == {"succeeded": 8}
    assert summary["logs"].endswith("/ecloud-logs/")
    whole = (root / ".ecloud" / "data" / "md5" / "result" / "text.md5").read_text().split()[0]
    assert whole == hashlib.md5(text).hexdigest()
    assert worker_processes(root) == []  # no worker left behind
    workers = json.loads(boss(root, "admin", "show-workers", "--all", "--json").stdout)
    assert workers and {w["state"] for w in workers} == {"terminated"}
    assert {w["provider"] for w in workers} == {"local"}
    # a pipeline with a failing task: exit status 1, the failure named on stderr
    (tmp_path / "bad.json").write_text(json.dumps([
        {"name": "boom", "commands": [{"command": ["sh", "-c", "echo oops >&2; exit 4"]}]},
        {"name": "after-boom", "after": ["boom"], "commands": [{"command": ["true"]}]}]))
    bad = boss(root, "run", str(tmp_path / "bad.json"), "--workers", "1")
    assert bad.returncode == 1, bad.stderr
    assert "boom" in bad.stderr and "exit status 4" in bad.stderr
    assert json.loads(bad.stdout)["tasks"] == {"succeeded": 8, "failed": 1,
                                               "upstream_failed": 1}
    assert worker_processes(root) == []

    # after the run: its events, a task's logs, why things are as they are, one dashboard
    events = [json.loads(line) for line in boss(root, "events", "--json").stdout.splitlines()]
    keys = {e["key"] for e in events}
    split_id = next(e["task_id"] for e in events if e.get("task") == "split")
    assert {f"job.{split_id}.stage-in.finished", f"job.{split_id}.execution.finished",
            f"job.{split_id}.stage-out.finished"} <= keys
    lines = boss(root, "events", "--task", "boom").stdout.splitlines()
    assert lines and all("task=boom" in line for line in lines)
    recent = boss(root, "events", "--since", "1h", "--kind", "job.finished")
    assert recent.returncode == 0 and len(recent.stdout.splitlines()) == 9  # after-boom never ran
    assert boss(root, "events", "--since", "soon").returncode == 2
    logs = boss(root, "logs", "boom", "--stderr")
    assert logs.returncode == 0 and logs.stdout == "oops\n", logs
    assert boss(root, "logs", "boom", "--attempt", "2").returncode == 2
    why = boss(root, "why", "after-boom")
    assert why.returncode == 0 and "upstream_failed because of boom" in why.stdout
    frame = boss(root, "watch", "--once")
    assert frame.returncode == 0 and "10/10 done" in frame.stdout
    total = len(boss(root, "events", "--limit", "100000").stdout.splitlines())
    pruned = boss(root, "admin", "prune-events", "0")
    assert pruned.returncode == 0 and int(pruned.stdout) == total > 0
    assert boss(root, "events").stdout == ""
