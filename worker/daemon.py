"""The worker daemon: slots that pull tasks, a heartbeat, and a clean exit.

``Worker.run`` is the loop of ``worker run``:

- the main thread fills idle slots: from the tasks claimed ahead (the
  reserve), else by asking the boss (``pop``); each slot is a thread that
  runs attempts (:func:`worker.attempt.run_attempt`) one after another; the
  main thread waits for a slot to free up, the boss's ``retry_after`` to
  pass, or a stop request;
- a reporter thread sends the results (``complete``, with the queued
  events) and claims the next tasks into the reserve in the same call,
  while the slots already run tasks from the reserve; the results that
  slots finish while a report is on its way go together in the next one
  (the batched ``complete``), so many slots finishing at once make one call;
- a heartbeat thread renews the leases of every attempt claimed and not yet
  reported every ``heartbeat_seconds`` and sets the cancel flag of every
  attempt the boss no longer counts as current (cancelled by the user, or
  lost).

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
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from protocol.errors import ProtocolError
from protocol.messages import Assignment, Result
from worker.attempt import AttemptEnv, run_attempt
from worker.client import BossClient, BossGone
from worker.transport import TransportError
from worker.workdirs import SWEEP_SECONDS

log = logging.getLogger(__name__)
MAX_QUEUED_EVENTS = 10_000  # beyond this (boss away for long), progress events are dropped


@dataclass
class _Running:
    assignment: Assignment
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    renewed: float = field(default_factory=time.monotonic)  # lease last known renewed


@dataclass
class _Report:
    entry: _Running
    result: Result
    want: int  # tasks to claim ahead for the slot
    done: Future[None] = field(default_factory=Future)


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
        # the events' own lock: a slot stamping a stage step must not wait while the
        # pull loop holds the worker's lock to start the slot threads of a claim (a
        # critical task's event came 0.4 s late so; benchmark 6)
        self._events_lock = threading.Lock()
        self._finished = 0  # attempts ended so far; wakes the pull loop
        self._beats_done = threading.Event()  # set once no attempt is left to renew
        # the slots' reports, sent by one thread while the slots run their next tasks
        self._reports: list[_Report] = []
        self._reports_ready = threading.Condition()
        self._reports_closed = False
        self._reporter = threading.Thread(target=self._reporting, name="reporter",
                                          daemon=True)
        self._reserve: deque[_Running] = deque()  # claimed ahead, not started (in _running)
        self._busy = 0  # slot threads alive
        # attempt id -> when this worker first had it: a claim is run once, whether its
        # reply or the boss's heartbeat (after a lost reply) brought it
        self._seen: dict[int, float] = {}

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
        self.env.fence = partial(self._fence, welcome.lease_seconds)
        log.info("worker %s (id %d) joined the boss with %d slot(s)", welcome.name,
                 welcome.worker_id, self.slots)
        self.env.trees.sweep(self.env.workdir_root)  # trees of workers that died
        beat = threading.Thread(target=self._heartbeat,
                                args=(welcome.heartbeat_seconds, welcome.lease_seconds),
                                name="heartbeat", daemon=True)
        beat.start()
        self._reporter.start()
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
            with self._reports_ready:
                self._reports_closed = True  # what is queued still goes out
                self._reports_ready.notify_all()
            self._reporter.join()
            with self._lock:
                # claimed ahead and never started: the goodbye below requeues them
                for r in self._reserve:
                    self._running.pop(r.assignment.attempt_id, None)
                self._reserve.clear()
            self.env.trees.close()  # and waits for the janitor
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
                free = self.slots - self._busy
                # an idle slot takes a task claimed ahead before asking the boss
                while free > 0 and self._reserve:
                    self._spawn(self._reserve.popleft())
                    free -= 1
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
        with self._changed:
            if not self._first_time(assignment):
                return
            self._running[assignment.attempt_id] = entry
            self._spawn(entry)

    def _first_time(self, assignment: Assignment) -> bool:
        """Whether this attempt is new to the worker (and remember it); holds the lock."""
        if assignment.attempt_id in self._seen:
            return False
        self._seen[assignment.attempt_id] = time.monotonic()
        return True

    def _spawn(self, entry: _Running) -> None:
        """A slot thread for ``entry`` (registered already); the caller holds the lock."""
        thread = threading.Thread(target=self._slot, args=(entry,),
                                  name=f"slot-{entry.assignment.attempt_id}", daemon=True)
        entry.thread = thread
        self._busy += 1
        self._started(entry)
        thread.start()

    def _started(self, entry: _Running) -> None:
        a = entry.assignment
        log.info("task %s: attempt %d (try %d) started", a.name, a.attempt_id, a.number)

    def _slot(self, entry: _Running) -> None:
        """Run attempts in this thread, one after another, while there is work.

        The report of an attempt also claims tasks ahead, into a reserve that
        every slot shares. The report is sent from a reporter thread while the
        slot already runs a task from the reserve, so a slot does not wait for
        the boss between tasks; and since any free slot takes from the reserve,
        a task claimed ahead never waits behind a long one. A report asks for
        one task when the reserve holds some, for two when it is empty.
        """
        current: _Running | None = entry
        try:
            while current is not None:
                a = current.assignment
                result = run_attempt(a, self.env, self._emitter(a.attempt_id), current.cancel)
                with self._lock:
                    want = 0 if self._stopping.is_set() else (1 if self._reserve else 2)
                report = self._queue_report(current, result, want)
                current = self._take()
                if current is None:
                    report.result()  # its tasks go to the reserve
                    current = self._take()
        finally:
            with self._changed:
                self._busy -= 1
                self._changed.notify_all()

    def _take(self) -> _Running | None:
        """The next task from the reserve, for the calling slot (None when stopping)."""
        with self._changed:
            if self._stopping.is_set() or not self._reserve:
                return None
            entry = self._reserve.popleft()
            entry.thread = threading.current_thread()
            self._started(entry)
            return entry

    def _queue_report(self, entry: _Running, result: Result, want: int) -> Future[None]:
        """Hand a result to the reporter; the future is done once the boss answered."""
        report = _Report(entry, result, want)
        with self._reports_ready:
            self._reports.append(report)
            self._reports_ready.notify()
        return report.done

    def _reporting(self) -> None:
        """The reporter thread: send what the slots queued, all of it in one call."""
        while True:
            with self._reports_ready:
                while not self._reports and not self._reports_closed:
                    self._reports_ready.wait()
                batch, self._reports = self._reports, []
            if not batch:
                return
            try:
                self._report(batch)
            except Exception:  # a bug: the slots waiting on these must not hang
                log.exception("reporting %d result(s)", len(batch))
            finally:
                for report in batch:
                    report.done.set_result(None)

    def _report(self, batch: list[_Report]) -> None:
        """Send the results (with the queued events) and claim what the slots want more;
        an attempt counts as running (its lease renewed) until the boss has its result."""
        for r in batch:
            a = r.entry.assignment
            log.info("task %s: attempt %d %s%s", a.name, a.attempt_id, r.result.outcome,
                     f" ({r.result.reason})" if r.result.reason else "")
        with self._events_lock:
            events, self._events = self._events, []
        want = sum(r.want for r in batch)
        claimed: list[Assignment] = []
        try:
            if len(batch) == 1:
                taken, popped = self.client.complete(batch[0].result, events, pop=want)
                accepted = [taken]
            else:
                accepted, popped = self.client.complete_many(
                    [r.result for r in batch], events, pop=want)
            if popped is not None:
                claimed = popped.tasks
        except (BossGone, TransportError, ProtocolError) as exc:
            for r in batch:
                log.error("task %s: attempt %d could not be reported: %s",
                          r.entry.assignment.name, r.entry.assignment.attempt_id, exc)
            accepted = [False] * len(batch)
        with self._changed:
            for r, taken in zip(batch, accepted, strict=True):
                self._running.pop(r.entry.assignment.attempt_id, None)
                self._finished += 1
                self.summary.ran += 1
                if not taken:
                    self.summary.refused += 1
                elif r.result.outcome == "succeeded":
                    self.summary.succeeded += 1
                else:
                    self.summary.failed += 1
            # registered at once: their leases are renewed from now on
            mine = [_Running(t) for t in claimed if self._first_time(t)]
            for entry in mine:
                self._running[entry.assignment.attempt_id] = entry
                self._reserve.append(entry)
            self._changed.notify_all()

    def _emitter(self, attempt_id: int) -> Any:
        def emit(kind: str, data: dict[str, Any]) -> None:
            ts = time.time()
            with self._events_lock:
                if len(self._events) < MAX_QUEUED_EVENTS:
                    self._events.append({"attempt_id": attempt_id, "kind": kind,
                                         "data": data, "ts": ts})
        return emit

    def _flush_events(self) -> None:
        """Send the queued progress events in one call (each heartbeat, and before a result).

        Progress is a report, not state: when the boss is away they are dropped
        rather than held up, and the attempt goes on.
        """
        with self._events_lock:
            events, self._events = self._events, []
        try:
            self.client.events(events)
        except (TransportError, ProtocolError) as exc:
            log.debug("%d progress events dropped: %s", len(events), exc)

    def _heartbeat(self, every: float, lease: float) -> None:
        while not self._beats_done.wait(every):
            self._flush_events()
            self.env.trees.sweep(self.env.workdir_root, every=SWEEP_SECONDS)
            with self._lock:
                ids = sorted(self._running)
                # an attempt older than its lease cannot come back: forget it
                old = time.monotonic() - 2 * lease
                self._seen = {a: t for a, t in self._seen.items() if t >= old}
            # once a link broke, a claim's reply may have been lost with it: ask even
            # with nothing running, so that the boss hands those attempts over
            if not ids and self.client.reconnects <= 1:
                continue
            sent = time.monotonic()  # the boss renews after this: a safe lower bound
            try:
                cancel, adopt = self.client.beat(ids)
            except (BossGone, TransportError, ProtocolError) as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            if adopt:
                self._adopt(adopt)
            with self._lock:
                for attempt_id in set(ids) - set(cancel):
                    if attempt_id in self._running:
                        self._running[attempt_id].renewed = sent
                for attempt_id in cancel:
                    entry = self._running.get(attempt_id)
                    if entry is not None and not entry.cancel.is_set():
                        log.info("task %s: attempt %d cancelled by the boss",
                                 entry.assignment.name, attempt_id)
                        entry.cancel.set()

    def _fence(self, lease: float, attempt_id: int) -> str | None:
        """Why the attempt must not publish its outputs (None: it may).

        A worker cut off from the boss for longer than the lease may, as far as
        the boss knows, have lost the attempt: the task may already have run and
        published elsewhere, and a late copy must not replace that output. The
        boss refuses the late report; this keeps the late outputs out too. A
        lease renewed in time costs nothing here; a stale one is checked with
        the boss (a heartbeat) before anything is published.
        """
        with self._lock:
            entry = self._running.get(attempt_id)
            if entry is None:
                return None
            since = time.monotonic() - entry.renewed
            ids = sorted(self._running)
        if since <= lease:
            return None
        asked = time.monotonic()
        try:
            cancel, adopt = self.client.beat(ids)
        except (BossGone, TransportError, ProtocolError) as exc:
            return (f"its lease was last renewed {since:.1f} s ago (lease {lease:g} s) and "
                    f"the boss cannot say whether it is still current: {exc}")
        if adopt:
            self._adopt(adopt)
        if attempt_id in cancel:
            return (f"the boss no longer counts it as current (its lease was last renewed "
                    f"{since:.1f} s ago, lease {lease:g} s): the task may have run elsewhere")
        with self._lock:
            entry.renewed = asked
        return None

    def _adopt(self, assignments: list[Assignment]) -> None:
        """Take attempts whose claim's reply was lost into the reserve, to run them."""
        with self._changed:
            if self._stopping.is_set():
                return  # the goodbye requeues them
            for a in assignments:
                if self._first_time(a):
                    log.info("task %s: attempt %d taken over (its claim's reply was lost)",
                             a.name, a.attempt_id)
                    entry = _Running(a)
                    self._running[a.attempt_id] = entry
                    self._reserve.append(entry)
            self._changed.notify_all()

    def _join_all(self) -> None:
        """Wait for every slot thread to finish its attempt (reports are awaited after)."""
        with self._changed:
            while self._busy:  # each slot's exit notifies
                self._changed.wait(timeout=1.0)
