"""The worker daemon: slots that pull tasks, a heartbeat, and a clean exit.

``Worker.run`` is the loop of ``worker run``:

- the main thread asks the boss for as many tasks as there are free slots
  (``pop``), starts one thread per task (:func:`worker.attempt.run_attempt`)
  and waits for a slot to free up, the boss's ``retry_after`` to pass, or a
  stop request;
- a heartbeat thread renews the leases of the running attempts every
  ``heartbeat_seconds`` and sets the cancel flag of every attempt the boss
  no longer counts as current (cancelled by the user, or lost);
- each slot thread reports its result (``complete``) itself.

With ``burst`` it ends when the boss answers ``drain`` (nothing waiting,
ready or running); with ``max_idle`` when it had no task for that many
seconds; and always on :meth:`Worker.stop`: the first stop lets the
running attempts finish and takes no new task, ``stop(cancel=True)`` (a
second Ctrl-C) cancels them. Either way the worker says goodbye, so the boss
requeues anything it did not finish at once rather than at lease expiry.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from protocol.errors import ProtocolError
from protocol.messages import Assignment, Result
from worker.attempt import JANITOR, AttemptEnv, run_attempt
from worker.client import BossClient, BossGone
from worker.transport import TransportError

log = logging.getLogger(__name__)
MAX_QUEUED_EVENTS = 10_000  # beyond this (boss away for long), progress events are dropped


@dataclass
class _Running:
    assignment: Assignment
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


@dataclass
class Summary:
    """What a worker did, for its exit message and the tests."""

    ran: int = 0
    succeeded: int = 0
    failed: int = 0
    refused: int = 0  # results the boss no longer took (lost or cancelled meanwhile)
    reason: str = ""


class Worker:
    def __init__(self, client: BossClient, env: AttemptEnv, slots: int, *,
                 burst: bool = False, max_idle: float | None = None) -> None:
        self.client = client
        self.env = env
        self.slots = slots
        self.burst = burst
        self.max_idle = max_idle
        self.summary = Summary()
        self._running: dict[int, _Running] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._events: list[dict[str, Any]] = []  # progress events waiting to be sent
        self._finished = 0  # attempts ended so far; wakes the pull loop
        self._beats_done = threading.Event()  # set once no attempt is left to renew

    def stop(self, cancel: bool = False) -> None:
        """Take no new task; with ``cancel``, also cancel the running attempts."""
        self._stopping.set()
        with self._changed:
            if cancel:
                for r in self._running.values():
                    r.cancel.set()
            self._changed.notify_all()

    def run(self) -> Summary:
        welcome = self.client.hello()
        self.env.buckets = dict(welcome.buckets)
        self.env.default_url = welcome.default_bucket or self.env.default_url
        log.info("worker %s (id %d) joined the boss with %d slot(s)", welcome.name,
                 welcome.worker_id, self.slots)
        beat = threading.Thread(target=self._heartbeat, args=(welcome.heartbeat_seconds,),
                                name="heartbeat", daemon=True)
        beat.start()
        reason = "stopped"
        try:
            reason = self._loop()
        except BossGone as exc:
            reason = str(exc)
            log.error("%s", exc)
            self.stop(cancel=True)
        finally:
            self._stopping.set()
            self._join_all()
            JANITOR.flush()
            self._beats_done.set()
            beat.join(timeout=30)
            self.summary.reason = reason
            self.client.goodbye(reason)
            self.client.close()
        return self.summary

    # --- the pull loop ------------------------------------------------------------------

    def _loop(self) -> str:
        idle_since = time.monotonic()
        while not self._stopping.is_set():
            with self._changed:
                free = self.slots - len(self._running)
                if free <= 0:
                    self._changed.wait(timeout=5.0)
                    continue
                if self._running:
                    idle_since = time.monotonic()
            if self.max_idle is not None and time.monotonic() - idle_since >= self.max_idle:
                return f"idle for {self.max_idle:g} s"
            reply = self.client.pop(free)
            if reply.tasks:
                idle_since = time.monotonic()
                for assignment in reply.tasks:
                    self._start(assignment)
                continue
            if reply.drain and self.burst and not self._has_running():
                return "the queue is drained"
            wait = max(reply.retry_after, 0.05) if not reply.drain else 1.0
            if self.max_idle is not None:
                wait = min(wait, max(self.max_idle - (time.monotonic() - idle_since), 0.0))
            with self._changed:
                # a finished attempt may have released its children: ask again at once
                self._changed.wait_for(partial(self._woken, self._finished), timeout=wait)
        return "stopped"

    def _woken(self, finished: int) -> bool:
        return self._stopping.is_set() or self._finished != finished

    def _has_running(self) -> bool:
        with self._lock:
            return bool(self._running)

    def _start(self, assignment: Assignment) -> None:
        entry = _Running(assignment)
        thread = threading.Thread(target=self._slot, args=(entry,),
                                  name=f"attempt-{assignment.attempt_id}", daemon=True)
        entry.thread = thread
        with self._changed:
            self._running[assignment.attempt_id] = entry
        log.info("task %s: attempt %d (try %d) started", assignment.name,
                 assignment.attempt_id, assignment.number)
        thread.start()

    def _slot(self, entry: _Running) -> None:
        """Run attempts in this thread: the one given, then each the boss hands out with
        the result of the previous one (one call per task while work lasts)."""
        current: _Running | None = entry
        while current is not None:
            a = current.assignment
            following: Assignment | None = None
            try:
                result = run_attempt(a, self.env, self._emitter(a.attempt_id), current.cancel)
                following = self._report(a, result)
            finally:
                with self._changed:
                    self._running.pop(a.attempt_id, None)
                    self._finished += 1
                    current = None
                    if following is not None:
                        # registered before the old one is seen gone: no slot is popped twice
                        current = _Running(following, thread=threading.current_thread())
                        self._running[following.attempt_id] = current
                    self._changed.notify_all()
            if current is not None:
                log.info("task %s: attempt %d (try %d) started", current.assignment.name,
                         current.assignment.attempt_id, current.assignment.number)

    def _report(self, a: Assignment, result: Result) -> Assignment | None:
        """Send the result (and the queued events); return the slot's next task, if any."""
        log.info("task %s: attempt %d %s%s", a.name, a.attempt_id, result.outcome,
                 f" ({result.reason})" if result.reason else "")
        with self._lock:
            events, self._events = self._events, []
        want = 0 if self._stopping.is_set() else 1
        following = None
        try:
            accepted, popped = self.client.complete(result, events, pop=want)
            if popped is not None and popped.tasks:
                following = popped.tasks[0]
                for extra in popped.tasks[1:]:  # asked for one; never drop a claimed task
                    self._start(extra)
        except (BossGone, TransportError, ProtocolError) as exc:
            log.error("task %s: attempt %d could not be reported: %s", a.name,
                      a.attempt_id, exc)
            accepted = False
        with self._lock:
            self.summary.ran += 1
            if not accepted:
                self.summary.refused += 1
            elif result.outcome == "succeeded":
                self.summary.succeeded += 1
            else:
                self.summary.failed += 1
        return following

    def _emitter(self, attempt_id: int) -> Any:
        def emit(kind: str, data: dict[str, Any]) -> None:
            with self._lock:
                if len(self._events) < MAX_QUEUED_EVENTS:
                    self._events.append({"attempt_id": attempt_id, "kind": kind,
                                         "data": data, "ts": time.time()})
        return emit

    def _flush_events(self) -> None:
        """Send the queued progress events in one call (each heartbeat, and before a result).

        Progress is a report, not state: when the boss is away they are dropped
        rather than held up, and the attempt goes on.
        """
        with self._lock:
            events, self._events = self._events, []
        try:
            self.client.events(events)
        except (TransportError, ProtocolError) as exc:
            log.debug("%d progress events dropped: %s", len(events), exc)

    def _heartbeat(self, every: float) -> None:
        while not self._beats_done.wait(every):
            self._flush_events()
            with self._lock:
                ids = sorted(self._running)
            if not ids:
                continue
            try:
                cancel = self.client.heartbeat(ids)
            except (BossGone, TransportError, ProtocolError) as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            with self._lock:
                for attempt_id in cancel:
                    entry = self._running.get(attempt_id)
                    if entry is not None and not entry.cancel.is_set():
                        log.info("task %s: attempt %d cancelled by the boss",
                                 entry.assignment.name, attempt_id)
                        entry.cancel.set()

    def _join_all(self) -> None:
        while True:
            with self._lock:
                threads = [r.thread for r in self._running.values() if r.thread]
            if not threads:
                return
            for t in threads:
                t.join()
