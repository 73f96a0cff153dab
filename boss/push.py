"""Reading and checking a push file, and planning its dependency graph.

A push file is a JSON array of task documents or JSON lines (one document a
line, for millions of tasks). It is read once, a chunk of whole lines at a
time (:data:`CHUNK_BYTES`); every document is validated and the dependency
graph is built in compact form as the chunks go by. The store
(:mod:`boss.store.push`) inserts each chunk as soon as it is planned, inside
the push's one transaction, so that checking and inserting overlap; any
problem rolls the transaction back and nothing is pushed.

Memory is bounded by the graph, not by the documents: per task, its name in
the name index, a parent index in an array and two small integers; tasks
with more than one parent, with inputs or outputs, or with ``after`` names
not seen yet keep a little more. Documents are held a chunk at a time.

Validation is the costly part (pydantic, several microseconds a document), so
a large JSON-lines file is checked by helper processes (``python -m
boss.push``), a chunk each, while this process plans and inserts the chunks
in file order from their compact results. Every document is validated either
way; the helpers only change who does it.
"""

from __future__ import annotations

import gc
import json
import marshal
import os
import signal
import struct
import subprocess
import sys
import uuid
from array import array
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, overload

from pydantic import ValidationError

from boss import graph
from boss.errors import PushError
from protocol.document import RemotePath, TaskDocument, describe, validate

MAX_PROBLEMS = 50
MAX_LINE_BYTES = 1_000_000  # one task document; far larger means a mistake
MAX_ARRAY_BYTES = 200_000_000  # a JSON array is read whole; JSON lines stream
CHUNK_BYTES = 1 << 21  # JSON lines are checked a chunk (whole lines) at a time
ARRAY_CHUNK = 10_000  # documents of a JSON array per chunk
PARALLEL_MIN_BYTES = 8 << 20  # smaller files are checked in this process
MAX_HELPERS = 8
# Python's json gives up about 1,000 levels down; a task document is 4 levels deep
TOO_DEEP = "not valid JSON for a task: arrays or objects nested too deeply"


@dataclass
class Plan:
    """The graph of a push, built a chunk at a time.

    In-file parents of task ``i``: ``parent[i]`` (-1 for none) then
    ``more_parents[i]``, in the order they were found (``after`` first, then
    data-implied). ``forward`` is False when every parent comes before its
    child in the file, which makes the file order a topological order.
    ``late`` lists, per task, the parents found only after its chunk was
    planned (an ``after`` naming a later task, an input a later task writes).
    """

    source: str
    path: Path
    json_lines: bool
    names: list[str] = field(default_factory=list)
    generated: set[int] = field(default_factory=set)  # docs without a name
    priority: array[int] = field(default_factory=lambda: array("q"))
    max_tries: array[int] = field(default_factory=lambda: array("q"))
    parent: array[int] = field(default_factory=lambda: array("q"))
    more_parents: dict[int, list[int]] = field(default_factory=dict)
    forward: bool = False
    late: dict[int, list[int]] = field(default_factory=dict)
    after: dict[int, list[str]] = field(default_factory=dict)  # names not in the file
    inputs: dict[int, list[RemotePath]] = field(default_factory=dict)  # not written in-file
    outputs: list[tuple[int, str]] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def parents_of(self, i: int) -> list[int]:
        first = self.parent[i]
        if first < 0:
            return []
        more = self.more_parents.get(i)
        return [first, *more] if more else [first]

    def set_parents(self, i: int, parents: list[int]) -> None:
        self.parent[i] = parents[0] if parents else -1
        if len(parents) > 1:
            self.more_parents[i] = parents[1:]
        else:
            self.more_parents.pop(i, None)
        if any(p > i for p in parents):
            self.forward = True

    def add_parent(self, child: int, parent: int) -> None:
        """Record an in-file edge unless it is already there."""
        first = self.parent[child]
        if first < 0:
            self.parent[child] = parent
        elif first == parent:
            return
        else:
            more = self.more_parents.setdefault(child, [])
            if parent in more:
                return
            more.append(parent)
        if parent > child:
            self.forward = True

    def parent_lists(self) -> Sequence[list[int]]:
        """All parents as a read-only sequence of lists, built on access."""
        return _ParentLists(self)


class _ParentLists(Sequence[list[int]]):
    def __init__(self, plan: Plan) -> None:
        self._plan = plan

    def __len__(self) -> int:
        return len(self._plan)

    @overload
    def __getitem__(self, i: int) -> list[int]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[list[int]]: ...
    def __getitem__(self, i: int | slice) -> list[int] | Sequence[list[int]]:
        if isinstance(i, slice):
            return [self._plan.parents_of(j) for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._plan.parents_of(i)


class _Problems:
    def __init__(self) -> None:
        self.shown: list[str] = []
        self.total = 0

    def add(self, text: str) -> None:
        self.total += 1
        if len(self.shown) < MAX_PROBLEMS:
            self.shown.append(text)


# --- checking documents ---------------------------------------------------------------
#
# A checked document is a record, a plain tuple that marshals small:
#   (OK, line, name, priority, max_tries, after, outputs, inputs)
#       line is None for a JSON array; outputs and inputs are (bucket, path) pairs
#   (BAD, counted, [problem, ...])
#       counted: the text was a JSON value, so it takes a position (as in "#3")

OK, BAD = 0, 1
Record = tuple[Any, ...]


def _pairs(paths: list[RemotePath]) -> tuple[tuple[str, str], ...]:
    return tuple((p.bucket, p.path) for p in paths)


def _record(doc: TaskDocument, line: int | None, default_bucket: str) -> Record:
    outs = _pairs(doc.remote_outputs(default_bucket)) if doc.outputs else ()
    ins = _pairs(doc.remote_inputs(default_bucket)) if doc.inputs else ()
    return (OK, line, doc.name, doc.priority, doc.retries + 1, doc.after, outs, ins)


def _check_value(raw: Any, index: int, line: int | None, default_bucket: str) -> Record:
    """Validate one decoded document the careful way (every problem reported)."""
    doc, errs = validate(raw, describe(index, line, raw))
    if doc is None:
        return (BAD, True, [str(e) for e in errs])
    return _record(doc, line, default_bucket)


def check_lines(data: bytes, first_line: int, default_bucket: str) -> list[Record]:
    """Check a run of whole JSON lines; one record per line that is not blank.

    The fast path validates the raw bytes in one pydantic call; anything it
    refuses is decoded and validated again the careful way, so a bad document
    is described exactly as it would be otherwise (and one pydantic refuses
    only because of its JSON parser, such as a lone surrogate, is judged by
    Python's ``json`` as before).
    """
    out: list[Record] = []
    fast = TaskDocument.model_validate_json
    lines = data.split(b"\n")
    # the last piece is b"" when data ends with a newline, else a line without one
    unterminated = len(lines) - 1 if lines[-1] else -1
    if not lines[-1]:
        lines.pop()
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        lineno = first_line + k
        size = len(line) + (k != unterminated)
        if size > MAX_LINE_BYTES:
            # _line_chunks() cut a longer line short: "more than", not its size
            out.append((BAD, False, [f"line {lineno}: a task of more than {MAX_LINE_BYTES} "
                                     "bytes (one task a line; is this a JSON-lines file?)"]))
            continue
        try:
            doc = fast(line)
        except ValidationError:
            pass
        else:
            out.append(_record(doc, lineno, default_bucket))
            continue
        try:  # with its newline, as in a message's "line 2 column 1" for an unclosed '{'
            raw = json.loads((line + b"\n" if k != unterminated else line).decode("utf-8"))
        except UnicodeDecodeError as exc:
            out.append((BAD, False, [f"line {lineno}: not valid UTF-8 at byte {exc.start} "
                                     "of the line"]))
            continue
        except json.JSONDecodeError as exc:
            out.append((BAD, False, [f"line {lineno} column {exc.colno}: not valid JSON: "
                                     f"{exc.msg}"]))
            continue
        except RecursionError:
            out.append((BAD, False, [f"line {lineno}: {TOO_DEEP}"]))
            continue
        out.append(_check_value(raw, 0, lineno, default_bucket))
    return out


@dataclass
class Chunk:
    """Checked documents, one record each, and their text (as the user wrote it)."""

    records: list[Record]
    data: bytes = b""  # JSON lines: the lines
    docs: list[Any] | None = None  # JSON array: the decoded documents

    def texts(self) -> list[str]:
        """One text per record (pass one found every document valid)."""
        if self.docs is not None:
            return [json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
                    for raw in self.docs]
        # the same lines as check_lines() took: every one is a valid document here, so
        # no line is blank to str.strip() and not to bytes.strip() or the other way round
        return [text for text in map(str.strip, self.data.decode("utf-8").split("\n"))
                if text]


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


def checked_chunks(path: Path, problems: _Problems, default_bucket: str
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
        helpers = _helper_count(path)
        if helpers:
            yield from _Helpers.check(chunks, helpers, default_bucket)
        else:
            for data, first in chunks:
                yield Chunk(check_lines(data, first, default_bucket), data)


def _array_chunks(path: Path, f: IO[bytes], problems: _Problems,
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
        yield Chunk([_check_value(raw, start + k, None, default_bucket)
                     for k, raw in enumerate(part)], docs=part)


# --- helper processes -------------------------------------------------------------------

_FRAME = struct.Struct("<Q")


def _helper_count(path: Path) -> int:
    """How many helper processes to check a JSON-lines file with (0: none)."""
    if path.stat().st_size < PARALLEL_MIN_BYTES:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    # one core stays with this process, which plans and inserts: it is the slower side
    return min(cpus - 1, MAX_HELPERS)


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


class _Helpers:
    """Processes that check chunks, one chunk in flight each, results in order.

    Chunk k goes to helper k mod n. A helper waits for a chunk, checks it and
    writes its records; this process reads them before it sends that helper
    its next chunk, so neither side can block on a full pipe. If a helper
    cannot be started or dies, the rest is checked in this process.
    """

    def __init__(self, count: int) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
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


def _serve() -> None:
    """A helper process: check the chunks that arrive on stdin until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pushing process decides
    gc.freeze()  # what the imports made lives on: collections need not look at it
    stdin = sys.stdin.buffer
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print cannot corrupt the records
    try:
        while True:
            data, first, default_bucket = _receive(stdin)
            _send(stdout, check_lines(data, first, default_bucket))
    except (EOFError, BrokenPipeError):
        pass
    os._exit(0)  # the pushing process went away or is done: nothing to flush


# --- planning -------------------------------------------------------------------------------

class Planner:
    """Builds a :class:`Plan` from checked chunks, in file order.

    :meth:`add` plans a chunk: names, priorities, and the parents already
    known (``after`` names seen before, inputs that tasks seen before write).
    A task whose ``after`` names are not all known yet waits for
    :meth:`finish`, which resolves what is left, adds the inputs written by
    later tasks, looks for cycles and raises :class:`PushError` with every
    problem of the file. The parents of each task end up in the same order
    whichever way they were found (``after`` first, then data-implied).
    """

    def __init__(self, path: Path, source: str, default_bucket: str = "default") -> None:
        with path.open("rb") as f:
            json_lines = f.read(4096).lstrip()[:1] != b"["
        self.plan = Plan(source=source, path=path, json_lines=json_lines)
        self.default_bucket = default_bucket
        self.problems = _Problems()
        self._pending_after: list[tuple[int, list[str]]] = []  # (task, names) for finish()
        self._self_after: list[int] = []  # tasks naming themselves in 'after'
        self._outputs = graph.OutputIndex()
        # (task, inputs as (bucket, path), how many of its parents come from 'after';
        # -1: not resolved yet)
        self._inputs: list[tuple[int, Sequence[tuple[str, str]], int]] = []
        self._prefix = "task-" + uuid.uuid4().hex[:8]
        self._i = -1  # position of the last document (valid or not)

    def chunks(self) -> Generator[Chunk, None, None]:
        return checked_chunks(self.plan.path, self.problems, self.default_bucket)

    @property
    def clean(self) -> bool:
        return self.problems.total == 0

    def add(self, chunk: Chunk) -> int:
        """Plan a chunk's documents; return the index of its first task."""
        p, problems = self.plan, self.problems
        names, index, parent = p.names, p.index, p.parent
        priority, max_tries = p.priority, p.max_tries
        outputs = self._outputs
        start = len(names)
        i = self._i
        pending_after, self_after = self._pending_after, self._self_after
        index_get, add_name = index.get, index.setdefault
        for rec in chunk.records:
            if rec[0] == BAD:
                if rec[1]:
                    i += 1
                for text in rec[2]:
                    problems.add(text)
                continue
            i += 1
            _, _line, name, prio, tries, after, outs, ins = rec
            if name is None:
                name = f"{self._prefix}-{i + 1}"
                p.generated.add(i)
            idx = len(names)
            first = add_name(name, idx)
            if first != idx:
                problems.add(f"{_where(rec, i)}, field 'name': duplicate name {name!r} "
                             f"(first at {_position(p, first)})")
                continue
            names.append(name)
            if idx != i:  # earlier documents were invalid; keep counting but stop planning
                continue
            priority.append(prio)
            max_tries.append(tries)
            # 'after' names seen before are resolved now, in order; a task naming one
            # not seen yet waits for finish() (a name seen before is never a later task)
            resolved = True
            if not after:
                parent.append(-1)
            elif len(after) == 1:
                pa = index_get(after[0])
                if pa is None:
                    parent.append(-1)
                    pending_after.append((idx, after))
                    resolved = False
                elif pa == idx:
                    parent.append(-1)
                    self_after.append(idx)
                else:
                    parent.append(pa)
            else:
                parent.append(-1)
                found = [index_get(a) for a in after]
                if None in found:
                    pending_after.append((idx, after))
                    resolved = False
                else:
                    for pa in found:
                        if pa == idx:
                            self_after.append(idx)
                        elif pa is not None:
                            p.add_parent(idx, pa)
            for bucket, opath in outs:
                k = f"{bucket}:{opath.rstrip('/')}"  # graph.key()
                other = outputs.add_key(idx, k, opath.endswith("/"))
                if other is not None:
                    problems.add(f"{_where(rec, i)}, field 'outputs': {bucket}:{opath} is also "
                                 f"written by task {names[other]!r}; two tasks may not write "
                                 "the same path")
                p.outputs.append((idx, k))
            if ins:
                if resolved:  # writers seen so far; finish() adds later ones
                    n_after = 0 if parent[idx] < 0 else 1 + len(p.more_parents.get(idx, ()))
                    self._inputs.append((idx, ins, n_after))
                    for bucket, ipath in ins:
                        # outputs under an input directory wait for finish(): finding
                        # them needs a sorted index, which each new output would undo
                        for w in outputs.writers_of(bucket, ipath, inside=False):
                            if w != idx:
                                p.add_parent(idx, w)
                else:
                    self._inputs.append((idx, ins, -1))
        self._i = i
        return start

    def finish(self) -> Plan:
        """Resolve what is left and check the whole graph; raise PushError."""
        p, problems = self.plan, self.problems
        if problems.total == 0 and not p.names:
            problems.add("no tasks in the file")
        if problems.total:
            raise PushError(p.source, problems.shown, problems.total)
        index = p.index
        late = p.late
        for idx, after in self._pending_after:
            for a in after:
                found = index.get(a)
                if found is None:
                    p.after.setdefault(idx, []).append(a)
                elif found == idx:
                    self._self_after.append(idx)
                else:
                    p.add_parent(idx, found)
            if p.parent[idx] >= 0:
                late[idx] = p.parents_of(idx)
        self._self_after.sort()  # stable: in task order, as they appear in each task
        for idx in self._self_after:
            problems.add(f"{_position(p, idx)}, field 'after': the task depends on itself")
        for idx, pairs, n_after in self._inputs:
            before = p.parents_of(idx)
            parents = before if n_after < 0 else before[:n_after]
            outside = []
            for bucket, ipath in pairs:
                writers = self._outputs.writers_of(bucket, ipath) - {idx}
                if not writers:
                    outside.append(RemotePath(bucket, ipath))
                for w in writers:
                    if w not in parents:
                        parents.append(w)
            if outside:
                p.inputs[idx] = outside
            if n_after < 0:
                p.set_parents(idx, parents)
                if parents:
                    late[idx] = parents
            elif len(parents) != len(before) or parents != before:
                known = set(before)
                new = [w for w in parents if w not in known]
                p.set_parents(idx, parents)
                if new:
                    late[idx] = new
        if p.forward:  # otherwise the file order is a topological order: no cycle
            cycle = graph.find_cycle(p.parent_lists())
            if cycle is not None:
                text = " -> ".join(p.names[n] for n in cycle)
                problems.add(f"dependency cycle (each runs before the next): {text}")
        if problems.total:
            raise PushError(p.source, problems.shown, problems.total)
        return p


def _where(rec: Record, i: int) -> str:
    """How an error names a valid document (as protocol.document.describe does)."""
    lineno, name = rec[1], rec[2]
    pos = f"line {lineno}" if lineno is not None else f"#{i + 1}"
    return f"task {name!r} ({pos})" if name is not None else f"task {pos}"


def _position(p: Plan, idx: int) -> str:
    return f"task {p.names[idx]!r}"


def plan(path: Path, source: str | None = None, default_bucket: str = "default") -> Plan:
    """Check a whole file and plan it without a database; raise PushError."""
    source = source or str(path)
    if not path.is_file():
        raise PushError(source, ["no such file"])
    planner = Planner(path, source, default_bucket)
    for chunk in planner.chunks():
        planner.add(chunk)
    return planner.finish()


def document_text(p: Plan, i: int, text: str) -> str:
    """The stored text of task ``i``: as written, with its generated name added."""
    if i in p.generated:
        return json.dumps({"name": p.names[i], **json.loads(text)},
                          separators=(",", ":"), ensure_ascii=False)
    return text


def spool_stdin(stream: Any, directory: Path, limit: int | None = None) -> Path:
    """Copy standard input to a file so that it can be read twice.

    At most ``limit`` + 1 bytes are copied: one more than the limit is enough to
    refuse the push, and an endless stream must not fill the disk.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = _mkstemp(directory)
    left = limit + 1 if limit is not None else None
    with os.fdopen(fd, "wb") as out:
        while left is None or left > 0:
            chunk = stream.read(1 << 20 if left is None else min(left, 1 << 20))
            if not chunk:
                break
            out.write(chunk)
            if left is not None:
                left -= len(chunk)
    return Path(name)


def _mkstemp(directory: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="push-", suffix=".jsonl", dir=directory)


if __name__ == "__main__":
    _serve()
