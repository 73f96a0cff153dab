"""Group commit: the calls that arrive while one transaction runs go in the next.

The RPC server hands every worker call to :meth:`GroupCommit.enqueue` with a
callback. Whatever accumulated while the previous batch ran is applied as one
batch, in one transaction, by :meth:`boss.service.Boss.apply` on the one
database thread; then every call's callback runs on the event loop with its
answer (or its error). With 100 workers finishing at once there is one commit,
not 100 (the ecloud seed's "overloads as soon as too many tasks finish at
once").

Callbacks, not a future and a task per call: at thousands of calls a second
the event loop's own bookkeeping per call was a large share of the boss's CPU
(benchmarks/RESULTS.md, benchmark 3).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from boss import calls
from boss.errors import BossError, DatabaseError
from boss.service import Boss

log = logging.getLogger(__name__)

MAX_BATCH = 4096  # calls in one transaction; a batched complete counts once
# a batch whose transaction failed on the database is retried for this long: under
# the workers' 30 s reply timeout, so that they get an answer rather than a timeout
DB_RETRY_SECONDS = 20.0
DB_RETRY_FIRST, DB_RETRY_CAP = 0.05, 2.0  # seconds between retries, doubling

Done = Callable[[Any], None]
"""Called on the event loop with a call's answer, or with its exception (a value)."""


class GroupCommit:
    """Queue calls; run each batch that accumulated in one transaction on one thread."""

    def __init__(self, boss: Boss, max_batch: int = MAX_BATCH) -> None:
        self.boss = boss
        self.max_batch = max_batch
        self._pending: list[tuple[calls.Call, Done]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ecloud-db")
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0  # counters, for `boss serve` logs and the benchmarks
        self.calls = 0
        self._closed = False

    def enqueue(self, call: calls.Call, done: Done) -> None:
        """Apply ``call`` with the next batch; ``done(answer)`` runs on the loop after."""
        self._pending.append((call, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def submit(self, call: calls.Call) -> Any:
        """Apply one call (batched with whatever else is waiting); raise its error."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(answer: Any) -> None:
            if future.done():  # its caller went away meanwhile
                return
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)

        self.enqueue(call, done)
        return await future

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
            for (_, done), answer in zip(batch, answers, strict=True):
                try:
                    done(answer)
                except Exception:  # one reply that cannot be sent must not lose the others
                    log.exception("answering a call")

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
