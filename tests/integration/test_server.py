"""The RPC server over real TCP: the protocol, authentication, refusals, group commit."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from boss.service import Boss
from protocol import messages
from tests.bossd import serving
from tests.integration.test_transitions import push, states, task


class Line:
    """A raw protocol connection: send lines, read lines."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.ids = iter(range(1, 1_000_000))

    def raw(self, data: bytes) -> dict[str, Any]:
        self.sock.sendall(data)
        line = self.file.readline()
        assert line, "the server closed the connection"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.raw(messages.request(next(self.ids), name, args))

    def closed(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def served(boss: Boss) -> Iterator[tuple[Boss, int]]:
    with serving(boss) as server:
        yield boss, server.port


def hello(port: int, token: str, slots: int = 2) -> Line:
    c = Line(port)
    r = c.call("hello", {"token": token, "slots": slots, "host": "test", "pid": 1})
    assert r["ok"], r
    return c


def test_malformed_and_unknown_messages_get_errors_not_crashes(
        served: tuple[Boss, int], tmp_path: Path) -> None:
    boss, port = served
    push(boss, tmp_path, [task("a")])
    c = Line(port)
    assert c.raw(b"not json\n")["error"]["code"] == "malformed"
    assert c.raw(b"[1,2]\n")["error"]["code"] == "malformed"
    assert c.raw(b'{"v": 1, "id": "x", "call": "pop"}\n')["error"]["code"] == "malformed"
    r = c.raw(b'{"v": 99, "id": 7, "call": "pop", "args": {}}\n')
    assert r["id"] == 7 and r["error"]["code"] == "version"
    assert c.call("frobnicate")["error"]["code"] == "unknown_call"
    assert c.raw(b"\xff\xfe\n")["error"]["code"] == "malformed"
    # no hello yet: refused, and the connection is closed
    r = c.call("pop", {"n": 1})
    assert r["error"]["code"] == "unauthorized"
    assert c.closed()
    c.close()
    # a wrong token: refused and closed
    c = Line(port)
    assert c.call("hello", {"token": "wrong"})["error"]["code"] == "unauthorized"
    assert c.closed()
    c.close()
    # the task was never touched
    assert states(boss) == {"a": "ready"}


def test_bad_arguments_change_nothing(served: tuple[Boss, int], tmp_path: Path) -> None:
    boss, port = served
    push(boss, tmp_path, [task("a")])
    _, _, token = boss.add_worker(slots=2)
    c = hello(port, token)
    for args in ({"n": "3"}, {"n": -1}, {"n": True}, {}):
        assert c.call("pop", args)["error"]["code"] == "malformed"
    assert c.call("heartbeat", {"attempts": ["x"]})["error"]["code"] == "malformed"
    assert c.call("complete", {"attempt_id": 1, "outcome": "great"})["error"]["code"] \
        == "malformed"
    assert c.call("event", {"events": [{"attempt_id": 1, "kind": "DROP TABLE"}]}
                  )["error"]["code"] == "malformed"
    assert c.call("event", {"events": [1]})["error"]["code"] == "malformed"
    assert states(boss) == {"a": "ready"}
    # the connection still works after all those errors
    r = c.call("pop", {"n": 1})
    assert r["ok"] and r["result"]["tasks"][0]["name"] == "a"
    c.close()


def test_a_worker_cycle_over_the_wire(served: tuple[Boss, int], tmp_path: Path) -> None:
    boss, port = served
    push(boss, tmp_path, [task("a"), task("b", after=["a"])])
    wid, _, token = boss.add_worker(slots=2)
    c = hello(port, token)
    (a,) = c.call("pop", {"n": 2})["result"]["tasks"]
    assert a["name"] == "a" and a["number"] == 1
    r = c.call("pop", {"n": 2})["result"]
    assert r["none"] and r["retry_after"] > 0
    ev = c.call("event", {"events": [
        {"attempt_id": a["attempt_id"], "kind": "stage-in.finished",
         "data": {"bytes": 10, "seconds": 0.1}, "ts": 0}]})
    assert ev["result"] == {"not_current": []}
    # stored under hyperflow's name; a kind the worker never sends is refused
    [stored] = boss.events(kinds=["job.stage-in.finished"])
    assert stored["key"] == f"job.{stored['task_id']}.stage-in.finished"
    assert stored["data"] == {"bytes": 10, "seconds": 0.1}
    bad = c.call("event", {"events": [{"attempt_id": a["attempt_id"], "kind": "job.finished"}]})
    assert bad["error"]["code"] == "malformed" and "stage-in.started" in bad["error"]["message"]
    assert c.call("heartbeat", {"attempts": [a["attempt_id"], 999]})["result"] == {
        "cancel": [999]}
    done = c.call("complete", {"attempt_id": a["attempt_id"], "outcome": "succeeded",
                               "exit_status": 0, "metrics": {"wall": 0.5}})
    assert done["result"]["accepted"]
    # the same result again is not current any more (the attempt id fences)
    again = c.call("complete", {"attempt_id": a["attempt_id"], "outcome": "failed"})
    assert again["error"]["code"] == "not_current"
    (b,) = c.call("pop", {"n": 2})["result"]["tasks"]
    assert b["name"] == "b"
    c.call("complete", {"attempt_id": b["attempt_id"], "outcome": "succeeded"})
    assert c.call("pop", {"n": 2})["result"] == {"drain": True}
    assert c.call("goodbye", {"reason": "done"})["ok"]
    assert c.closed()
    c.close()
    assert states(boss) == {"a": "succeeded", "b": "succeeded"}
    shown = boss.show("a")
    assert shown["attempts"][0]["state"] == "succeeded"
    assert [w["state"] for w in boss.workers(include_terminated=True)
            if w["id"] == wid] == ["terminated"]


def test_another_workers_attempt_cannot_be_reported(served: tuple[Boss, int],
                                                    tmp_path: Path) -> None:
    boss, port = served
    push(boss, tmp_path, [task("a")])
    _, _, t1 = boss.add_worker()
    _, _, t2 = boss.add_worker()
    c1, c2 = hello(port, t1), hello(port, t2)
    (a,) = c1.call("pop", {"n": 1})["result"]["tasks"]
    r = c2.call("complete", {"attempt_id": a["attempt_id"], "outcome": "succeeded"})
    assert r["error"]["code"] == "not_current"
    ev = c2.call("event", {"events": [{"attempt_id": a["attempt_id"],
                                        "kind": "execution.started"}]})
    assert ev["result"]["not_current"] == [a["attempt_id"]]
    assert states(boss) == {"a": "running"}
    c1.close()
    c2.close()


def test_goodbye_requeues_and_a_disconnect_does_not(served: tuple[Boss, int],
                                                    tmp_path: Path) -> None:
    boss, port = served
    push(boss, tmp_path, [task("a"), task("b")])
    _, _, token = boss.add_worker(slots=2)
    c = hello(port, token)
    assert len(c.call("pop", {"n": 1})["result"]["tasks"]) == 1
    c.close()  # vanished: the lease, not the disconnect, decides
    assert sorted(states(boss).values()) == ["ready", "running"]
    c = hello(port, token)
    assert len(c.call("pop", {"n": 1})["result"]["tasks"]) == 1
    c.call("goodbye", {"reason": "bye"})
    c.close()
    # goodbye requeues everything the worker held
    assert sorted(states(boss).values()) == ["ready", "ready"]


def test_concurrent_workers_group_commit(boss: Boss, tmp_path: Path) -> None:
    """16 connections pop and complete 800 tasks: each runs once; batches hold many calls."""
    with serving(boss) as server:
        _hammer(boss, server.port, tmp_path)
        # calls that arrived while a transaction ran shared the next one
        assert server.commits.calls > server.commits.batches


def _hammer(boss: Boss, port: int, tmp_path: Path) -> None:
    n_tasks, n_workers = 800, 16
    push(boss, tmp_path, [task(f"t{i}") for i in range(n_tasks)])
    tokens = [boss.add_worker(slots=4)[2] for _ in range(n_workers)]
    seen: list[list[str]] = [[] for _ in range(n_workers)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            c = hello(port, tokens[i], slots=4)
            for _ in range(n_tasks):  # bounded: at most one pop per task
                r = c.call("pop", {"n": 4})["result"]
                if r.get("drain"):
                    break
                for t in r.get("tasks", []):
                    seen[i].append(t["name"])
                    done = c.call("complete", {"attempt_id": t["attempt_id"],
                                               "outcome": "succeeded"})
                    assert done["ok"], done
            c.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    names = [n for s in seen for n in s]
    assert sorted(names) == sorted(f"t{i}" for i in range(n_tasks))
    assert set(states(boss).values()) == {"succeeded"}


def test_a_batched_complete_answers_each_result_and_pops(served: tuple[Boss, int],
                                                         tmp_path: Path) -> None:
    boss, port = served
    push(boss, tmp_path, [task("a"), task("b"), task("c"), task("d", after=["a"]),
                          task("e"), task("f")])
    _, _, t1 = boss.add_worker(slots=4)
    _, _, t2 = boss.add_worker(slots=1)
    c1, c2 = hello(port, t1, slots=4), hello(port, t2, slots=1)
    held = {t["name"]: t for t in c1.call("pop", {"n": 3})["result"]["tasks"]}
    assert sorted(held) == ["a", "b", "c"]
    (other,) = c2.call("pop", {"n": 1})["result"]["tasks"]
    results = [{"attempt_id": held["a"]["attempt_id"], "outcome": "succeeded",
                "exit_status": 0, "metrics": {"wall": 0.1}},
               {"attempt_id": held["b"]["attempt_id"], "outcome": "failed", "exit_status": 3,
                "reason": "exit status 3"},
               # another worker's attempt, and one that never existed: refused in place
               {"attempt_id": other["attempt_id"], "outcome": "succeeded"},
               {"attempt_id": 999_999, "outcome": "succeeded"}]
    r = c1.call("complete", {"results": results, "pop": 2, "events": [
        {"attempt_id": held["c"]["attempt_id"], "kind": "execution.started"},
        {"attempt_id": held["a"]["attempt_id"], "kind": "execution.finished"}]})
    assert r["ok"], r
    answers = r["result"]["results"]
    assert [a["accepted"] for a in answers] == [True, True, False, False]
    assert answers[0]["task_state"] == "succeeded" and answers[1]["task_state"] == "failed"
    assert {a["error"]["code"] for a in answers[2:]} == {"not_current"}
    # the freed slots took d (released by a) and f: the boss hands out documents whole
    popped = {t["name"]: t for t in r["result"]["tasks"]}
    assert sorted(popped) == ["d", "f"]
    assert popped["d"]["document"]["after"] == ["a"]
    assert states(boss) == {"a": "succeeded", "b": "failed", "c": "running", "d": "running",
                            "e": "running", "f": "running"}
    kinds = {(e["task"], e["kind"]) for e in boss.events(kinds=[
        "job.execution.started", "job.execution.finished"])}
    assert kinds == {("c", "job.execution.started"), ("a", "job.execution.finished")}
    # the same result again: refused in place, the call itself still answered
    again = c1.call("complete", {"results": results[:1]})["result"]["results"]
    assert again[0]["accepted"] is False and "tasks" not in again[0]
    c1.close()
    c2.close()


@pytest.mark.parametrize("results", [[], "x", [1], [{"attempt_id": 1}],
                                     [{"attempt_id": 1, "outcome": "succeeded"}] * 2,
                                     [{"attempt_id": i, "outcome": "succeeded"}
                                      for i in range(1, messages.MAX_RESULTS + 2)]])
def test_a_bad_batched_complete_is_refused_whole(served: tuple[Boss, int], tmp_path: Path,
                                                 results: Any) -> None:
    boss, port = served
    push(boss, tmp_path, [task("a")])
    _, _, token = boss.add_worker(slots=2)
    c = hello(port, token)
    (a,) = c.call("pop", {"n": 1})["result"]["tasks"]
    if isinstance(results, list) and results:  # a good result beside: not applied either
        results = [{"attempt_id": a["attempt_id"], "outcome": "succeeded"}, *results]
    r = c.call("complete", {"results": results})
    assert r["error"]["code"] == "malformed", r
    assert states(boss) == {"a": "running"}
    c.close()


def test_lines_are_cut_wherever_the_packets_end(served: tuple[Boss, int],
                                                tmp_path: Path) -> None:
    """A hello and the calls after it in one packet, and a request split across packets:
    each request is answered once, in its turn, as the worker the hello named."""
    boss, port = served
    push(boss, tmp_path, [task("a"), task("b")])
    _, name, token = boss.add_worker(slots=2)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = sock.makefile("rb")
    data = (messages.request(1, "hello", {"token": token, "slots": 2})
            + messages.request(2, "pop", {"n": 1}) + messages.request(3, "pop", {"n": 1}))
    sock.sendall(data)
    replies = [json.loads(f.readline()) for _ in range(3)]
    assert [r["id"] for r in replies[:1]] == [1] and replies[0]["result"]["name"] == name
    assert sorted(r["result"]["tasks"][0]["name"] for r in replies[1:]) == ["a", "b"]
    line = messages.request(4, "heartbeat", {"attempts": []})
    for k in range(len(line)):  # one byte a packet
        sock.sendall(line[k:k + 1])
    assert json.loads(f.readline()) == {"id": 4, "ok": True, "result": {"cancel": []}}
    f.close()
    sock.close()


def test_many_calls_in_flight_on_one_connection_are_all_answered(
        served: tuple[Boss, int], tmp_path: Path) -> None:
    """More requests than the server takes at once (it stops reading meanwhile): every
    one gets its reply, and the connection goes on after."""
    boss, port = served
    push(boss, tmp_path, [task("a")])
    _, _, token = boss.add_worker(slots=2)
    c = hello(port, token)
    n = 500
    c.sock.sendall(b"".join(messages.request(1000 + k, "heartbeat", {"attempts": [k]})
                            for k in range(n)))
    got = [json.loads(c.file.readline()) for _ in range(n)]
    assert sorted(r["id"] for r in got) == list(range(1000, 1000 + n))
    assert all(r["result"] == {"cancel": [r["id"] - 1000]} for r in got)
    assert c.call("pop", {"n": 1})["result"]["tasks"][0]["name"] == "a"
    c.close()
