"""Reading a push file: a JSON array of task documents or JSON lines.

JSON lines (one document a line, for millions of tasks) are read a chunk of
whole lines at a time (:data:`CHUNK_BYTES`) and checked by helper processes
when the file is large (:mod:`boss.push.helpers`); a JSON array is read whole
and checked a slice at a time. Either way the checked chunks come out in
file order, and documents are held a chunk at a time.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import IO

from boss.push.helpers import Helpers, helper_count
from boss.push.records import MAX_LINE_BYTES, TOO_DEEP, Chunk, check_lines, check_value

MAX_PROBLEMS = 50
MAX_ARRAY_BYTES = 200_000_000  # a JSON array is read whole; JSON lines stream
CHUNK_BYTES = 1 << 21  # JSON lines are checked a chunk (whole lines) at a time
ARRAY_CHUNK = 10_000  # documents of a JSON array per chunk


class Problems:
    """The problems of a file: the first MAX_PROBLEMS shown, all of them counted."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.total = 0

    def add(self, text: str) -> None:
        self.total += 1
        if len(self.shown) < MAX_PROBLEMS:
            self.shown.append(text)


def _line_chunks(f: IO[bytes]) -> Iterator[tuple[bytes, int]]:
    """Whole lines, about CHUNK_BYTES at a time, with the number of the first line.

    A line longer than MAX_LINE_BYTES is cut short (check_lines() refuses it) and the
    rest of it skipped unread, so that a file without newlines, such as a binary file
    pushed by mistake, is never held in memory.
    """
    line = 1
    while block := f.read(CHUNK_BYTES):
        skipped = False
        if not block.endswith(b"\n"):
            block += f.readline(MAX_LINE_BYTES + 1)
            if not block.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                skipped = rest.endswith(b"\n")
        yield block, line
        line += block.count(b"\n") + skipped


def checked_chunks(path: Path, problems: Problems, default_bucket: str
                   ) -> Generator[Chunk, None, None]:
    """Every document of the file, checked, in file order, a chunk at a time."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
        if not head:
            problems.add("the file is empty: no tasks to push")
            return
        f.seek(0)
        if head[:1] == b"[":
            yield from _array_chunks(path, f, problems, default_bucket)
            return
        chunks = _line_chunks(f)
        helpers = helper_count(path)
        if helpers:
            yield from Helpers.check(chunks, helpers, default_bucket)
        else:
            for data, first in chunks:
                yield Chunk(check_lines(data, first, default_bucket), data)


def _array_chunks(path: Path, f: IO[bytes], problems: Problems,
                  default_bucket: str) -> Iterator[Chunk]:
    size = path.stat().st_size
    if size > MAX_ARRAY_BYTES:
        problems.add(f"a JSON array of {size} bytes is too large to read at once; "
                     "write one task per line (JSON lines) instead")
        return
    data = f.read()
    try:
        docs = json.loads(data.decode("utf-8"))
    except RecursionError:
        problems.add(TOO_DEEP)
        return
    except UnicodeDecodeError as exc:
        # a line number is what an editor can jump to; the byte pins it down
        line = data.count(b"\n", 0, exc.start) + 1
        problems.add(f"line {line}: not valid UTF-8 at byte {exc.start} of the file")
        return
    except json.JSONDecodeError as exc:
        problems.add(f"line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}")
        return
    del data
    if not isinstance(docs, list):
        problems.add("a push file is a JSON array of tasks or JSON lines")
        return
    for start in range(0, len(docs), ARRAY_CHUNK):
        part = docs[start : start + ARRAY_CHUNK]
        yield Chunk([check_value(raw, start + k, None, default_bucket)
                     for k, raw in enumerate(part)], docs=part)

