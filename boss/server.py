"""The RPC server (``boss serve``): one asyncio process, many worker connections.

Each connection speaks the newline-delimited JSON of :mod:`protocol.messages`,
one request at a time. The first call must be ``hello`` with the worker's
token; the connection is then bound to that worker and every later call acts
as it. A malformed or unknown message gets an error reply and changes
nothing; a wrong token gets an error and the connection is closed.

Database work never runs on the event loop. Calls go to a :class:`GroupCommit`,
which hands everything that arrived while the previous transaction ran to
:meth:`boss.service.Boss.apply` as one batch, in one transaction, on one
database thread: with 100 workers finishing at once there is one commit, not
100 (the ecloud seed's "overloads as soon as too many tasks finish at once").

The lease reaper runs in the same loop: every ``reap_seconds`` attempts past
their lease are marked lost and their tasks requeued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from boss import calls
from boss.errors import BossError, DatabaseError, UserError
from boss.scaler import Scaler
from boss.service import Beat, Boss, PopAnswer, WorkerIdentity
from boss.store import events as event_rows
from protocol import messages
from protocol.errors import Code, ProtocolError

if TYPE_CHECKING:
    from boss.amqp import EventPublisher

log = logging.getLogger(__name__)

MAX_BATCH = 512
MAX_EVENT_BYTES = 16 * 1024
MAX_EVENTS = 10_000
PIPELINE = 64  # requests of one connection answered at once
# a batch whose transaction failed on the database is retried for this long: under
# the workers' 30 s reply timeout, so that they get an answer rather than a timeout
DB_RETRY_SECONDS = 20.0
DB_RETRY_FIRST, DB_RETRY_CAP = 0.05, 2.0  # seconds between retries, doubling


class GroupCommit:
    """Queue calls; run each batch that accumulated in one transaction on one thread."""

    def __init__(self, boss: Boss, max_batch: int = MAX_BATCH) -> None:
        self.boss = boss
        self.max_batch = max_batch
        self._pending: list[tuple[calls.Call, asyncio.Future[Any]]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ecloud-db")
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0  # counters, for `boss serve` logs and the benchmarks
        self.calls = 0
        self._closed = False

    async def submit(self, call: calls.Call) -> Any:
        """Apply one call (batched with whatever else is waiting); raise its error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((call, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        answer = await future
        return answer

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                answers = await self._apply([call for call, _ in batch])
            except BossError as exc:  # the transaction itself failed: every call did
                answers = [exc] * len(batch)
            except Exception as exc:  # a bug; keep serving, answer "internal"
                log.exception("applying a batch of %d calls", len(batch))
                answers = [exc] * len(batch)
            self.batches += 1
            self.calls += len(batch)
            for (_, future), answer in zip(batch, answers, strict=True):
                if future.done():  # the connection went away meanwhile
                    continue
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)

    async def _apply(self, batch: list[calls.Call]) -> list[Any]:
        """Apply a batch; while its transaction fails on the database (locked, down,
        restarting) retry it, for up to DB_RETRY_SECONDS, saying so in the log.

        A failed transaction changed nothing, so running it again is safe; the
        calls wait instead of failing, and the workers never see the outage
        unless it outlasts the bound (their replies would time out after it).
        """
        loop = asyncio.get_running_loop()
        delay, since, tries = DB_RETRY_FIRST, 0.0, 0
        while True:
            try:
                answers = await loop.run_in_executor(self._executor, self.boss.apply, batch)
            except DatabaseError as exc:
                now = time.monotonic()
                why = " ".join(str(exc).split())  # drivers' messages span lines
                if not tries:
                    since = now
                if self._closed or now - since + delay > DB_RETRY_SECONDS:
                    log.error("database still unavailable after %.1f s and %d retries, "
                              "%d call(s) answered with the error: %s", now - since, tries,
                              len(batch), why)
                    raise
                if not tries:
                    log.warning("database unavailable (%s); retrying for up to %g s", why,
                                DB_RETRY_SECONDS)
                tries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, DB_RETRY_CAP)
                continue
            if tries:
                log.warning("database is back after %.1f s (%d retries)",
                            time.monotonic() - since, tries)
            return answers

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True)


@dataclass
class _Connection:
    peer: str
    worker: WorkerIdentity | None = None


Handler = Callable[[_Connection, dict[str, Any]], Awaitable[dict[str, Any]]]


class Closing(Exception):
    """Raised by a handler after which the connection must be closed."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply


class Server:
    """``boss serve``: the RPC server plus the lease reaper."""

    def __init__(self, boss: Boss, host: str = "127.0.0.1", port: int = 0,
                 scaler: Scaler | None = None) -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            # workers reach a remote boss through an SSH tunnel; the port is never exposed
            raise UserError(f"boss listen address {host!r}: only 127.0.0.1 is allowed")
        self.boss = boss
        self.host = host
        self.port = port
        self.commits = GroupCommit(boss)
        self._server: asyncio.Server | None = None
        # asyncio.Server.close() leaves accepted connections open: close() ends these
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.scaler = scaler
        self._scaling: asyncio.Task[None] | None = None
        # provider calls block (HTTP, SSH): their own thread, never the loop or the DB thread
        self._scale_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scaler")
        self._events: EventPublisher | None = None  # [events] amqp_url
        self._handlers: dict[str, Handler] = {
            "pop": self._pop, "heartbeat": self._heartbeat, "event": self._event,
            "complete": self._complete, "goodbye": self._goodbye,
        }

    async def start(self) -> int:
        """Bind and start serving; return the port (useful when 0 asked for any)."""
        if self.boss.settings.events.amqp_url:
            from boss.amqp import EventPublisher  # pika is imported only when asked for

            # built first: a bad [events] setting stops `boss serve` before it binds
            self._events = EventPublisher.from_settings(self.boss)
        try:
            self._server = await asyncio.start_server(
                self._serve_connection, self.host, self.port, limit=messages.MAX_LINE + 1)
        except OSError as exc:
            raise UserError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}; "
                            "is another `boss serve` running? ([boss] listen)") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        # local workers are told this port (it may have been 0: any free one)
        self.boss.settings.boss.listen = f"{self.host}:{self.port}"
        self._reaper = asyncio.create_task(self._reap())
        if self.scaler is not None:
            self._scaling = asyncio.create_task(self._scale())
        if self._events is not None:
            self._events.start()  # its own thread: the broker never slows a transition
        return self.port

    async def serve_until(self, stop: asyncio.Event) -> None:
        if self._server is None:
            await self.start()
        await stop.wait()
        await self.close()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for task in (self._reaper, self._scaling):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.scaler is not None:
            # stop the workers this boss started, while the server still answers
            # their goodbyes
            try:
                await loop.run_in_executor(self._scale_executor, self.scaler.shutdown)
            except BossError as exc:
                log.warning("stopping the workers: %s", exc)
        self._scale_executor.shutdown(wait=True)
        if self._server is not None:
            self._server.close()
            # a connection left open past the loop's end is destroyed while pending:
            # its socket is then closed by the garbage collector (a ResourceWarning).
            # One accepted just before the listener closed starts its task a loop
            # iteration later, hence the yield and the second look.
            for _ in range(3):
                await asyncio.sleep(0)
                if not self._connections:
                    break
                for writer in self._connections.values():
                    writer.close()  # its reader sees the end, as if the worker hung up
                await asyncio.gather(*self._connections, return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        self.commits.close()
        if self._events is not None:
            # last: the workers' goodbyes above are events too
            await loop.run_in_executor(None, self._events.stop)

    async def _reap(self) -> None:
        every = self.boss.settings.boss.reap_seconds
        while True:
            await asyncio.sleep(every)
            try:
                lost = await self.commits.submit(calls.ExpireLeases())
            except BossError as exc:
                log.warning("lease reaper: %s", exc)
                continue
            if lost:
                log.info("leases expired: %d attempt(s) lost and requeued", len(lost))

    async def _scale(self) -> None:
        assert self.scaler is not None
        loop = asyncio.get_running_loop()
        every = self.boss.settings.autoscale.tick_seconds
        while True:
            try:
                await loop.run_in_executor(self._scale_executor, self.scaler.tick)
            except BossError as exc:
                log.warning("autoscaler: %s", exc)
            except Exception:
                log.exception("autoscaler tick")
            await asyncio.sleep(every)

    # --- connections ------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        """Read requests; once the worker said hello, answer them concurrently.

        A worker's slots share one connection and send their calls without
        waiting for each other (each request carries its id): answering them
        side by side lets the calls of several slots land in one transaction.
        At most PIPELINE requests of a connection are in flight at once.
        """
        me = asyncio.current_task()
        if me is not None:
            self._connections[me] = writer
            me.add_done_callback(self._forget)
        peer = writer.get_extra_info("peername")
        conn = _Connection(peer=f"{peer[0]}:{peer[1]}" if peer else "?")
        in_flight: set[asyncio.Task[None]] = set()
        room = asyncio.Semaphore(PIPELINE)
        closing = asyncio.Event()

        async def reply(line: bytes) -> None:
            try:
                try:
                    out = await self.answer(conn, line)
                except Closing as done:
                    out = done.reply
                    closing.set()
                if not writer.is_closing():
                    writer.write(out)
                    await writer.drain()
                if closing.is_set():
                    writer.close()
            except (ConnectionError, OSError):
                closing.set()
            finally:
                room.release()

        try:
            while not closing.is_set():
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    break  # the worker closed the connection
                except asyncio.LimitOverrunError:
                    writer.write(messages.error(None, Code.MALFORMED,
                                                f"a line longer than {messages.MAX_LINE} bytes"))
                    break  # the stream cannot be resynchronised
                await room.acquire()
                if conn.worker is None:
                    await reply(line)  # hello first, alone: it binds the connection
                    continue
                task = asyncio.create_task(reply(line))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        except (ConnectionError, OSError):
            pass  # the worker went away; its leases will tell
        finally:
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
            if conn.worker is not None:
                log.info("worker %s (%s) disconnected", conn.worker.name, conn.peer)
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()
                await writer.wait_closed()

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._connections.pop(task, None)

    async def answer(self, conn: _Connection, line: bytes) -> bytes:
        """The reply line to one request line; never raises except Closing."""
        try:
            req = messages.parse_request(line)
        except ProtocolError as exc:
            return messages.error(messages.request_id(line), exc.code, exc.message)
        try:
            if req.call == "hello":
                return messages.ok(req.id, await self._hello(conn, req.args))
            if conn.worker is None:
                raise ProtocolError(Code.UNAUTHORIZED, "say hello (with your token) first")
            result = await self._handlers[req.call](conn, req.args)
            if req.call == "goodbye":
                raise Closing(messages.ok(req.id, result))
            return messages.ok(req.id, result)
        except ProtocolError as exc:
            reply = messages.error(req.id, exc.code, exc.message)
            if exc.code == Code.UNAUTHORIZED:
                raise Closing(reply) from None
            return reply
        except DatabaseError as exc:  # the boss retried already; the worker waits and retries
            return messages.error(req.id, Code.UNAVAILABLE, str(exc))
        except UserError as exc:
            return messages.error(req.id, Code.INTERNAL, str(exc))
        except Closing:
            raise
        except Exception as exc:
            log.exception("call %s from %s", req.call, conn.peer)
            return messages.error(req.id, Code.INTERNAL, f"{type(exc).__name__}: {exc}")

    # --- calls ------------------------------------------------------------------------

    async def _hello(self, conn: _Connection, args: dict[str, Any]) -> dict[str, Any]:
        token = messages.arg(args, "token", str)
        slots = messages.arg(args, "slots", int, None)
        host = messages.arg(args, "host", str, "")
        pid = messages.arg(args, "pid", int, 0)
        if slots is not None and not 0 < slots <= 1024:
            raise ProtocolError(Code.MALFORMED, "slots must be between 1 and 1024")
        identity = await self.commits.submit(
            calls.Hello(token, f"{host or conn.peer} pid {pid}", slots))
        if identity is None:
            raise ProtocolError(Code.UNAUTHORIZED, "unknown worker token (see `boss admin "
                                "add-worker`)")
        conn.worker = identity
        log.info("worker %s joined from %s with %d slot(s)", identity.name, conn.peer,
                 identity.slots)
        buckets, default = await asyncio.get_running_loop().run_in_executor(
            None, self.boss.buckets)
        s = self.boss.settings.boss
        return {"worker_id": identity.id, "name": identity.name,
                "lease_seconds": s.lease_seconds,
                "heartbeat_seconds": min(self.boss.settings.worker.heartbeat_seconds,
                                         s.lease_seconds / 3),
                "buckets": buckets, "default_bucket": default,
                "version": messages.VERSION}

    def _me(self, conn: _Connection) -> int:
        assert conn.worker is not None
        return conn.worker.id

    async def _pop(self, conn: _Connection, args: dict[str, Any]) -> dict[str, Any]:
        n = messages.arg(args, "n", int)
        if not 0 <= n <= 1024:
            raise ProtocolError(Code.MALFORMED, "n must be between 0 and 1024")
        answer: PopAnswer = await self.commits.submit(calls.Pop(self._me(conn), n))
        return self._pop_reply(answer)

    @staticmethod
    def _pop_reply(answer: PopAnswer) -> dict[str, Any]:
        if answer.tasks:
            return {"tasks": [a.to_wire() for a in answer.tasks]}
        if answer.drain:
            return {"drain": True}
        return {"none": True, "retry_after": answer.retry_after}

    async def _heartbeat(self, conn: _Connection, args: dict[str, Any]) -> dict[str, Any]:
        ids = _int_list(messages.arg(args, "attempts", list))
        beat: Beat = await self.commits.submit(calls.Heartbeat(self._me(conn), tuple(ids)))
        out: dict[str, Any] = {"cancel": beat.cancel}
        if beat.adopt:
            out["adopt"] = [a.to_wire() for a in beat.adopt]
        return out

    async def _event(self, conn: _Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Progress events, batched by the worker: ``events`` [{attempt_id, kind, data, ts}]."""
        items = self._parse_events(conn, messages.arg(args, "events", list))
        not_current = await self.commits.submit(calls.Events(self._me(conn), items))
        return {"not_current": not_current}

    def _parse_events(self, conn: _Connection, raw: list[Any]) -> tuple[calls.Event, ...]:
        """Events of a call, every one checked before any is applied."""
        if len(raw) > MAX_EVENTS:
            raise ProtocolError(Code.MALFORMED, f"more than {MAX_EVENTS} events in one call")
        now = time.time()
        return tuple(self._one_event(conn, e, now) for e in raw)

    def _one_event(self, conn: _Connection, e: Any, now: float) -> calls.Event:
        if not isinstance(e, dict):
            raise ProtocolError(Code.MALFORMED, "each event must be an object")
        attempt_id = messages.arg(e, "attempt_id", int)
        kind = messages.arg(e, "kind", str)
        data = messages.arg(e, "data", dict, {})
        ts = messages.arg(e, "ts", (int, float), now)
        if kind not in event_rows.WORKER_KINDS:
            raise ProtocolError(Code.MALFORMED, f"event kind {kind[:80]!r} is not one of "
                                + ", ".join(sorted(event_rows.WORKER_KINDS)))
        if len(messages.encode(data)) > MAX_EVENT_BYTES:
            raise ProtocolError(Code.MALFORMED, f"event data over {MAX_EVENT_BYTES} bytes")
        # the worker's clock stamps when it happened; never trust it beyond a lease's span
        lease = self.boss.settings.boss.lease_seconds
        return calls.Event(self._me(conn), attempt_id, kind, data,
                           ts=min(max(float(ts), now - lease), now))

    async def _complete(self, conn: _Connection, args: dict[str, Any]) -> dict[str, Any]:
        """A result; with ``events`` (still queued at the worker) and ``pop`` (how many
        tasks the freed slot takes next), all in one call and one transaction."""
        result = messages.Result.from_wire(args)
        items = self._parse_events(conn, messages.arg(args, "events", list, []))
        n = messages.arg(args, "pop", int, 0)
        if not 0 <= n <= 1024:
            raise ProtocolError(Code.MALFORMED, "pop must be between 0 and 1024")
        ended, popped = await self.commits.submit(
            calls.CompleteAndPop(self._me(conn), result, items, n))
        if ended is None:
            raise ProtocolError(Code.NOT_CURRENT, f"attempt {result.attempt_id} is no longer "
                                "current (lost, cancelled or not this worker's): result "
                                "discarded")
        out: dict[str, Any] = {"accepted": True, "task_state": str(ended.task_state)}
        if popped is not None:
            out.update(self._pop_reply(popped))
        return out

    async def _goodbye(self, conn: _Connection, args: dict[str, Any]) -> dict[str, Any]:
        reason = messages.arg(args, "reason", str, "")
        await self.commits.submit(calls.Goodbye(self._me(conn), reason[:500]))
        log.info("worker %s said goodbye: %s", conn.worker.name if conn.worker else "?",
                 reason or "-")
        conn.worker = None
        return {}


def _int_list(values: list[Any]) -> list[int]:
    if len(values) > 100_000 or not all(
            isinstance(v, int) and not isinstance(v, bool) and messages.fits_int64(v)
            for v in values):
        raise ProtocolError(Code.MALFORMED, "attempts must be a list of attempt ids")
    return values


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; return the soft limit.

    Every connected worker holds a file descriptor for as long as it runs, and a
    common soft default is 1,024: near 1,000 workers accept() failed with EMFILE
    and SQLite could not open its files (benchmarks/many_workers.py).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard  # the kernel's usual nr_open
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the limit on open files from %d: %s", soft, exc)
    return soft


def serve(boss: Boss, on_ready: Callable[[int], None] | None = None,
          scaler: Scaler | None = None) -> None:
    """Run the server until SIGINT or SIGTERM (the `boss serve` command)."""
    host, _, port = boss.settings.boss.listen.rpartition(":")
    raise_fd_limit()

    async def main() -> None:
        server = Server(boss, host, int(port), scaler)
        bound = await server.start()
        if on_ready is not None:
            on_ready(bound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await server.serve_until(stop)

    asyncio.run(main())


@contextlib.contextmanager
def serving(boss: Boss, port: int = 0, scaler: Scaler | None = None) -> Iterator[Server]:
    """Run a Server in a background thread until the block ends (`boss run`, tests)."""
    loop = asyncio.new_event_loop()
    server = Server(boss, "127.0.0.1", port, scaler)
    stop: asyncio.Event | None = None
    started = threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            await server.start()
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        await server.serve_until(stop)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),),
                              name="boss-serve", daemon=True)
    thread.start()
    started.wait(60)
    if failure or not started.is_set():
        thread.join(10)
        loop.close()
        raise failure[0] if failure else DatabaseError("the server did not start in 60 s")
    try:
        yield server
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(120)
        loop.close()
