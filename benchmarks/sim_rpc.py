"""A simulated worker's side of the boss protocol, spoken directly over TCP.

The load generator of benchmarks 3 and 5 (rpc_capacity, many_workers): one
asyncio protocol per worker connection, requests pipelined and replies matched
by id, with the latency of every call. A load generator, not a test double:
it speaks the same newline-delimited JSON as ``worker run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

CALL_TIMEOUT = 60.0  # seconds without a reply: counted as a timeout, never waited past


class CallFailed(Exception):
    """An error reply, a broken connection or no reply within CALL_TIMEOUT."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind  # "error", "timeout" or "connection"


class Rpc(asyncio.Protocol):
    """One worker's connection: requests pipelined, replies matched by id.

    A protocol with one future per call and one watchdog per connection for
    the timeouts (not ``asyncio.wait_for``, a task per call): the generator's
    own CPU per call is CPU the boss under test does not get on this machine.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ids = 0
        # id -> (its future, when sent, when it times out)
        self.waiting: dict[int, tuple[asyncio.Future[tuple[dict[str, Any], float]],
                                      float, float]] = {}
        self.partial = b""
        self.done = asyncio.get_running_loop().create_future()
        self.why = "the boss closed the connection"

    @classmethod
    async def connect(cls, port: int) -> Rpc:
        _, rpc = await asyncio.get_running_loop().create_connection(cls, "127.0.0.1", port)
        return rpc

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.watchdog = asyncio.get_running_loop().create_task(self._watch())

    def data_received(self, data: bytes) -> None:
        got = time.perf_counter()  # the reply's arrival, not when its caller wakes
        end = data.rfind(b"\n")
        if end < 0:
            self.partial += data
            return
        block, self.partial = self.partial + data[:end], data[end + 1:]
        for line in block.split(b"\n"):
            try:
                obj = json.loads(line)
            except ValueError as exc:
                self.fail(f"ValueError: {exc}")
                return
            entry = self.waiting.pop(obj.get("id"), None)
            if entry is not None and not entry[0].done():
                entry[0].set_result((obj, got))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"{type(exc).__name__}: {exc}" if exc else self.why)

    def fail(self, why: str, kind: str = "connection") -> None:
        for future, _, _ in self.waiting.values():
            if not future.done():
                future.set_exception(CallFailed(kind, why))
        self.waiting.clear()
        if not self.done.done():
            self.done.set_result(None)
        self.watchdog.cancel()
        if self.transport is not None:
            self.transport.close()

    async def _watch(self) -> None:
        """Fail the calls that waited past their timeout; runs until the connection ends."""
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            for rid, (future, sent, deadline) in list(self.waiting.items()):
                if now > deadline:
                    del self.waiting[rid]
                    if not future.done():
                        future.set_exception(CallFailed(
                            "timeout", f"no reply in {deadline - sent:g} s"))

    async def call(self, name: str, args: dict[str, Any], timeout: float = CALL_TIMEOUT
                   ) -> tuple[dict[str, Any], float]:
        """The result of one call and its latency in ms; CallFailed otherwise."""
        if self.done.done() or self.transport is None:
            raise CallFailed("connection", "the connection is closed")
        self.ids += 1
        rid = self.ids
        future: asyncio.Future[tuple[dict[str, Any], float]] = \
            asyncio.get_running_loop().create_future()
        sent = time.perf_counter()
        self.waiting[rid] = (future, sent, sent + timeout)
        self.transport.write(json.dumps({"v": 1, "id": rid, "call": name, "args": args},
                                        separators=(",", ":")).encode() + b"\n")
        obj, got = await future
        if not obj.get("ok"):
            err = obj.get("error") or {}
            raise CallFailed("error", f"{name}: {err.get('code')}: {err.get('message')}")
        return obj.get("result") or {}, (got - sent) * 1000

    async def hello(self, token: str, slots: int = 1) -> dict[str, Any]:
        result, _ = await self.call("hello", {"token": token, "slots": slots, "host": "sim",
                                              "pid": os.getpid(), "version": 1})
        return result

    async def close(self, goodbye: bool = True) -> None:
        if goodbye and not self.done.done():
            try:
                await self.call("goodbye", {"reason": "benchmark done"}, timeout=30)
            except CallFailed:
                pass
        self.watchdog.cancel()
        if self.transport is not None:
            self.transport.close()


def succeeded(attempt_id: int) -> dict[str, Any]:
    return {"attempt_id": attempt_id, "outcome": "succeeded", "exit_status": 0,
            "metrics": {"wall": 0.0}}
