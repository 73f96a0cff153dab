"""The task and attempt state machines, as plain data and pure functions.

    waiting ──(parents succeeded)──> ready ──(claim)──> running
    running ──(success)──> succeeded
    running ──(failure, tries left)──> ready
    running ──(failure, tries spent)──> failed      (children: upstream_failed)
    running ──(lease expired)──> ready | failed     (lost: counted apart)
    waiting | ready | running ──(cancel)──> cancelled (children: upstream_failed)
    failed | upstream_failed | cancelled ──(retry)──> ready | waiting

The store applies these transitions in SQL; this module says which are
allowed and decides the outcome of a finished attempt, so the rules can be
tested without a database.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TaskState(StrEnum):
    WAITING = "waiting"
    READY = "ready"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UPSTREAM_FAILED = "upstream_failed"
    CANCELLED = "cancelled"


class AttemptState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    LOST = "lost"
    CANCELLED = "cancelled"


T = TaskState

TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    T.WAITING: frozenset({T.READY, T.CANCELLED, T.UPSTREAM_FAILED}),
    T.READY: frozenset({T.RUNNING, T.CANCELLED, T.WAITING, T.UPSTREAM_FAILED}),
    T.RUNNING: frozenset({T.SUCCEEDED, T.READY, T.FAILED, T.CANCELLED}),
    T.SUCCEEDED: frozenset(),
    T.FAILED: frozenset({T.READY, T.WAITING}),
    T.UPSTREAM_FAILED: frozenset({T.READY, T.WAITING}),
    T.CANCELLED: frozenset({T.READY, T.WAITING}),
}

TERMINAL = frozenset({T.SUCCEEDED, T.FAILED, T.UPSTREAM_FAILED, T.CANCELLED})
RETRYABLE = frozenset({T.FAILED, T.UPSTREAM_FAILED, T.CANCELLED})
# states whose task can still run, so a child waiting on it may still run too
ALIVE = frozenset({T.WAITING, T.READY, T.RUNNING})

# how many lost attempts (worker vanished) a task survives; they do not spend retries
MAX_LOST = 5


def allowed(src: TaskState, dst: TaskState) -> bool:
    return dst in TRANSITIONS[src]


@dataclass(frozen=True)
class Outcome:
    """What a finished attempt does to its task."""

    task_state: TaskState
    tries: int
    lost: int
    cascade: bool  # descendants become upstream_failed


def after_attempt(attempt: AttemptState, tries: int, lost: int, max_tries: int) -> Outcome:
    """Decide the task's next state once its running attempt ended as ``attempt``.

    ``tries`` and ``lost`` are the counts before this attempt. A lost attempt
    (its worker went silent) is counted apart from the task's own failures so
    that preemptions do not spend the user's retries, but it has its own cap
    so that a task that kills its worker every time cannot loop forever.
    """
    if attempt is AttemptState.SUCCEEDED:
        return Outcome(T.SUCCEEDED, tries + 1, lost, cascade=False)
    if attempt is AttemptState.CANCELLED:
        return Outcome(T.CANCELLED, tries, lost, cascade=True)
    if attempt is AttemptState.LOST:
        lost += 1
        if lost > MAX_LOST:
            return Outcome(T.FAILED, tries, lost, cascade=True)
        return Outcome(T.READY, tries, lost, cascade=False)
    if attempt in (AttemptState.FAILED, AttemptState.TIMEOUT):
        tries += 1
        if tries >= max_tries:
            return Outcome(T.FAILED, tries, lost, cascade=True)
        return Outcome(T.READY, tries, lost, cascade=False)
    raise ValueError(f"attempt state {attempt} is not an ending")


def initial_state(parent_states: list[TaskState]) -> TaskState:
    """State of a newly pushed (or retried) task given its parents' states."""
    if any(p in (T.FAILED, T.UPSTREAM_FAILED, T.CANCELLED) for p in parent_states):
        return T.UPSTREAM_FAILED
    if all(p is T.SUCCEEDED for p in parent_states):
        return T.READY
    return T.WAITING
