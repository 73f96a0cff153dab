"""Worker calls as plain values, so the RPC server can apply many in one transaction.

The server turns each request into one of these and hands a batch of them to
:meth:`boss.service.Boss.apply`, which runs the whole batch in one database
transaction (group commit): its pops and completes set-based, a statement per
kind of row (:mod:`boss.store.batch`), the other calls each under a
savepoint; a call that fails rolls back alone (the batch is then applied call
by call), the others commit together. The CLI's single transitions
(:meth:`Boss.claim`, :meth:`Boss.complete`...) are batches of one, so there is
one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.messages import Result


@dataclass(frozen=True)
class Hello:
    """Authenticate a connection: the answer is a WorkerIdentity or None."""

    token: str
    address: str | None = None
    slots: int | None = None


@dataclass(frozen=True)
class Pop:
    """Claim up to ``n`` tasks: the answer is a PopAnswer."""

    worker_id: int
    n: int


@dataclass(frozen=True)
class Heartbeat:
    """Renew leases: the answer is a ``Beat`` (attempts to cancel, attempts to hand over
    again because their claim's reply never reached the worker)."""

    worker_id: int
    attempt_ids: tuple[int, ...]


@dataclass(frozen=True)
class Complete:
    """End an attempt: the answer is an Ended, or None when the attempt is not current."""

    worker_id: int | None
    result: Result


@dataclass(frozen=True)
class Event:
    """A progress event of a running attempt: the answer is True, or False if not current."""

    worker_id: int
    attempt_id: int
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float | None = None  # when it happened (the worker's clock, bounded by the server)


@dataclass(frozen=True)
class Events:
    """Progress events of one worker's attempts, applied together: the answer is the
    sorted ids of the attempts that are not current (their events are dropped)."""

    worker_id: int
    items: tuple[Event, ...]


@dataclass(frozen=True)
class CompleteAndPop:
    """A worker's slot reports its attempt (with the events still queued) and asks for
    up to ``n`` more tasks, in one call: the answer is ``(Ended | None, PopAnswer | None)``.

    No task is claimed when the result is not current: the worker would drop it.
    """

    worker_id: int
    result: Result
    events: tuple[Event, ...] = ()
    n: int = 0


@dataclass(frozen=True)
class CompleteMany:
    """A worker reports several attempts at once (with the events still queued) and asks
    for up to ``n`` more tasks: the answer is ``(list[Ended | None], PopAnswer | None)``,
    one Ended (or None: not current) per result, in order.

    Unlike :class:`CompleteAndPop` the tasks are claimed whatever became of the
    results: the reply tells the worker which results were refused, so it
    keeps the tasks either way.
    """

    worker_id: int
    results: tuple[Result, ...]
    events: tuple[Event, ...] = ()
    n: int = 0


@dataclass(frozen=True)
class Goodbye:
    """The worker leaves: its running attempts are lost (requeued)."""

    worker_id: int
    reason: str = ""


@dataclass(frozen=True)
class ExpireLeases:
    """The reaper: attempts past their lease are lost; the answer is the Ended list."""


Call = (Hello | Pop | Heartbeat | Complete | Event | Events | CompleteAndPop | CompleteMany
        | Goodbye | ExpireLeases)
