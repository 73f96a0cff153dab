"""One worker's connection to ``boss serve``: lines in, one reply per line out.

An :class:`asyncio.Protocol`, not a stream reader with a task per request:
at thousands of calls a second the loop's per-request coroutines, tasks and
semaphores cost more than the calls (benchmarks/RESULTS.md, benchmark 3).
Lines are cut from what the socket delivers and handed to the server one by
one; the server answers each exactly once, through :meth:`Connection.send`,
whenever its batch is committed, so a worker's slots have several calls in
flight side by side (each request carries its id).

Order and back pressure:

- a ``hello`` binds the connection to its worker: the lines that come after
  it wait until it is answered, so that they act as that worker (before
  ``hello``, any other call is refused and the connection closed);
- at most ``PIPELINE`` calls of one connection are in flight; past that, and
  while the worker does not read its replies (the write buffer is full), the
  connection stops reading;
- a line longer than :data:`protocol.messages.MAX_LINE` gets an error and
  ends the connection: the stream cannot be resynchronised.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from protocol import messages
from protocol.errors import Code

if TYPE_CHECKING:
    from boss.transitions import WorkerIdentity

log = logging.getLogger(__name__)

PIPELINE = 64  # calls of one connection in flight at once


class Connection(asyncio.Protocol):
    """The protocol of one accepted connection; ``on_line(conn, line)`` answers lines."""

    def __init__(self, on_line: Callable[[Connection, bytes], None],
                 on_close: Callable[[Connection], None]) -> None:
        self._on_line = on_line
        self._on_close = on_close
        self.peer = "?"
        self.worker: WorkerIdentity | None = None  # set by a successful hello
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._partial = bytearray()  # the start of a line not yet whole
        self._in_flight = 0
        self._held: deque[bytes] = deque()  # lines read while a hello is answered
        self._greeting = False
        self._reading = True
        self._writable = True
        self._closing = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def data_received(self, data: bytes) -> None:
        end = data.rfind(b"\n")
        if end < 0:
            self._partial += data  # a bytearray: a long line in many pieces is not quadratic
            if len(self._partial) > messages.MAX_LINE:
                self._too_long()
            return
        if self._partial:
            self._partial += data[:end]
            block = bytes(self._partial)
            self._partial = bytearray()
        else:
            block = data[:end]
        for line in block.split(b"\n"):
            if self._closing:
                return
            if len(line) > messages.MAX_LINE:
                self._too_long()
                return
            self._take(line)
        self._partial += data[end + 1:]
        if len(self._partial) > messages.MAX_LINE:
            self._too_long()

    def pause_writing(self) -> None:
        self._writable = False
        self._pace()

    def resume_writing(self) -> None:
        self._writable = True
        self._pace()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._held.clear()
        if self.worker is not None:
            log.info("worker %s (%s) disconnected", self.worker.name, self.peer)
        self._on_close(self)
        if not self.closed.done():
            self.closed.set_result(None)

    # --- calls in and replies out ---------------------------------------------------------

    def _take(self, line: bytes) -> None:
        if self._greeting or self._held:
            self._held.append(line)  # after a hello: wait until it is answered
            return
        self._in_flight += 1
        self._pace()
        self._on_line(self, line)

    def greeting(self) -> None:
        """A hello is being answered: hold the lines after it until :meth:`greeted`."""
        self._greeting = True

    def greeted(self) -> None:
        self._greeting = False
        while self._held and not self._greeting and not self._closing:
            line = self._held.popleft()
            self._in_flight += 1
            self._pace()
            self._on_line(self, line)

    def send(self, reply: bytes, *, close: bool = False) -> None:
        """The one reply to a line taken; with ``close``, the connection ends after it."""
        self._in_flight -= 1
        if self._closing or self.transport is None:
            return
        self.transport.write(reply)
        if close:
            self.close()
        else:
            self._pace()

    def close(self) -> None:
        """End the connection (what was written still goes out)."""
        self._closing = True
        self._held.clear()
        if self.transport is not None:
            self.transport.close()

    def _too_long(self) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(messages.error(
                None, Code.MALFORMED, f"a line longer than {messages.MAX_LINE} bytes"))
        self._partial = bytearray()
        self.close()

    def _pace(self) -> None:
        """Read while fewer than PIPELINE calls are in flight and replies can go out."""
        if self.transport is None or self._closing:
            return
        want = self._in_flight < PIPELINE and self._writable
        if want != self._reading:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def __repr__(self) -> str:
        who: Any = self.worker.name if self.worker is not None else "unbound"
        return f"<Connection {self.peer} {who}>"
