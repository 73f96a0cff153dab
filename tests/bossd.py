"""`boss serve` in a background thread of the test process, on a free port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from boss.server import Server
from boss.service import Boss


@contextmanager
def serving(boss: Boss, port: int = 0) -> Iterator[Server]:
    """Run a Server for ``boss`` until the block ends; ``server.port`` is bound."""
    loop = asyncio.new_event_loop()
    server = Server(boss, "127.0.0.1", port)
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

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30), "the server did not start within 30 s"
    if failure:
        thread.join(10)
        loop.close()
        raise failure[0]
    try:
        yield server
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()
