"""`boss why`: each waiting reason, as a table of situations (boss/why.py is pure)."""

from __future__ import annotations

from typing import Any

import pytest

from boss.why import Situation, explain

NOW = 1_000_000.0


def task(state: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "t", "state": state, "parents": [], "attempts": [],
                            "tries": 0, "max_tries": 1, "lost": 0, "reason": None}
    return {**base, **kw}


def attempt(number: int, state: str, reason: str | None = None, exit_status: int | None = None,
            worker: int = 7) -> dict[str, Any]:
    return {"number": number, "state": state, "reason": reason, "exit_status": exit_status,
            "worker_id": worker, "started_at": NOW - 30, "lease_expires_at": NOW + 30}


CASES = [
    ("waiting on two parents",
     task("waiting", parents=[{"name": "a", "state": "running"},
                              {"name": "b", "state": "ready"},
                              {"name": "c", "state": "succeeded"}]),
     Situation(now=NOW), "waiting for 2 of 3 parent(s): a (running), b (ready)"),
    ("ready, no worker, autoscale on",
     task("ready"), Situation(workers={}, autoscale=True, max_workers=4, now=NOW),
     "no worker is running: `boss serve` starts them (autoscale, at most 4)"),
    ("ready, no worker, autoscale off",
     task("ready"), Situation(workers={}, autoscale=False, now=NOW),
     "`boss instantiate-worker N`"),
    ("ready, workers booting",
     task("ready"), Situation(workers={"provisioning": 3}, now=NOW),
     "no worker is running yet: 3 starting"),
    ("ready, every slot busy, others first",
     task("ready"), Situation(queue_ahead=12, workers={"busy": 2}, free_slots=0, now=NOW),
     "12 ready task(s) go first"),
    ("ready, every slot busy",
     task("ready"), Situation(workers={"busy": 2}, free_slots=0, now=NOW),
     "every slot of the 2 worker(s) is busy"),
    ("ready, quota errors",
     task("ready"), Situation(workers={"failed": 3},
                              worker_errors=[{"error": "QUOTA_EXCEEDED CPUS in us-east1",
                                              "count": 3}], now=NOW),
     "3 x QUOTA_EXCEEDED CPUS in us-east1"),
    ("running",
     task("running", attempts=[attempt(1, "running")]), Situation(now=NOW),
     "running: attempt 1 on worker 7 for 30 s (lease expires in 30 s)"),
    ("failed",
     task("failed", reason="exit status 3", tries=2, max_tries=2,
          attempts=[attempt(1, "failed", exit_status=3), attempt(2, "failed", exit_status=3)]),
     Situation(now=NOW), "failed: exit status 3 (2 of 2 tries spent)"),
    ("upstream failed",
     task("upstream_failed"),
     Situation(failed_ancestors=[{"name": "root", "state": "failed", "reason": "exit 1"}],
               now=NOW),
     "upstream_failed because of root (failed: exit 1)"),
    ("re-ran after a lost worker",
     task("succeeded", lost=1, tries=1,
          attempts=[attempt(1, "lost", reason="lease expired", worker=3),
                    attempt(2, "succeeded", worker=4)]),
     Situation(now=NOW), "attempt 1 on worker 3: lost (lease expired)"),
]


@pytest.mark.parametrize(("what", "t", "situation", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_explain(what: str, t: dict[str, Any], situation: Situation, expected: str) -> None:
    text = "\n".join(explain(t, situation))
    assert expected in text, text


def test_a_task_that_ran_once_has_no_history() -> None:
    lines = explain(task("succeeded", tries=1, attempts=[attempt(1, "succeeded")]),
                    Situation(now=NOW))
    assert lines == ["succeeded"]
