"""Every service transition, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from boss.errors import InvalidState, NotFound
from boss.service import Boss
from protocol.messages import Result


def push(boss: Boss, tmp_path: Path, docs: list[dict[str, Any]], name: str = "t.jsonl") -> None:
    f = tmp_path / name
    f.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    boss.push(f)


def task(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "commands": [{"command": ["true"]}], **kw}


def states(boss: Boss) -> dict[str, str]:
    return {r["name"]: r["state"] for r in boss.tasks(limit=10_000)}


def ok(attempt_id: int) -> Result:
    return Result(attempt_id, "succeeded", exit_status=0, metrics={"wall": 0.1})


def bad(attempt_id: int) -> Result:
    return Result(attempt_id, "failed", exit_status=3, reason="exit status 3",
                  stderr_tail="boom")


def worker(boss: Boss, slots: int = 4) -> int:
    return boss.add_worker(slots=slots)[0]


def test_claim_order_priority_then_age(boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("low"), task("high", priority=5), task("low2"),
                          task("mid", priority=1)])
    w = worker(boss)
    got = [a.name for a in boss.claim(w, 3)]
    assert got == ["high", "mid", "low"]
    assert [a.name for a in boss.claim(w, 5)] == ["low2"]
    assert boss.claim(w, 5) == []
    assert states(boss) == dict.fromkeys(["low", "high", "low2", "mid"], "running")


def test_dependencies_release_on_success(boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [
        task("a", outputs={"data:x/": "out/"}),
        task("b", inputs={"data:x/1": "in"}),       # implied by data
        task("c", after=["a", "b"]),
    ])
    assert states(boss) == {"a": "ready", "b": "waiting", "c": "waiting"}
    w = worker(boss)
    (a,) = boss.claim(w, 10)
    assert a.name == "a" and a.number == 1
    assert boss.complete(w, ok(a.attempt_id)) is not None
    assert states(boss)["b"] == "ready" and states(boss)["c"] == "waiting"
    (b,) = boss.claim(w, 10)
    boss.complete(w, ok(b.attempt_id))
    assert states(boss)["c"] == "ready"


def test_failure_retries_then_fails_and_cascades(boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("a", retries=1), task("b", after=["a"]),
                          task("c", after=["b"]), task("free")])
    w = worker(boss)
    first = next(x for x in boss.claim(w, 10) if x.name == "a")
    ended = boss.complete(w, bad(first.attempt_id))
    assert ended is not None and ended.task_state == "ready"
    (second,) = [x for x in boss.claim(w, 10) if x.name == "a"]
    assert second.number == 2
    ended = boss.complete(w, bad(second.attempt_id))
    assert ended is not None and ended.task_state == "failed"
    s = states(boss)
    assert s["a"] == "failed" and s["b"] == "upstream_failed" and s["c"] == "upstream_failed"
    shown = boss.show("a")
    assert [x["state"] for x in shown["attempts"]] == ["failed", "failed"]
    assert shown["attempts"][-1]["stderr_tail"] == "boom"
    # retry brings the task back and its descendants back to waiting
    assert boss.retry(["a"]) == 1
    s = states(boss)
    assert s["a"] == "ready" and s["b"] == "waiting" and s["c"] == "waiting"


def test_retry_failed_and_refusals(boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("a"), task("b")])
    w = worker(boss)
    for x in boss.claim(w, 10):
        boss.complete(w, bad(x.attempt_id))
    assert boss.retry(None) == 2
    assert set(states(boss).values()) == {"ready"}
    with pytest.raises(InvalidState):
        boss.retry(["a"])
    with pytest.raises(NotFound):
        boss.retry(["nope"])


def test_fencing_refuses_stale_and_foreign_reports(boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("a")])
    w1, w2 = worker(boss), worker(boss)
    (a,) = boss.claim(w1, 1)
    # another worker's token cannot complete this attempt
    assert boss.complete(w2, ok(a.attempt_id)) is None
    # the lease expires: the attempt is lost and the task requeued
    with boss.store.tx() as conn:
        from boss.store import tasks as t

        lost = t.expire(conn, time.time() + 3600)
    assert [e.attempt_id for e in lost] == [a.attempt_id]
    assert states(boss)["a"] == "ready"
    assert boss.show("a")["lost"] == 1 and boss.show("a")["tries"] == 0
    (again,) = boss.claim(w2, 1)
    assert again.number == 2
    # the worker that came back from the dead is refused
    assert boss.complete(w1, ok(a.attempt_id)) is None
    assert boss.complete(w2, ok(again.attempt_id)) is not None
    assert boss.complete(w2, ok(again.attempt_id)) is None  # twice: refused
    assert states(boss)["a"] == "succeeded"


def test_heartbeat_renews_and_reports_cancel(boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("a"), task("b"), task("child", after=["b"])])
    w = worker(boss)
    got = {x.name: x for x in boss.claim(w, 2)}
    before = boss.show("a")["attempts"][0]["lease_expires_at"]
    time.sleep(0.01)
    assert boss.heartbeat(w, [got["a"].attempt_id, got["b"].attempt_id]) == []
    assert boss.show("a")["attempts"][0]["lease_expires_at"] > before
    assert boss.cancel("b") == "running"
    assert boss.heartbeat(w, [got["a"].attempt_id, got["b"].attempt_id]) == [
        got["b"].attempt_id]
    assert states(boss)["child"] == "upstream_failed"
    assert boss.complete(w, ok(got["b"].attempt_id)) is None
    with pytest.raises(InvalidState):
        boss.cancel("b")


def test_goodbye_requeues_running(boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("a")])
    w = worker(boss)
    boss.claim(w, 1)
    boss.goodbye(w, "shutting down")
    assert states(boss)["a"] == "ready"
    assert [x["state"] for x in boss.workers(include_terminated=True)] == ["terminated"]


def test_push_against_database_tasks(boss: Boss, tmp_path: Path) -> None:
    push(boss, tmp_path, [task("a", outputs={"data:res": "r"})], "one.jsonl")
    w = worker(boss)
    (a,) = boss.claim(w, 1)
    boss.complete(w, ok(a.attempt_id))
    # 'a' exists: refused without --skip-existing, nothing pushed
    f = tmp_path / "two.jsonl"
    f.write_text("\n".join(json.dumps(d) for d in [
        task("a"), task("b", after=["a"]), task("c", inputs={"data:res": "r"})]))
    from boss.errors import PushError

    with pytest.raises(PushError) as exc:
        boss.push(f)
    assert "'a'" in str(exc.value) and "already exists" in str(exc.value)
    assert set(states(boss)) == {"a"}
    r = boss.push(f, skip_existing=True)
    assert (r.pushed, r.skipped) == (2, 1)
    s = states(boss)
    assert s["b"] == "ready" and s["c"] == "ready"  # their parent already succeeded
    assert [p["name"] for p in boss.show("c")["parents"]] == ["a"]


def test_concurrent_claims_each_task_once(boss: Boss, tmp_path: Path) -> None:
    n = 10_000
    f = tmp_path / "many.jsonl"
    f.write_text("".join(json.dumps(task(f"t{i}")) + "\n" for i in range(n)))
    boss.push(f)
    wids = [worker(boss) for _ in range(8)]
    claimed: list[list[int]] = [[] for _ in wids]
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            for _ in range(n):  # bounded: at most n rounds
                got = boss.claim(wids[k], 7)
                if not got:
                    return
                claimed[k].extend(a.task_id for a in got)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors
    every = [x for c in claimed for x in c]
    assert len(every) == n and len(set(every)) == n
    assert sum(1 for c in claimed if c) >= 2  # the work really was shared
    assert boss.status()["tasks"]["running"] == n
