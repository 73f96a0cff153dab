"""Bounded waiting and fast autoscaling for tests that run real workers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from protocol.settings import Settings

BOUND = 120.0  # seconds; a bound on waiting, never an assertion about speed


def wait_for(predicate: Callable[[], object], what: str, bound: float = BOUND,
             every: float = 0.1) -> None:
    """Poll ``predicate`` every ``every`` seconds until it is true; fail naming ``what``
    after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:  # bounded in time
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"gave up after {bound:.0f} s waiting for {what}")


def run_in_threads(target: Callable[..., object], args: Iterable[tuple[Any, ...]],
                   bound: float = BOUND) -> None:
    """Run ``target(*a)`` for each ``a`` of ``args`` in a thread of its own, all at once;
    fail if one is still running after ``bound`` seconds or if any raised."""
    errors: list[BaseException] = []

    def run(*a: Any) -> None:
        try:
            target(*a)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=a) for a in args]
    for t in threads:
        t.start()
    deadline = time.monotonic() + bound
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def quick_pool(s: Settings, slots: int, max_workers: int) -> None:
    """Short leases, heartbeats and ticks: a lost worker is noticed within seconds."""
    s.boss.lease_seconds = 3
    s.boss.reap_seconds = 0.5
    s.worker.heartbeat_seconds = 0.3
    s.worker.poll_seconds = 0.1
    s.worker.slots = slots
    s.autoscale.max_workers = max_workers
    s.autoscale.idle_seconds = 0
    s.autoscale.tick_seconds = 0.3
