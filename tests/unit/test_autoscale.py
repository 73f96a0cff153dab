"""The autoscaler's decision (boss/autoscale.py): a table of cases, then properties."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from boss.autoscale import (
    LIVE_STATES,
    STATES,
    Decision,
    Observed,
    Policy,
    WorkerView,
    decide,
    idle_for,
)

NOW = 10_000.0
P = Policy(min_workers=0, max_workers=10, slots=2, idle_seconds=60, lease_seconds=60,
           boot_seconds=600)


def w(id: int, state: str = "busy", *, running: int | None = None, age: float = 3600,
      seen: float | None = 1, idle: float | None = None, slots: int = 2) -> WorkerView:
    """A worker created ``age`` s ago, last seen ``seen`` s ago, idle for ``idle`` s."""
    if running is None:
        running = 1 if state == "busy" else 0
    if idle is None and state == "idle":
        idle = 1
    return WorkerView(id=id, state=state, slots=slots, running=running,
                      created_at=NOW - age, last_seen=None if seen is None else NOW - seen,
                      idle_since=None if idle is None else NOW - idle)


def obs(*workers: WorkerView, ready: int = 0, waiting: int = 0, running: int = 0) -> Observed:
    return Observed(now=NOW, ready=ready, waiting=waiting, running=running,
                    workers=tuple(workers))


@dataclass(frozen=True)
class Case:
    obs: Observed
    create: int = 0
    drain: tuple[int, ...] = ()
    lost: tuple[int, ...] = ()
    desired: int = 0
    policy: Policy = P
    reason_has: str = ""


CASES: dict[str, Case] = {
    # ---- nothing to do
    "empty": Case(obs()),
    "steady-busy": Case(obs(w(1), w(2), running=4), desired=2),
    # ---- scale up at once
    "up-from-zero": Case(obs(ready=5), create=3, desired=3, reason_has="create 3"),
    "up-ceil-one-task": Case(obs(ready=1), create=1, desired=1),
    "up-exact-multiple": Case(obs(ready=4), create=2, desired=2),
    "up-running-counts": Case(obs(w(1), ready=3, running=1), create=1, desired=2),
    "up-clamped-to-max": Case(obs(ready=100), create=10, desired=10),
    "up-clamped-with-live": Case(obs(w(1), w(2), w(3), w(4), ready=100, running=4),
                                 create=6, desired=10),
    "provisioning-is-capacity": Case(obs(w(1, "provisioning", age=10, seen=None),
                                         w(2, "provisioning", age=10, seen=None), ready=4),
                                     desired=2),
    "draining-is-not-capacity": Case(obs(w(1, "draining", running=1),
                                         w(2, "draining", running=1), ready=4, running=2),
                                     create=3, desired=3),
    "ended-states-ignored": Case(obs(w(1, "terminated", seen=9999), w(2, "lost", seen=9999),
                                     w(3, "failed", seen=None, age=9999), ready=2),
                                 create=1, desired=1),
    "min-workers-from-zero": Case(obs(), create=2, desired=2,
                                  policy=replace(P, min_workers=2)),
    "max-zero-never-creates": Case(obs(ready=10), policy=replace(P, max_workers=0)),
    "slots-one": Case(obs(ready=3), create=3, desired=3, policy=replace(P, slots=1)),
    "idle-long-but-needed": Case(obs(w(1, "idle", idle=999), ready=2), desired=1),
    # ---- scale to zero: nothing ready or running, waiting tasks cannot become ready
    "zero-waiting-only": Case(obs(w(1, "idle", idle=61), w(2, "idle", idle=70), waiting=50),
                              drain=(2, 1), reason_has="scale to minimum"),
    "zero-to-min": Case(obs(w(1, "idle", idle=61), w(2, "idle", idle=70), w(3, "idle",
                                                                           idle=80)),
                        drain=(3,), desired=2, policy=replace(P, min_workers=2)),
    "waiting-with-running-keeps-one": Case(obs(w(1), w(2, "idle", idle=100), waiting=50,
                                               running=1),
                                           drain=(2,), desired=1),
    # ---- scale down with hysteresis
    "idle-too-short": Case(obs(w(1, "idle", idle=59)), reason_has="none idle 60s yet"),
    "idle-exactly-threshold": Case(obs(w(1, "idle", idle=60)), drain=(1,)),
    "idle-zero-threshold": Case(obs(w(1, "idle", idle=0)), drain=(1,),
                                policy=replace(P, idle_seconds=0)),
    "drain-at-most-surplus": Case(obs(w(1, "idle", idle=100), w(2, "idle", idle=300),
                                      w(3, "idle", idle=200), ready=2),
                                  drain=(2, 3), desired=1),
    "drain-longest-idle-first": Case(obs(w(1, "idle", idle=100), w(2, "idle", idle=500),
                                         w(3, "idle", idle=300), w(4), running=1),
                                     drain=(2, 3, 1), desired=1),
    "drain-tie-newest-first": Case(obs(w(1, "idle", idle=100, age=500),
                                       w(2, "idle", idle=100, age=200),
                                       w(3, "idle", idle=100, age=900), ready=2),
                                   drain=(2, 1), desired=1),
    "drain-tie-highest-id": Case(obs(w(1, "idle", idle=100), w(2, "idle", idle=100),
                                     ready=2),
                                 drain=(2,), desired=1),
    "busy-never-drained": Case(obs(w(1), w(2), w(3))),
    "idle-state-with-running-not-drained": Case(obs(w(1, "idle", running=1, idle=999))),
    "provisioning-not-drained": Case(obs(w(1, "provisioning", age=10, seen=None))),
    "idle-since-unknown-old": Case(obs(WorkerView(
        id=1, state="idle", slots=2, running=0, created_at=NOW - 100, last_seen=NOW - 1,
        idle_since=None)), drain=(1,)),
    "idle-since-unknown-new": Case(obs(WorkerView(
        id=1, state="idle", slots=2, running=0, created_at=NOW - 10, last_seen=NOW - 1,
        idle_since=None))),
    "over-max-busy-kept": Case(obs(*(w(i) for i in range(1, 6)), ready=10, running=5),
                               desired=3, policy=replace(P, max_workers=3),
                               reason_has="2 over"),
    "over-max-idle-drained": Case(obs(w(1), w(2), w(3), w(4, "idle", idle=100),
                                      w(5, "idle", idle=200), ready=100, running=3),
                                  drain=(5, 4), desired=3, policy=replace(P, max_workers=3)),
    "never-create-and-drain": Case(obs(w(1, "idle", idle=999), ready=4),
                                   create=1, desired=2),
    # ---- lost workers
    "lost-busy-silent-replaced": Case(obs(w(1, seen=61), running=2), create=1, lost=(1,),
                                      desired=1, reason_has="lost 1"),
    "lease-boundary-not-lost": Case(obs(w(1, seen=60), running=2), desired=1),
    "lost-idle-not-drained": Case(obs(w(1, "idle", seen=61, idle=999)), lost=(1,)),
    "lost-draining": Case(obs(w(1, "draining", seen=1000)), lost=(1,)),
    "lost-not-needed-not-replaced": Case(obs(w(1, seen=61), w(2, seen=61)), lost=(1, 2)),
    "boot-timeout": Case(obs(w(1, "provisioning", age=601, seen=None), ready=1),
                         create=1, lost=(1,), desired=1),
    "boot-boundary-not-lost": Case(obs(w(1, "provisioning", age=600, seen=None), ready=1),
                                   desired=1),
    "provisioning-said-hello-uses-lease": Case(
        obs(w(1, "provisioning", age=9999, seen=5), ready=1), desired=1),
    "hello-without-last-seen-uses-created": Case(obs(w(1, seen=None, age=61), running=1),
                                                 lost=(1,), create=1, desired=1),
    "future-last-seen-not-lost": Case(obs(w(1, seen=-30), running=1), desired=1),
    "lost-replaced-up-to-max": Case(obs(w(1, seen=100), w(2), ready=100, running=2),
                                    create=2, lost=(1,), desired=3,
                                    policy=replace(P, max_workers=3)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decide(case: Case) -> None:
    d = decide(case.obs, case.policy)
    assert (d.create, d.drain, d.lost, d.desired) == (
        case.create, case.drain, case.lost, case.desired), d.reason
    assert "\n" not in d.reason
    assert case.reason_has in d.reason


@pytest.mark.parametrize(("fields", "message"), [
    ({"min_workers": 3, "max_workers": 2}, "min_workers (3) is above max_workers (2)"),
    ({"min_workers": -1}, "must be >= 0"),
    ({"slots": 0}, "slots (0) must be at least 1"),
    ({"idle_seconds": -1.0}, "idle_seconds"),
    ({"lease_seconds": float("nan")}, "lease_seconds"),
], ids=["min-above-max", "negative-min", "no-slots", "negative-idle", "nan-lease"])
def test_policy_refuses_nonsense(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        replace(P, **fields)


def test_unknown_state_and_negative_counts_refused() -> None:
    with pytest.raises(ValueError, match="unknown state 'Idle'"):
        w(1, "Idle")
    with pytest.raises(ValueError, match=r"Observed\.ready is -1"):
        obs(ready=-1)


# ---------------------------------------------------------------- properties

@st.composite
def policies(draw: st.DrawFn) -> Policy:
    lo = draw(st.integers(0, 5))
    return Policy(min_workers=lo, max_workers=draw(st.integers(lo, 12)),
                  slots=draw(st.integers(1, 8)),
                  idle_seconds=draw(st.sampled_from([0.0, 30.0, 60.0, 120.0])),
                  lease_seconds=draw(st.sampled_from([1.0, 60.0, 120.0])),
                  boot_seconds=draw(st.sampled_from([1.0, 300.0, 900.0])))


@st.composite
def workers(draw: st.DrawFn, wid: int) -> WorkerView:
    state = draw(st.sampled_from(sorted(STATES)))
    slots = draw(st.integers(1, 8))
    created = NOW - draw(st.floats(0, 2000))
    seen = draw(st.none() | st.floats(0, 300).map(lambda ago: NOW - ago))
    idle = draw(st.none() | st.floats(0, 300).map(lambda ago: NOW - ago))
    return WorkerView(id=wid, state=state, slots=slots, running=draw(st.integers(0, slots)),
                      created_at=created, last_seen=seen, idle_since=idle)


@st.composite
def observations(draw: st.DrawFn) -> Observed:
    ids = draw(st.lists(st.integers(1, 10_000), unique=True, max_size=15))
    return Observed(now=NOW, ready=draw(st.integers(0, 60)), waiting=draw(st.integers(0, 60)),
                    running=draw(st.integers(0, 60)),
                    workers=tuple(draw(workers(i)) for i in ids))


def _live(o: Observed, d: Decision) -> int:
    return sum(1 for x in o.workers if x.state in LIVE_STATES and x.id not in d.lost)


@given(observations(), policies())
def test_bounds_and_exclusions(o: Observed, p: Policy) -> None:
    d = decide(o, p)
    live = _live(o, d)
    after = live + d.create - len(d.drain)
    assert p.min_workers <= d.desired <= p.max_workers
    assert d.create >= 0 and after >= 0
    assert not (d.create and d.drain), "never create and drain at once"
    assert after <= max(live, p.max_workers), "never grow past max_workers"
    if d.create:
        assert after == d.desired <= p.max_workers
    if d.drain:
        assert after >= d.desired >= p.min_workers, "never drain below desired / minimum"
    if o.ready + o.running == 0:
        assert d.desired == p.min_workers, "scale to zero (or the minimum)"


@given(observations(), policies())
def test_who_is_drained_and_lost(o: Observed, p: Policy) -> None:
    d = decide(o, p)
    by_id = {x.id: x for x in o.workers}
    assert len(set(d.drain)) == len(d.drain) and len(set(d.lost)) == len(d.lost)
    assert not set(d.drain) & set(d.lost)
    for i in d.drain:
        x = by_id[i]
        assert x.state == "idle" and x.running == 0, "never drain a busy worker"
        idle = idle_for(x, o.now)
        assert idle is not None and idle >= p.idle_seconds, "hysteresis"
    for i in d.lost:
        assert by_id[i].state in {"provisioning", "idle", "busy", "draining"}


@given(observations(), policies(), st.randoms(use_true_random=False))
def test_order_of_workers_does_not_matter(o: Observed, p: Policy, rnd: random.Random
                                        ) -> None:
    shuffled = list(o.workers)
    rnd.shuffle(shuffled)
    assert decide(replace(o, workers=tuple(shuffled)), p) == decide(o, p)


@given(observations(), policies(), st.integers(1, 50))
def test_more_backlog_never_wants_fewer_workers(o: Observed, p: Policy, more: int) -> None:
    d, bigger = decide(o, p), decide(replace(o, ready=o.ready + more), p)
    assert bigger.desired >= d.desired
    assert bigger.create >= d.create
    assert len(bigger.drain) <= len(d.drain)
