"""Helper processes that check the documents of a large JSON-lines file.

Validation is the costly part of a push (pydantic, several microseconds a
document), so a large file is checked by helper processes (``python -m
boss.push``), a chunk each, while the pushing process plans and inserts the
chunks in file order from their compact records. Every document is validated
either way; the helpers only change who does it.
"""

from __future__ import annotations

import gc
import marshal
import os
import signal
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from boss.push.records import Chunk, Record, check_lines

PARALLEL_MIN_BYTES = 8 << 20  # smaller files are checked in the pushing process
MAX_HELPERS = 8

_FRAME = struct.Struct("<Q")


def helper_count(path: Path) -> int:
    """How many helper processes to check a JSON-lines file with (0: none)."""
    if path.stat().st_size < PARALLEL_MIN_BYTES:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    # checking takes about as much CPU as planning and inserting (12-16 s each per
    # million tasks on two cores): a helper per core, so that no core idles while the
    # pushing process waits for a chunk; the scheduler shares the cores between them
    return 0 if cpus < 2 else min(cpus, MAX_HELPERS)


# marshal, not pickle: the two ends are the same interpreter, the values plain
# tuples, lists, strings and numbers, and marshal is about a third faster
def _send(stream: IO[bytes], obj: Any) -> None:
    data = marshal.dumps(obj)
    stream.write(_FRAME.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        raise EOFError("the checking process ended")
    (size,) = _FRAME.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the checking process ended")
    return marshal.loads(data)


class Helpers:
    """Processes that check chunks, one chunk in flight each, results in order.

    Chunk k goes to helper k mod n. A helper waits for a chunk, checks it and
    writes its records; this process reads them before it sends that helper
    its next chunk, so neither side can block on a full pipe. If a helper
    cannot be started or dies, the rest is checked in this process.
    """

    def __init__(self, count: int) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(count):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "boss.push"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, env=env))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in self.procs:
            for stream in (proc.stdin, proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @classmethod
    def check(cls, chunks: Iterator[tuple[bytes, int]], count: int,
              default_bucket: str) -> Iterator[Chunk]:
        try:
            helpers = cls(count)
        except (OSError, ValueError):
            for data, first in chunks:
                yield Chunk(check_lines(data, first, default_bucket), data)
            return
        try:
            yield from helpers._run(chunks, default_bucket)
        finally:
            helpers.close()

    def _run(self, chunks: Iterator[tuple[bytes, int]], default_bucket: str
             ) -> Iterator[Chunk]:
        n = len(self.procs)
        inflight: deque[tuple[bytes, int]] = deque()  # chunk k+j is with helper (k+j) % n
        k = 0  # number of the oldest chunk in flight
        broken = False

        def give(j: int, chunk: tuple[bytes, int]) -> bool:
            stdin = self.procs[j % n].stdin
            assert stdin is not None
            try:
                _send(stdin, (chunk[0], chunk[1], default_bucket))
            except OSError:
                return False
            return True

        for chunk in chunks:
            inflight.append(chunk)
            if len(inflight) <= n:
                if not give(k + len(inflight) - 1, chunk):
                    broken = True
                    break
                continue
            # every helper is busy: take the oldest result, hand that helper this chunk
            records = self._take(k)
            if records is None:
                broken = True
                break
            done = Chunk(records, inflight.popleft()[0])
            k += 1
            if not give(k + n - 1, chunk):
                yield done
                broken = True
                break
            yield done
        if broken:  # check what is left here, in order
            self.close()
            for data, first in inflight:
                yield Chunk(check_lines(data, first, default_bucket), data)
            for data, first in chunks:
                yield Chunk(check_lines(data, first, default_bucket), data)
            return
        while inflight:
            data, first = inflight.popleft()
            records = self._take(k)
            if records is None:
                records = check_lines(data, first, default_bucket)
            k += 1
            yield Chunk(records, data)

    def _take(self, k: int) -> list[Record] | None:
        stdout = self.procs[k % len(self.procs)].stdout
        assert stdout is not None
        try:
            records: list[Record] = _receive(stdout)
        except (OSError, EOFError, ValueError, TypeError):
            return None
        return records


def serve() -> None:
    """A helper process: check the chunks that arrive on stdin until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pushing process decides
    gc.freeze()  # what the imports made lives on: collections need not look at it
    # and none while a chunk is checked: its thousands of records, each a tuple holding
    # lists, made the collector run over and over (3.9 -> 3.3 us a document); one
    # collection after each chunk, when they are gone, finds any cycle a refusal made
    gc.disable()
    stdin = sys.stdin.buffer
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print cannot corrupt the records
    try:
        while True:
            data, first, default_bucket = _receive(stdin)
            _send(stdout, check_lines(data, first, default_bucket))
            gc.collect()
    except (EOFError, BrokenPipeError):
        pass
    os._exit(0)  # the pushing process went away or is done: nothing to flush

