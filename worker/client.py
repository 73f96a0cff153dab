"""The worker's RPC client: calls over one channel, reconnecting with backoff.

One :class:`BossClient` per worker process, shared by its slot threads. Calls
do not wait for each other: each request carries an id, several can be in
flight on the one channel (:class:`_Link`), and whichever caller is waiting
reads the next reply and hands it to its owner, so the boss can answer the
slots' calls side by side and commit them together. When the channel breaks, the
client reconnects with jittered exponential backoff and says ``hello`` again
before repeating the call; running attempts carry on meanwhile and report
when the boss is back. A call made with ``reconnect=False`` (progress events)
fails at once instead, so that an attempt never waits for the boss just to
report progress.

Retried calls are safe: ``heartbeat`` and ``event`` are idempotent; a
``complete`` that was applied before its reply was lost is refused as
``not_current`` on the retry, which :meth:`BossClient.complete` treats as
"already reported"; a ``pop`` whose reply was lost leaves attempts that
nobody runs, which their lease turns into lost attempts that are requeued.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from protocol import messages
from protocol.errors import Code, ProtocolError
from protocol.messages import Assignment, Result
from worker.backoff import backoff_delays
from worker.transport import Channel, Transport, TransportError, TransportRefused

log = logging.getLogger(__name__)


class BossGone(TransportError):
    """The boss stayed unreachable for longer than the worker was told to wait."""


@dataclass
class Welcome:
    """The boss's answer to ``hello``."""

    worker_id: int
    name: str
    lease_seconds: float
    heartbeat_seconds: float
    buckets: dict[str, str] = field(default_factory=dict)
    default_bucket: str = ""


@dataclass
class PopReply:
    tasks: list[Assignment]
    retry_after: float = 0.0
    drain: bool = False


class BossClient:
    """Calls to the boss; thread-safe; reconnects until ``give_up_after`` seconds."""

    def __init__(self, transport: Transport, token: str, *, slots: int,
                 give_up_after: float = 3600.0, backoff_base: float = 0.5,
                 backoff_cap: float = 30.0, stop: threading.Event | None = None) -> None:
        self.transport = transport
        self._token = token
        self.slots = slots
        self.give_up_after = give_up_after
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.stop = stop or threading.Event()
        self.welcome: Welcome | None = None
        self._link: _Link | None = None
        self._lock = threading.Lock()  # (re)connecting, hello and goodbye
        self.reconnects = 0

    # --- the calls ----------------------------------------------------------------------

    def hello(self) -> Welcome:
        self._ensure(reconnect=True)
        assert self.welcome is not None
        return self.welcome

    def pop(self, n: int) -> PopReply:
        return _pop_reply(self.call("pop", {"n": n}))

    def heartbeat(self, attempt_ids: list[int]) -> list[int]:
        return self.beat(attempt_ids)[0]

    def beat(self, attempt_ids: list[int]) -> tuple[list[int], list[Assignment]]:
        """Renew the leases of ``attempt_ids``; return the attempts to cancel, and those
        the boss claimed for this worker whose reply never arrived (to run them)."""
        r = self.call("heartbeat", {"attempts": attempt_ids})
        return ([int(a) for a in r["cancel"]],
                [Assignment.from_wire(t) for t in r.get("adopt", [])])

    def events(self, events: list[dict[str, Any]]) -> None:
        """Send queued progress events ({attempt_id, kind, data, ts}) in one call."""
        if events:
            self.call("event", {"events": events}, reconnect=False)

    def complete(self, result: Result, events: list[dict[str, Any]] | None = None,
                 pop: int = 0) -> tuple[bool, PopReply | None]:
        """Report a result, with the events still queued, and take up to ``pop`` more
        tasks for the freed slot, in one call. Returns whether the boss took the result
        (False: not current any more) and, when ``pop``, what it handed out.
        """
        args = result.to_wire()
        if events:
            args["events"] = events
        if pop:
            args["pop"] = pop
        try:
            r = self.call("complete", args)
        except ProtocolError as exc:
            if exc.code == Code.NOT_CURRENT:
                log.warning("attempt %s: %s", result.attempt_id, exc.message)
                return False, None
            raise
        return True, (_pop_reply(r) if pop else None)

    def complete_many(self, results: list[Result], events: list[dict[str, Any]] | None = None,
                      pop: int = 0) -> tuple[list[bool], PopReply | None]:
        """:meth:`complete` for several results in one call (the batched form): whether
        the boss took each, and what it handed out for ``pop``."""
        args: dict[str, Any] = {"results": [r.to_wire() for r in results]}
        if events:
            args["events"] = events
        if pop:
            args["pop"] = pop
        r = self.call("complete", args)
        taken = r.get("results")
        if not isinstance(taken, list) or len(taken) != len(results):
            raise ProtocolError(Code.MALFORMED, "the reply to a batched complete does not "
                                "answer each result")
        accepted = []
        for result, answer in zip(results, taken, strict=True):
            ok = isinstance(answer, dict) and answer.get("accepted") is True
            if not ok:
                why = answer.get("error", {}) if isinstance(answer, dict) else {}
                log.warning("attempt %s: %s", result.attempt_id,
                            why.get("message", "refused") if isinstance(why, dict) else why)
            accepted.append(ok)
        return accepted, (_pop_reply(r) if pop else None)

    def goodbye(self, reason: str) -> None:
        """Leave; best effort (the boss's leases cover a worker that vanishes)."""
        with self._lock:
            link = self._link
            if link is None:
                return
            try:
                link.roundtrip("goodbye", {"reason": reason})
            except (TransportError, ProtocolError) as exc:
                log.info("goodbye not delivered: %s", exc)
            self._drop(link)

    def close(self) -> None:
        with self._lock:
            if self._link is not None:
                self._drop(self._link)

    def call(self, name: str, args: dict[str, Any], *, reconnect: bool = True
             ) -> dict[str, Any]:
        """One request/reply; reconnect and repeat on a broken link (unless told not to).

        Raise ProtocolError for an error reply, BossGone when the boss stays away
        past ``give_up_after``, TransportRefused when retrying cannot help.
        """
        for _ in self._attempts(reconnect):
            link = self._ensure(reconnect)
            try:
                return link.roundtrip(name, args)
            except TransportError as exc:
                self._drop(link)
                if not reconnect:
                    raise
                log.warning("lost the boss during %s: %s", name, exc)
            except ProtocolError as exc:
                if exc.code == Code.UNAUTHORIZED:
                    # the boss restarted or forgot us mid-connection: hello again
                    self._drop(link)
                    continue
                if exc.code == Code.UNAVAILABLE and reconnect:
                    # its database is down past the boss's own retries: wait, ask again
                    log.warning("the boss could not answer %s: %s; retrying", name,
                                exc.message)
                    continue
                raise
        raise BossGone("stopped while waiting for the boss")

    # --- the link -----------------------------------------------------------------------

    def _attempts(self, reconnect: bool) -> Iterator[int]:
        yield 0
        if not reconnect:
            return
        yield 1  # a broken channel is retried once at once, then with backoff
        deadline = time.monotonic() + self.give_up_after
        cap = self.backoff_cap
        if self.welcome is not None:
            # the running attempts' leases run while the boss is away: once it is back,
            # the worker must be too before they expire, not one long backoff later
            cap = max(min(cap, self.welcome.lease_seconds / 4), self.backoff_base)
        for n, delay in enumerate(backoff_delays(self.backoff_base, cap), 2):
            if self.stop.is_set():
                return
            if time.monotonic() + delay > deadline:
                raise BossGone(f"the boss ({self.transport!r}) has been unreachable for "
                               f"{self.give_up_after:g} s; giving up")
            self.stop.wait(delay)
            yield n

    def _ensure(self, reconnect: bool) -> _Link:
        with self._lock:
            if self._link is not None:
                return self._link
            last: Exception | None = None
            for _ in self._attempts(reconnect):
                try:
                    channel = self.transport.connect()
                except TransportRefused:
                    raise
                except TransportError as exc:
                    last = exc
                    log.warning("cannot reach the boss: %s", exc)
                    continue
                link = _Link(channel)
                try:
                    self.welcome = self._hello(link)
                except TransportError as exc:
                    link.close()
                    last = exc
                    continue
                except ProtocolError as exc:
                    if exc.code != Code.UNAVAILABLE or not reconnect:
                        link.close()
                        raise
                    link.close()  # the boss is up, its database is not: wait, say hello again
                    log.warning("the boss could not answer hello: %s; retrying", exc.message)
                    last = TransportError(exc.message)
                    continue
                if last is not None:
                    log.info("reconnected to the boss")
                self._link = link
                self.reconnects += 1
                return link
            raise BossGone(f"the boss is unreachable: {last}") if last else BossGone(
                "stopped while connecting to the boss")

    def _hello(self, link: _Link) -> Welcome:
        r = link.roundtrip("hello", {
            "token": self._token, "slots": self.slots, "host": socket.gethostname(),
            "pid": os.getpid(), "version": messages.VERSION})
        return Welcome(int(r["worker_id"]), str(r["name"]), float(r["lease_seconds"]),
                       float(r["heartbeat_seconds"]), dict(r.get("buckets", {})),
                       str(r.get("default_bucket", "")))

    def _drop(self, link: _Link) -> None:
        """Close a broken link; a newer one another thread made meanwhile stays."""
        link.close()
        if self._link is link:
            self._link = None


class _Link:
    """One channel with several requests in flight, replies matched by request id.

    There is no reader thread: a caller waiting for its reply reads the next
    line if nobody else is reading, and hands it to whichever caller it
    belongs to. Reading therefore happens only while a call waits, so the
    channel's own timeout still means "the boss did not answer in time".
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._send = threading.Lock()
        self._cond = threading.Condition()
        # id -> the decoded reply (a dict), None while waited for
        self._replies: dict[int, dict[str, Any] | None] = {}
        self._reading = False
        self._broken: TransportError | None = None
        self._ids = 0

    def roundtrip(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            if self._broken is not None:
                raise TransportError(str(self._broken))
            self._ids += 1
            rid = self._ids
            self._replies[rid] = None
        try:
            with self._send:
                self.channel.send(messages.request(rid, name, args))
            reply = self._wait(rid)
        finally:
            with self._cond:
                self._replies.pop(rid, None)
        reply_id, result = messages.reply_of(reply)
        if reply_id != rid:  # pragma: no cover - _wait routes by id
            raise TransportError(f"reply {reply_id} to request {rid}: out of step")
        return result

    def _wait(self, rid: int) -> dict[str, Any]:
        while True:
            with self._cond:
                while True:
                    if self._broken is not None:
                        raise TransportError(str(self._broken))
                    reply = self._replies.get(rid)
                    if reply is not None:
                        return reply
                    if not self._reading:
                        self._reading = True
                        break
                    self._cond.wait()
            try:
                got = self.channel.recv_line()
            except TransportError as exc:
                self._fail(exc)
                raise
            decoded = messages.decode(got)  # once: the caller reads this same object
            owner = messages.message_id(decoded)
            with self._cond:
                self._reading = False
                if owner is None or owner not in self._replies:
                    # a reply nobody asked for: the stream cannot be trusted any more
                    self._broken = TransportError(
                        f"a reply to request {owner} that no call is waiting for: out of step")
                    self.channel.close()
                else:
                    self._replies[owner] = decoded
                self._cond.notify_all()

    def _fail(self, exc: TransportError) -> None:
        with self._cond:
            self._reading = False
            self._broken = exc
            self._cond.notify_all()

    def close(self) -> None:
        self._fail(TransportError("the link to the boss was closed"))
        self.channel.close()


def _pop_reply(r: dict[str, Any]) -> PopReply:
    if r.get("drain"):
        return PopReply([], drain=True)
    tasks = [Assignment.from_wire(t) for t in r.get("tasks", [])]
    return PopReply(tasks, retry_after=float(r.get("retry_after", 0.0)))
