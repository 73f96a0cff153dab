"""The RPC server fed 10,000 fuzzed messages over real TCP: an error for each, no change.

A real server (``tests.bossd.serving``, in this process) runs on a SQLite
database holding a pushed queue, a registered worker and one running attempt
(its lease long enough not to expire during the run). Hypothesis generates
the messages, every one invalid by construction:

- random bytes as a line, before and after ``hello``;
- valid JSON of the wrong shape: not an object, or a request whose ``v``,
  ``id``, ``call`` or ``args`` is wrong;
- a real call (``hello``, ``pop``, ``heartbeat``, ``event``, ``complete``,
  ``goodbye``) with at least one argument wrong (type, range, a 20-digit
  integer, an unpaired surrogate, 100,000 levels of nesting...), after and before
  ``hello``;
- lines over the 16 MiB limit.

After each message the reply must be an error of the documented shape, with
the request's id when it had a readable one, and a code other than
``internal`` or ``unavailable`` (which would mean the server or its database
failed, not the message); every row of every table must be as it was (compared
whenever SQLite's ``data_version`` shows that something was committed). A
connection the server closes (a call before ``hello``, a line over the limit)
is opened again. At the end a worker cycle still works on the same server.
"""

from __future__ import annotations

import functools
import json
import math
import socket
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boss.service import Boss
from boss.store.events import WORKER_KINDS
from protocol import messages
from protocol.errors import Code
from protocol.settings import Settings, absolutize
from tests.bossd import serving
from tests.integration.test_transitions import push, task

# "internal" would mean the server failed, not the message; "unavailable", its database
CODES = {str(c) for c in Code} - {"internal", "unavailable"}
SENT: Counter[str] = Counter()  # messages sent, by strategy (printed at the end)
BIG = 10**20  # over SQLite's 64-bit integers

# how many examples (each a list of LIST messages) per strategy; 10,000 messages in all
LIST = 10
BUDGET = {"bytes-before-hello": 120, "bytes-after-hello": 150, "shape-before-hello": 100,
          "shape-after-hello": 150, "calls-after-hello": 400, "calls-before-hello": 80}
HUGE_LINES = 4


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


# --- the world: a server, a queue, a worker, a running attempt -----------------------

class Conn:
    """One raw protocol connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def send(self, line: bytes) -> dict[str, Any] | None:
        """Send one line; the reply, or None when the server closed the connection."""
        try:
            self.sock.sendall(line)
            reply = self.file.readline()
        except (ConnectionError, OSError):
            return None
        if not reply:
            return None
        obj: dict[str, Any] = json.loads(reply)
        return obj

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@dataclass
class World:
    boss: Boss
    port: int
    token: str
    db: Path
    attempt_id: int
    task_name: str
    ids: Iterator[int] = field(default_factory=lambda: iter(range(10**6, 10**9)))
    bound: Conn | None = None  # said hello
    anonymous: Conn | None = None  # did not
    before: Any = None
    reader: sqlite3.Connection | None = None
    version: int = -1

    def fingerprint(self) -> Any:
        """Every row of every table (a few dozen rows here)."""
        con = self._reader()
        names = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {n: sorted(con.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr)
                for n in names}

    def _reader(self) -> sqlite3.Connection:
        if self.reader is None:
            self.reader = sqlite3.connect(self.db, isolation_level=None)
        return self.reader

    def unchanged(self) -> bool:
        """No row changed since ``before`` was taken.

        ``PRAGMA data_version`` moves whenever another connection commits a change
        to the file, so the rows are only compared when it moved (a commit that
        changed nothing, such as the lease reaper's, moves it too)."""
        (version,) = self._reader().execute("PRAGMA data_version").fetchone()
        if version == self.version:
            return True
        self.version = version
        same: bool = self.fingerprint() == self.before
        return same

    def rebase(self) -> None:
        self.before = self.fingerprint()
        (self.version,) = self._reader().execute("PRAGMA data_version").fetchone()

    def hello(self) -> Conn:
        """The bound connection; (re)opened with a real hello, which is a change of its own."""
        if self.bound is None:
            c = Conn(self.port)
            r = c.send(messages.request(next(self.ids), "hello", {
                "token": self.token, "slots": 2, "host": "fuzz", "pid": 1}))
            assert r is not None and r["ok"], r
            self.bound = c
            self.rebase()
        return self.bound

    def unbound(self) -> Conn:
        if self.anonymous is None:
            self.anonymous = Conn(self.port)
        return self.anonymous

    def send(self, strategy: str, line: bytes, rid: int | None, after_hello: bool) -> None:
        """Send an invalid line; check the error reply and that nothing changed."""
        conn = self.hello() if after_hello else self.unbound()
        reply = conn.send(line)
        SENT[strategy] += 1
        assert reply is not None, f"no reply to {line[:300]!r}"
        check_error(reply, rid, line)
        if reply["error"]["code"] == Code.UNAUTHORIZED:  # the server closes it: reopen
            conn.close()
            if after_hello:
                self.bound = None
            else:
                self.anonymous = None
        assert self.unchanged(), f"state changed by {line[:300]!r}"


def check_error(reply: dict[str, Any], rid: int | None, line: bytes) -> None:
    assert reply.get("ok") is False, f"accepted {line[:300]!r}: {reply}"
    assert set(reply) == {"id", "ok", "error"}, reply
    error = reply["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message"}, reply
    assert error["code"] in CODES, f"{reply} for {line[:300]!r}"
    assert isinstance(error["message"], str) and error["message"], reply
    if rid is not None:
        assert reply["id"] == rid, (reply, line[:300])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("rpc-fuzz")
    s = absolutize(Settings.model_validate({
        # a lease that cannot expire during the run: the reaper must find nothing to do
        "boss": {"database_url": f"sqlite:///{root}/boss.db", "lease_seconds": 3600},
        "datastore": {"default": f"file://{root}/data",
                      "buckets": {"data": f"file://{root}/data"}},
        "worker": {"workdir": str(root / "work"), "cache_dir": str(root / "cache")},
    }), root)
    boss = Boss(s)
    boss.init()
    push(boss, root, [task(f"t{i}") for i in range(6)] + [task("child", after=["t0"])])
    _, _, token = boss.add_worker(slots=4)
    try:
        with serving(boss) as server:
            w = World(boss, server.port, token, root / "boss.db", 0, "")
            r = w.hello().send(messages.request(1, "pop", {"n": 1}))
            assert r is not None and r["ok"], r
            (a,) = r["result"]["tasks"]
            w.attempt_id, w.task_name = a["attempt_id"], a["name"]
            w.rebase()
            yield w
            for c in (w.bound, w.anonymous):
                if c is not None:
                    c.close()
            if w.reader is not None:
                w.reader.close()
    finally:
        boss.close()
    print("\nfuzzed messages sent: " + ", ".join(f"{k} {v}" for k, v in sorted(SENT.items()))
          + f"; total {sum(SENT.values())}")


# --- strategies --------------------------------------------------------------------------
#
# Every strategy is built once, here: building them inside the composite functions (a
# filter's lambda is compiled to describe it) cost more than the messages themselves.

def line_of(data: bytes) -> bytes:
    return data.replace(b"\n", b" ") + b"\n"


random_lines = st.binary(max_size=300).map(line_of)

# JSON values, small and nested; integers past 64 bits and long strings included
scalars = (st.none() | st.booleans() | st.integers(-BIG, BIG)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=8)
not_objects = json_values.filter(lambda v: not isinstance(v, dict))

# values of every JSON type, edge cases first
SAMPLES: list[Any] = [None, True, False, 0, 1, -1, 2**63, BIG, -BIG, 0.5, -1e300, 1e-300,
                      "", "1", "x" * 300, "\u202e", [], [1], [[]], [None, "a"], {},
                      {"n": 1}, {"": {"": []}}]
NONE: Any = type(None)
MORE = {str: st.text(max_size=20), list: st.lists(scalars, max_size=3),
        float: st.floats(allow_nan=False, allow_infinity=False),
        dict: st.dictionaries(st.text(max_size=5), scalars, max_size=2)}


@functools.cache
def not_(*allowed: Any) -> Any:
    """JSON values of any type but these (bool is never an int here)."""
    def wrong(v: Any) -> bool:
        if isinstance(v, bool):
            return bool not in allowed
        return not isinstance(v, allowed)
    return st.one_of(st.sampled_from([v for v in SAMPLES if wrong(v)]),
                     *[s for t, s in MORE.items() if t not in allowed])


# nasty text that is still JSON: an unpaired surrogate, NUL, control characters, 20 kB
RAW_SURROGATE = "\x00SURROGATE\x00"  # replaced by a raw \ud800 escape in the encoded line
nasty_text = st.sampled_from([RAW_SURROGATE, "\x00", "\u202e\n\r\t", "x" * 20_000,
                              "\U0001f600", "'; DROP TABLE tasks; --"])
# replaced by 100,000 levels of nested arrays: Python's json stops at the recursion
# limit, which hypothesis raises by a few thousand while it runs a test
DEEP = "\x00DEEP\x00"
DEEP_TEXT = b"[" * 2000


def encode(obj: Any) -> bytes:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    text = text.replace(json.dumps(RAW_SURROGATE), '"\\ud800"')
    text = text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)
    return text.encode() + b"\n"


CALL_NAMES = st.sampled_from(sorted(messages.CALLS))
SHAPE_FAULTS = st.sampled_from(["value", "v", "id", "call", "args", "deep"])
IDS = st.integers(0, 2**31)
WRONG_VERSION = not_(int) | st.integers(2, BIG)  # 1.0 and true equal 1: not wrong enough
WRONG_CALL = not_(str) | st.text(max_size=12).filter(lambda v: v not in messages.CALLS)


@st.composite
def wrong_shape(draw: Any) -> tuple[bytes, int | None]:
    """Valid JSON that is not a valid request."""
    kind = draw(SHAPE_FAULTS)
    rid = draw(IDS)
    req: dict[str, Any] = {"v": 1, "id": rid, "call": draw(CALL_NAMES), "args": {}}
    if kind == "value":
        return encode(draw(not_objects)), None
    if kind == "deep":
        return encode({**req, "args": {"n": DEEP}}), None
    if kind == "v":
        req["v"] = draw(WRONG_VERSION)
        if draw(st.booleans()):
            del req["v"]
    elif kind == "id":
        req["id"] = draw(not_(int))
        if draw(st.booleans()):
            del req["id"]
        rid = None
    elif kind == "call":
        req["call"] = draw(WRONG_CALL)
    else:
        req["args"] = draw(not_(dict))
    return encode(req), rid


# per call: its arguments as a valid base, and for each, values that are wrong
KNOWN = {"n", "attempts", "events", "attempt_id", "outcome", "exit_status", "reason",
         "metrics", "stdout_tail", "stderr_tail", "pop", "token", "slots", "host", "pid"}
COUNTS = not_(int) | st.integers(-BIG, -1) | st.integers(1025, BIG)
WRONG_ID = not_(int) | st.sampled_from([BIG, -BIG, 2**63])
WRONG_KIND = (not_(str) | st.text(max_size=30).filter(lambda k: k not in WORKER_KINDS)
              | nasty_text)
WRONG_OUTCOME = (not_(str) | st.text(max_size=20).filter(lambda o: o not in messages.OUTCOMES)
                 | nasty_text)
WRONG_TEXT = not_(str) | st.just(RAW_SURROGATE)
# NaN and Infinity are what json.dumps writes for them, and Python's json reads back
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400)])
WRONG_METRIC = not_(int, float) | NOT_FINITE
WRONG_STATUS = not_(int, NONE) | st.sampled_from([BIG, -BIG])
WRONG_SLOTS = not_(int, NONE) | st.sampled_from([0, -1, 1025, BIG])
GOOD_IDS = st.lists(st.integers(0, 100), max_size=3)
EVENT_FAULTS = st.sampled_from(["not-object", "attempt_id", "kind", "data", "ts", "missing",
                                "big-data"])
COMPLETE_FAULTS = st.sampled_from(["attempt_id", "outcome", "exit_status", "reason",
                                   "metrics", "stdout_tail", "stderr_tail", "events", "pop",
                                   "missing", "metric", "event"])
HELLO_FAULTS = st.sampled_from(["token", "slots", "host", "pid", "missing"])
# unknown arguments are ignored: never one that a call knows, which could make it valid
EXTRA = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in KNOWN), scalars,
                        max_size=2)


def bad_event(draw: Any, attempt_id: int) -> Any:
    good = {"attempt_id": attempt_id, "kind": "stage-in.finished", "data": {"bytes": 1},
            "ts": 0}
    what = draw(EVENT_FAULTS)
    if what == "not-object":
        return draw(not_(dict))
    if what == "attempt_id":
        return {**good, "attempt_id": draw(WRONG_ID)}
    if what == "kind":
        return {**good, "kind": draw(WRONG_KIND)}
    if what == "data":
        return {**good, "data": draw(not_(dict))}
    if what == "ts":
        return {**good, "ts": draw(not_(int, float) | NOT_FINITE)}
    if what == "big-data":
        return {**good, "data": {"x": "y" * 17_000}}
    del good[draw(st.sampled_from(["attempt_id", "kind"]))]
    return good


@st.composite
def bad_call(draw: Any, attempt_id: int) -> tuple[str, dict[str, Any]]:
    """A real call with at least one wrong argument (and perhaps unknown extra ones)."""
    call = draw(CALL_NAMES)
    args: dict[str, Any]
    how = draw(st.integers(0, 6))
    if call == "pop":
        args = {"n": draw(COUNTS)} if how else {}
    elif call == "heartbeat":
        if how == 0:
            args = {}
        elif how == 1:
            args = {"attempts": draw(not_(list))}
        else:  # a wrong id among good ones
            ids = draw(GOOD_IDS)
            at = draw(st.integers(0, len(ids)))
            args = {"attempts": [*ids[:at], draw(WRONG_ID), *ids[at:]]}
    elif call == "event":
        if how == 0:
            args = {}
        elif how == 1:
            args = {"events": draw(not_(list))}
        elif how == 2:
            args = {"events": [{}] * 10_001}
        elif how == 3:
            args = {"events": [bad_event(draw, attempt_id), DEEP]}
        else:
            args = {"events": [bad_event(draw, attempt_id)]}
    elif call == "complete":
        args = {"attempt_id": attempt_id, "outcome": "succeeded", "exit_status": 0,
                "reason": "", "metrics": {"wall": 0.1}, "stdout_tail": "", "stderr_tail": "",
                "events": [], "pop": 0}
        wrong = draw(COMPLETE_FAULTS)
        if wrong == "missing":
            del args[draw(st.sampled_from(["attempt_id", "outcome"]))]
        elif wrong == "metric":
            args["metrics"] = {"wall": draw(WRONG_METRIC)}
        elif wrong == "event":
            args["events"] = [bad_event(draw, attempt_id)]
        elif wrong == "attempt_id":
            args["attempt_id"] = draw(WRONG_ID)
        elif wrong == "outcome":
            args["outcome"] = draw(WRONG_OUTCOME)
        elif wrong == "exit_status":
            args["exit_status"] = draw(WRONG_STATUS)
        elif wrong == "pop":
            args["pop"] = draw(COUNTS)
        elif wrong in ("reason", "stdout_tail", "stderr_tail"):
            args[wrong] = draw(WRONG_TEXT)
        elif wrong == "metrics":
            args["metrics"] = draw(not_(dict))
        else:  # events
            args["events"] = draw(not_(list))
    elif call == "goodbye":
        args = {"reason": draw(WRONG_TEXT)}
    else:  # hello: a wrong token gets "unauthorized" and a closed connection
        args = {"token": "t", "slots": 1, "host": "h", "pid": 1}
        wrong = draw(HELLO_FAULTS)
        if wrong == "missing":
            del args["token"]
        elif wrong == "slots":
            args["slots"] = draw(WRONG_SLOTS)
        elif wrong == "token":
            args["token"] = draw(not_(str) | nasty_text)
        else:
            args[wrong] = draw(not_(int if wrong == "pid" else str))
    return call, {**args, **draw(EXTRA)}


# --- the runs ------------------------------------------------------------------------------

@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
def test_random_bytes(world: World, after_hello: bool) -> None:
    name = f"bytes-{'after' if after_hello else 'before'}-hello"

    @fuzz(BUDGET[name])
    @given(st.lists(random_lines, min_size=LIST, max_size=LIST))
    def run(lines: list[bytes]) -> None:
        for line in lines:
            world.send(name, line, None, after_hello)

    run()


@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
def test_json_of_the_wrong_shape(world: World, after_hello: bool) -> None:
    name = f"shape-{'after' if after_hello else 'before'}-hello"

    @fuzz(BUDGET[name])
    @given(st.lists(wrong_shape(), min_size=LIST, max_size=LIST))
    def run(lines: list[tuple[bytes, int | None]]) -> None:
        for line, rid in lines:
            world.send(name, line, rid, after_hello)

    run()


@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
def test_real_calls_with_wrong_arguments(world: World, after_hello: bool) -> None:
    name = f"calls-{'after' if after_hello else 'before'}-hello"

    @fuzz(BUDGET[name])
    @given(st.lists(bad_call(world.attempt_id), min_size=LIST, max_size=LIST))
    def run(calls: list[tuple[str, dict[str, Any]]]) -> None:
        for call, args in calls:
            rid = next(world.ids)
            line = encode({"v": 1, "id": rid, "call": call, "args": args})
            # too deep to read: no id can be read from it either
            world.send(name, line, None if DEEP_TEXT in line else rid, after_hello)

    run()


# what the fuzzing found, each kept as a plain case: before the fixes in
# protocol/messages.py and boss/server.py these were accepted (and changed the state) or
# answered "internal" after failing the whole group-commit batch they landed in
FOUND: dict[str, tuple[str, dict[str, Any]]] = {
    "exit-status-true": ("complete", {"attempt_id": "A", "outcome": "failed",
                                      "exit_status": True}),
    "attempt-id-over-64-bits": ("complete", {"attempt_id": 10**20, "outcome": "succeeded"}),
    "heartbeat-id-2**63": ("heartbeat", {"attempts": [2**63]}),
    "event-id-over-64-bits": ("event", {"events": [{"attempt_id": -(10**20),
                                                   "kind": "stage-in.started"}]}),
    "metric-over-float-range": ("complete", {"attempt_id": "A", "outcome": "succeeded",
                                             "metrics": {"wall": 10**400}}),
    "metric-nan": ("complete", {"attempt_id": "A", "outcome": "succeeded",
                                "metrics": {"wall": math.nan}}),
    "event-ts-infinity": ("event", {"events": [{"attempt_id": "A", "kind": "stage-in.started",
                                                "ts": math.inf}]}),
    "goodbye-lone-surrogate": ("goodbye", {"reason": RAW_SURROGATE}),
    "reason-lone-surrogate": ("complete", {"attempt_id": "A", "outcome": "failed",
                                           "reason": RAW_SURROGATE}),
    "goodbye-deeply-nested": ("goodbye", {"reason": "bye", "x": DEEP}),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_what_fuzzing_found(world: World, case: str) -> None:
    call, args = FOUND[case]
    def real(d: dict[str, Any]) -> dict[str, Any]:  # "A": the running attempt's id
        return {k: world.attempt_id if v == "A" else v for k, v in d.items()}

    args = real(args)
    if "events" in args:
        args["events"] = [real(e) for e in args["events"]]
    rid = next(world.ids)
    line = encode({"v": 1, "id": rid, "call": call, "args": args})
    world.send("found", line, None if DEEP_TEXT in line else rid, after_hello=True)
    assert world.bound is not None, "the connection should stay open"
    r = world.bound.send(messages.request(next(world.ids), "heartbeat", {"attempts": []}))
    assert r is not None and r["ok"], r
    world.rebase()  # that heartbeat was valid: it renewed the worker's last_seen


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_a_version_that_only_python_equates_with_1(world: World, version: object) -> None:
    """Found by the fuzzing: ``"v": true`` passed as version 1 (True == 1 in Python), and
    a goodbye carrying it ended the worker."""
    rid = next(world.ids)
    line = encode({"v": version, "id": rid, "call": "goodbye", "args": {}})
    world.send("found", line, rid, after_hello=True)
    assert world.bound is not None, "the connection should stay open"
    r = world.bound.send(messages.request(next(world.ids), "heartbeat", {"attempts": []}))
    assert r is not None and r["ok"], r
    world.rebase()


@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
def test_lines_over_the_limit(world: World, after_hello: bool) -> None:
    """16 MiB and more without a newline: one error, then the server closes the stream."""
    for k in range(HUGE_LINES // 2):
        conn = world.hello() if after_hello else world.unbound()
        filler = (b'{"v":1,"id":5,"call":"pop","args":{"n":"' if k else b"\xff")
        line = filler + b"x" * (messages.MAX_LINE + 1000 * (k + 1)) + b"\n"
        reply = conn.send(line)
        SENT["huge-lines"] += 1
        assert reply is not None, "no reply to a line over the limit"
        check_error(reply, None, line[:100])
        assert reply["error"]["code"] == Code.MALFORMED
        assert f"longer than {messages.MAX_LINE} bytes" in reply["error"]["message"], reply
        assert conn.send(b"\n") is None, "the stream should have been closed"
        conn.close()
        if after_hello:
            world.bound = None
        else:
            world.anonymous = None
        assert world.unchanged()


def test_the_server_still_works(world: World) -> None:
    """After all that, the same server runs the worker cycle to the end."""
    conn = world.hello()
    r = conn.send(messages.request(next(world.ids), "complete", {
        "attempt_id": world.attempt_id, "outcome": "succeeded", "exit_status": 0, "pop": 1}))
    assert r is not None and r["ok"], r
    assert r["result"]["accepted"] is True and len(r["result"]["tasks"]) == 1
    assert world.boss.show(world.task_name)["state"] == "succeeded"
    total = sum(SENT.values())
    print(f"\nfuzzed messages answered with an error, nothing changed: {total}")
    if set(BUDGET) <= set(SENT):  # every strategy ran (not a -k selection)
        assert total >= LIST * sum(BUDGET.values()) + HUGE_LINES
