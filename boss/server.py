"""The RPC server (``boss serve``): one asyncio process, many worker connections.

Each connection (:class:`boss.connection.Connection`) speaks the
newline-delimited JSON of :mod:`protocol.messages`. The first call must be
``hello`` with the worker's token; the connection is then bound to that
worker and every later call acts as it. A malformed or unknown message gets
an error reply and changes nothing; a wrong token gets an error and the
connection is closed.

Database work never runs on the event loop. A call's arguments are checked
(:mod:`boss.handlers`) and the call goes to the :class:`GroupCommit`, which
hands everything that arrived while the previous transaction ran to
:meth:`boss.service.Boss.apply` as one batch, in one transaction, on one
database thread: with 100 workers finishing at once there is one commit, not
100 (the ecloud seed's "overloads as soon as too many tasks finish at once").

The lease reaper runs in the same loop: every ``reap_seconds`` attempts past
their lease are marked lost and their tasks requeued.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

from boss import calls, handlers
from boss.checkpoints import Checkpointer
from boss.connection import Connection
from boss.errors import BossError, DatabaseError, UserError
from boss.group_commit import GroupCommit
from boss.scaler import Scaler
from boss.service import Boss
from protocol import messages
from protocol.errors import Code, ProtocolError

if TYPE_CHECKING:
    from boss.amqp import EventPublisher

log = logging.getLogger(__name__)


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
        self._connections: set[Connection] = set()
        self._greetings: set[asyncio.Task[None]] = set()  # hellos being answered
        self._reaper: asyncio.Task[None] | None = None
        self.scaler = scaler
        self._scaling: asyncio.Task[None] | None = None
        # provider calls block (HTTP, SSH): their own thread, never the loop or the DB thread
        self._scale_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scaler")
        self._events: EventPublisher | None = None  # [events] amqp_url
        self.checkpoints: Checkpointer | None = None  # SQLite's, off the commit path

    async def start(self) -> int:
        """Bind and start serving; return the port (useful when 0 asked for any)."""
        if self.boss.settings.events.amqp_url:
            from boss.amqp import EventPublisher  # pika is imported only when asked for

            # built first: a bad [events] setting stops `boss serve` before it binds
            self._events = EventPublisher.from_settings(self.boss)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self._accept, self.host, self.port)
        except OSError as exc:
            raise UserError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}; "
                            "is another `boss serve` running? ([boss] listen)") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        # local workers are told this port (it may have been 0: any free one)
        self.boss.settings.boss.listen = f"{self.host}:{self.port}"
        engine = self.boss.store.engine
        if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            self.checkpoints = Checkpointer(self.boss.store)
            self.checkpoints.start()
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
            # a connection left open past the loop's end is closed by the garbage
            # collector (a ResourceWarning). One accepted just before the listener
            # closed is made a loop iteration later, hence the yield and the second look.
            for _ in range(3):
                await asyncio.sleep(0)
                if not self._connections:
                    break
                waits = [conn.closed for conn in self._connections]
                for conn in list(self._connections):
                    conn.close()  # as if the worker hung up
                await asyncio.gather(*waits, return_exceptions=True)
            if self._greetings:
                await asyncio.gather(*self._greetings, return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        self.commits.close()
        if self.checkpoints is not None:
            await loop.run_in_executor(None, self.checkpoints.stop)
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

    def _accept(self) -> Connection:
        conn = Connection(self._line, self._connections.discard)
        self._connections.add(conn)
        return conn

    def _line(self, conn: Connection, line: bytes) -> None:
        """Answer one request line: at once when it is refused, else once its call is
        committed (the connection's other calls go on meanwhile)."""
        try:
            req = messages.parse_request(line)
        except ProtocolError as exc:
            conn.send(messages.error(messages.request_id(line), exc.code, exc.message))
            return
        if req.call == "hello":
            conn.greeting()  # what follows acts as the worker the hello names
            task = asyncio.get_running_loop().create_task(self._greet(conn, req))
            self._greetings.add(task)
            task.add_done_callback(self._greetings.discard)
            return
        try:
            if conn.worker is None:
                raise ProtocolError(Code.UNAUTHORIZED, "say hello (with your token) first")
            who = handlers.Caller(conn.worker.id, self.boss.settings.boss.lease_seconds)
            call, reply = handlers.prepare(req.call, who, req.args)
        except Exception as exc:
            self._refuse(conn, req, exc)
            return
        self.commits.enqueue(call, partial(self._answered, conn, req, reply))

    def _answered(self, conn: Connection, req: messages.Request, reply: handlers.Reply,
                  answer: Any) -> None:
        try:
            if isinstance(answer, BaseException):
                raise answer
            result = reply(answer)
        except Exception as exc:
            self._refuse(conn, req, exc)
            return
        out = (messages.ok_json(req.id, result) if isinstance(result, str)
               else messages.ok(req.id, result))
        if req.call == "goodbye":
            log.info("worker %s said goodbye: %s", conn.worker.name if conn.worker else "?",
                     req.args.get("reason") or "-")
            conn.worker = None
        conn.send(out, close=req.call == "goodbye")

    def _refuse(self, conn: Connection, req: messages.Request, exc: Exception) -> None:
        """The error reply to a request; a wrong token also ends the connection."""
        if isinstance(exc, ProtocolError):
            conn.send(messages.error(req.id, exc.code, exc.message),
                      close=exc.code == Code.UNAUTHORIZED)
        elif isinstance(exc, DatabaseError):  # retried already; the worker waits and asks again
            conn.send(messages.error(req.id, Code.UNAVAILABLE, str(exc)))
        elif isinstance(exc, UserError):
            conn.send(messages.error(req.id, Code.INTERNAL, str(exc)))
        else:
            log.error("call %s from %s", req.call, conn.peer, exc_info=exc)
            conn.send(messages.error(req.id, Code.INTERNAL, f"{type(exc).__name__}: {exc}"))

    async def _greet(self, conn: Connection, req: messages.Request) -> None:
        try:
            result = await self._hello(conn, req.args)
        except Exception as exc:
            self._refuse(conn, req, exc)
        else:
            conn.send(messages.ok(req.id, result))
        finally:
            conn.greeted()

    async def _hello(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
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
        # what is loaded by now (modules, settings, compiled statements) lives as long
        # as the process: out of the collector's sight, a full collection no longer
        # walks it, which had cost a tenth of the boss's CPU under load (benchmark 3)
        gc.collect()
        gc.freeze()
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
