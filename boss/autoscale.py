"""The autoscaler's decision: how many workers to start, which to drain, which are lost.

A pure function, :func:`decide`, over plain data (:class:`Observed`,
:class:`Policy`) that returns a :class:`Decision`; ``boss serve`` gathers the
observation from the store, calls it on every tick, and carries the decision
out through the provider. Nothing here reads a clock, a database or the
network, so every rule is table-tested (tests/unit/test_autoscale.py).

The rules:

- **Lost.** A worker that has said hello (idle, busy, draining) and has been
  silent for more than ``lease_seconds``, or a provisioning worker that has
  not said hello within ``boot_seconds`` of its creation, is lost: the caller
  marks it lost and deletes it. Lost workers are not capacity, so they are
  replaced in the same decision if they are still needed.
- **Live** workers are provisioning + idle + busy, minus the lost ones.
  Draining workers are on their way out and are not capacity.
- **Desired** = ``ceil((ready + running) / slots)`` clamped to
  ``[min_workers, max_workers]``. When nothing is ready or running, tasks
  still waiting cannot become ready (their dependencies are not running), so
  desired is ``min_workers``: scale to zero.
- **Up at once**: ``create = desired - live`` when positive.
- **Down with hysteresis**: only idle workers (state idle, nothing running)
  idle for at least ``idle_seconds`` are drained, at most ``live - desired`` of
  them, the longest idle first (then the newest, then the highest id): a
  worker that has just finished a task is the likeliest to get the next one.
- A decision never both creates and drains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PROVISIONING = "provisioning"
IDLE = "idle"
BUSY = "busy"
DRAINING = "draining"
STATES = frozenset({PROVISIONING, IDLE, BUSY, DRAINING, "terminated", "lost", "failed"})
LIVE_STATES = frozenset({PROVISIONING, IDLE, BUSY})
LEASED_STATES = frozenset({IDLE, BUSY, DRAINING})  # said hello: silence is measured by lease


@dataclass(frozen=True)
class WorkerView:
    """One worker as the autoscaler sees it (a row of the workers table)."""

    id: int
    state: str  # provisioning | idle | busy | draining | terminated | lost | failed
    slots: int
    running: int  # attempts running on it
    created_at: float
    last_seen: float | None
    idle_since: float | None  # when it last became idle (None if busy / never)

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"worker {self.id}: unknown state {self.state!r}: one of "
                             f"{', '.join(sorted(STATES))}")


@dataclass(frozen=True)
class Observed:
    """What the boss sees at ``now``: the backlog and the workers."""

    now: float
    ready: int  # tasks ready
    waiting: int  # tasks waiting on dependencies
    running: int  # tasks running
    workers: tuple[WorkerView, ...]

    def __post_init__(self) -> None:
        for name in ("ready", "waiting", "running"):
            if getattr(self, name) < 0:
                raise ValueError(f"Observed.{name} is {getattr(self, name)}: counts are >= 0")


@dataclass(frozen=True)
class Policy:
    """The ``[autoscale]`` settings, plus the lease and the slots of a new worker."""

    min_workers: int
    max_workers: int
    slots: int  # slots of a new worker
    idle_seconds: float  # an idle worker is drained only after this long idle (hysteresis)
    lease_seconds: float  # a worker silent this long (last_seen) is lost
    boot_seconds: float  # a provisioning worker that never said hello in this long is lost

    def __post_init__(self) -> None:
        if self.min_workers < 0 or self.max_workers < 0:
            raise ValueError(f"[autoscale] min_workers ({self.min_workers}) and max_workers "
                             f"({self.max_workers}) must be >= 0")
        if self.min_workers > self.max_workers:
            raise ValueError(f"[autoscale] min_workers ({self.min_workers}) is above "
                             f"max_workers ({self.max_workers}): lower one or raise the other")
        if self.slots < 1:
            raise ValueError(f"[worker] slots ({self.slots}) must be at least 1")
        for name in ("idle_seconds", "lease_seconds", "boot_seconds"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"Policy.{name} is {getattr(self, name)}: must be >= 0")


@dataclass(frozen=True)
class Decision:
    """What to do now; ``reason`` is one line for the log."""

    create: int  # new workers to start
    drain: tuple[int, ...]  # worker ids to tell "drain" (idle ones, longest idle first)
    lost: tuple[int, ...]  # worker ids silent past their lease / boot time: mark lost, delete
    desired: int
    reason: str  # one line for the log


def is_lost(worker: WorkerView, now: float, policy: Policy) -> bool:
    """Silent past its lease (after hello) or past its boot time (before hello)."""
    if worker.state == PROVISIONING and worker.last_seen is None:
        return now - worker.created_at > policy.boot_seconds
    if worker.state in LEASED_STATES or worker.state == PROVISIONING:
        # A hello'd worker without last_seen cannot happen in the store; measure from
        # its creation rather than keep it forever.
        seen = worker.last_seen if worker.last_seen is not None else worker.created_at
        return now - seen > policy.lease_seconds
    return False


def idle_for(worker: WorkerView, now: float) -> float | None:
    """How long an idle worker has been idle; None when it is not idle."""
    if worker.state != IDLE or worker.running != 0:
        return None
    # Idle and never busy: idle since it was created, at the latest since its hello.
    since = worker.idle_since if worker.idle_since is not None else worker.created_at
    return now - since


def desired_workers(obs: Observed, policy: Policy) -> int:
    """``ceil((ready + running) / slots)`` clamped to ``[min_workers, max_workers]``."""
    demand = obs.ready + obs.running
    wanted = math.ceil(demand / policy.slots) if demand else 0
    return min(max(wanted, policy.min_workers), policy.max_workers)


def decide(obs: Observed, policy: Policy) -> Decision:
    """The autoscaler's decision for this observation (see the module docstring)."""
    lost = tuple(sorted(w.id for w in obs.workers if is_lost(w, obs.now, policy)))
    gone = set(lost)
    live = [w for w in obs.workers if w.state in LIVE_STATES and w.id not in gone]
    desired = desired_workers(obs, policy)

    create = max(0, desired - len(live))
    drain: tuple[int, ...] = ()
    if create == 0 and len(live) > desired:
        candidates: list[tuple[float, float, int]] = []
        for w in live:
            idle = idle_for(w, obs.now)
            if idle is not None and idle >= policy.idle_seconds:
                candidates.append((-idle, -w.created_at, -w.id))
        candidates.sort()
        drain = tuple(-key[2] for key in candidates[: len(live) - desired])

    if obs.ready + obs.running == 0:
        backlog = f"nothing ready or running ({obs.waiting} waiting): scale to minimum"
    else:
        backlog = (f"{obs.ready} ready + {obs.running} running over {policy.slots} "
                   f"slots/worker")
    parts = [f"{backlog}; desired {desired} [{policy.min_workers}..{policy.max_workers}], "
             f"live {len(live)}"]
    if lost:
        parts.append(f"lost {len(lost)}")
    if create:
        parts.append(f"create {create}")
    if drain:
        parts.append(f"drain {len(drain)}")
    elif len(live) > desired:
        parts.append(f"{len(live) - desired} over, none idle {policy.idle_seconds:g}s yet")
    return Decision(create=create, drain=drain, lost=lost, desired=desired,
                    reason="; ".join(parts))
