"""Events of a real run (local workers, file datastore): every kind, counts matching rows.

The run has staging (a data dependency through the datastore), a failure that
is retried and succeeds, a failure that fails a child (upstream), a worker
killed mid-task (lost, its task rerun elsewhere) and a `boss retry`. Then each
event kind must be there, and the counts must match the attempts table: one
``job.started`` per attempt, one ``job.finished`` per attempt that ended with
a result, one ``job.lost`` per lost attempt, and no stage event of an attempt
that does not exist.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

from boss.providers import provider_for
from boss.scaler import Scaler
from boss.service import Boss
from tests.bossd import serving
from tests.conftest import make_settings
from tests.integration.test_transitions import push, states, task
from tests.waiting import quick_pool, wait_for

KINDS = {
    "jobs.pushed", "job.ready", "job.started", "job.finished", "job.lost", "job.retried",
    "job.upstream-failed", "job.stage-in.started", "job.stage-in.finished",
    "job.execution.started", "job.execution.finished", "job.stage-out.started",
    "job.stage-out.finished", "worker.created", "worker.joined", "worker.lost", "worker.left",
}



def test_every_event_kind_and_counts_match(tmp_path: Path) -> None:
    s = make_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db")
    quick_pool(s, slots=2, max_workers=2)
    (tmp_path / "data").mkdir()
    boss = Boss(s)
    boss.init()
    gate, marker, pidfile = tmp_path / "gate", tmp_path / "marker", tmp_path / "pid"
    sh = lambda line: {"commands": [{"command": [line], "shell": True}]}  # noqa: E731
    push(boss, tmp_path, [
        task("gen", **sh("echo hello > out.txt"), outputs={"data:gen/out.txt": "out.txt"}),
        task("use", **sh("cat in.txt > copy.txt"), inputs={"data:gen/out.txt": "in.txt"},
             outputs={"data:use/copy.txt": "copy.txt"}),
        task("flaky", **sh(f"[ -e {marker} ] || {{ touch {marker}; exit 3; }}"), retries=1),
        task("bad", **sh("exit 4")),
        task("child", after=["bad"]),
        task("hold", **sh(f"echo $PPID > {pidfile}; while [ ! -e {gate} ]; do sleep 0.05; "
                          "done")),
    ])
    try:
        with serving(boss, 0, Scaler(boss, provider_for(s, "local"))):
            wait_for(lambda: states(boss)["hold"] == "running" and pidfile.exists()
                     and pidfile.read_text().strip(), "hold to run")
            victim = next(w for w in boss.workers() if w["state"] in ("idle", "busy")
                          and boss.show("hold")["attempts"][-1]["worker_id"] == w["id"])
            os.killpg(int(victim["reference"]), signal.SIGKILL)
            wait_for(lambda: boss.show("hold")["lost"] == 1, "hold's attempt to be lost")
            gate.write_text("")
            wait_for(lambda: states(boss)["hold"] == "succeeded"
                     and states(boss)["use"] == "succeeded"
                     and states(boss)["flaky"] == "succeeded", "the run to finish")
            assert states(boss)["child"] == "upstream_failed"
            assert boss.retry(["bad"]) == 1
            wait_for(lambda: states(boss)["bad"] == "failed", "bad to fail again")
            wait_for(lambda: not [w for w in boss.workers() if w["state"] in
                                  ("provisioning", "idle", "busy", "draining")],
                     "the workers to leave")
        events = boss.events(limit=100_000)
        kinds = Counter(e["kind"] for e in events)
        assert KINDS <= set(kinds), f"missing: {KINDS - set(kinds)}"
        attempts = [a for name in states(boss) for a in boss.show(name)["attempts"]]
        by_state = Counter(a["state"] for a in attempts)
        assert kinds["job.started"] == len(attempts)
        assert kinds["job.finished"] == by_state["succeeded"] + by_state["failed"]
        # the killed worker may have held a second attempt (its other slot, or one
        # claimed ahead): each is lost, each with its event
        assert kinds["job.lost"] == by_state["lost"] >= 1
        ids = {a["id"] for a in attempts}
        for e in events:
            if e["kind"].startswith("job.") and e["attempt_id"] is not None:
                assert e["attempt_id"] in ids, e
            if e["task_id"] is not None and e["kind"].startswith("job."):
                assert e["key"].startswith(f"job.{e['task_id']}."), e
        # every attempt that got a result reported its execution
        assert kinds["job.execution.finished"] >= kinds["job.finished"]
        staged = [e for e in events if e["kind"] == "job.stage-out.finished"
                  and e["task"] == "gen"]
        assert staged and staged[0]["data"]["bytes"] == len("hello\n")
        assert staged[0]["data"]["time"] >= 0  # hyperflow's field name
        # the child's release names its parent; the cascade names the failed task
        [released] = [e for e in events if e["kind"] == "job.ready" and e["task"] == "use"]
        assert released["data"]["released_by"] == boss.show("gen")["id"]
        assert any(e["kind"] == "job.upstream-failed" and e["task"] == "child" for e in events)
        # ordered: a task's finish comes before the readiness it causes
        finished_gen = next(e["id"] for e in events
                            if e["kind"] == "job.finished" and e["task"] == "gen")
        assert finished_gen < released["id"]
        # --task and --kind filters
        only = boss.events(task="flaky", kinds=["job.finished"])
        # one per attempt that ended, in order: its failure put it back, its success
        # ended it (the killed worker may have held its first attempt: lost, no event)
        ended = [a for a in boss.show("flaky")["attempts"] if a["state"] != "lost"]
        assert [e["attempt_id"] for e in only] == [a["id"] for a in ended]
        assert [e["data"]["task_state"] for e in only] == [
            "ready" if a["state"] == "failed" else "succeeded" for a in ended]
        assert [a["state"] for a in ended][-1] == "succeeded"
        # why: the lost attempt is told apart in the history
        why = "\n".join(boss.why("hold")["because"])
        assert "lost" in why and "do not spend" in why, why
        assert "upstream_failed because of bad" in boss.why("child")["because"][0]
        # pruning
        total = len(boss.events(limit=100_000))
        assert boss.prune_events(time.time() + 1) == total
        assert boss.events() == []
    finally:
        boss.close()
