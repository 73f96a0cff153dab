"""Reading and checking a push file: pass one of a push.

A push file is a JSON array of task documents or JSON lines (one document a
line, for millions of tasks). Pass one streams the file, validates every
document and builds the dependency graph in compact form (names, parents,
outputs), keeping no documents in memory. Pass two (:func:`rows`) streams the
file again to insert the documents as they were written. Only when pass one
found nothing wrong does anything touch the database.
"""

from __future__ import annotations

import json
import os
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boss import graph
from boss.errors import PushError
from protocol.document import RemotePath, describe, validate

MAX_PROBLEMS = 50
MAX_LINE_BYTES = 1_000_000  # one task document; far larger means a mistake
MAX_ARRAY_BYTES = 200_000_000  # a JSON array is read whole; JSON lines stream


@dataclass
class Plan:
    """Everything pass one learned; documents themselves are re-read in pass two."""

    source: str
    path: Path
    json_lines: bool
    names: list[str] = field(default_factory=list)
    generated: set[int] = field(default_factory=set)  # docs without a name
    priority: array[int] = field(default_factory=lambda: array("q"))
    max_tries: array[int] = field(default_factory=lambda: array("i"))
    parents: list[list[int]] = field(default_factory=list)  # in-file parents
    after: dict[int, list[str]] = field(default_factory=dict)  # names not in the file
    inputs: dict[int, list[RemotePath]] = field(default_factory=dict)  # not written in-file
    outputs: list[tuple[int, str]] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)


class _Problems:
    def __init__(self) -> None:
        self.shown: list[str] = []
        self.total = 0

    def add(self, text: str) -> None:
        self.total += 1
        if len(self.shown) < MAX_PROBLEMS:
            self.shown.append(text)


def _records(path: Path, problems: _Problems) -> Iterator[tuple[int | None, Any]]:
    """Yield (line number or None, decoded JSON) for each document in the file."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
        if not head:
            problems.add("the file is empty: no tasks to push")
            return
        f.seek(0)
        if head[:1] == b"[":
            size = path.stat().st_size
            if size > MAX_ARRAY_BYTES:
                problems.add(f"a JSON array of {size} bytes is too large to read at once; "
                             "write one task per line (JSON lines) instead")
                return
            try:
                docs = json.loads(f.read().decode("utf-8"))
            except UnicodeDecodeError as exc:
                problems.add(f"not valid UTF-8 at byte {exc.start}")
                return
            except json.JSONDecodeError as exc:
                problems.add(f"line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}")
                return
            if not isinstance(docs, list):
                problems.add("a push file is a JSON array of tasks or JSON lines")
                return
            for doc in docs:
                yield None, doc
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if len(line) > MAX_LINE_BYTES:
                problems.add(f"line {lineno}: a task of {len(line)} bytes is larger than "
                             f"{MAX_LINE_BYTES} bytes")
                continue
            try:
                yield lineno, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                problems.add(f"line {lineno}: not valid UTF-8 at byte {exc.start}")
            except json.JSONDecodeError as exc:
                problems.add(f"line {lineno} column {exc.colno}: not valid JSON: {exc.msg}")


def plan(path: Path, source: str | None = None, default_bucket: str = "default") -> Plan:
    """Pass one: validate every document and build the graph; raise PushError."""
    source = source or str(path)
    if not path.is_file():
        raise PushError(source, ["no such file"])
    problems = _Problems()
    with path.open("rb") as f:
        json_lines = f.read(4096).lstrip()[:1] != b"["
    p = Plan(source=source, path=path, json_lines=json_lines)
    pending_after: list[tuple[int, str, str]] = []  # (index, name, where)
    outputs = graph.OutputIndex()
    inputs: list[tuple[int, list[RemotePath], str]] = []
    prefix = "task-" + uuid.uuid4().hex[:8]
    for i, (lineno, raw) in enumerate(_records(path, problems)):
        where = describe(i, lineno, raw)
        doc, errs = validate(raw, where)
        if doc is None:
            for e in errs:
                problems.add(str(e))
            continue
        name = doc.name
        if name is None:
            name = f"{prefix}-{i + 1}"
            p.generated.add(i)
        if name in p.index:
            problems.add(f"{where}, field 'name': duplicate name {name!r} (first at "
                         f"{_position(p, p.index[name])})")
            continue
        idx = len(p.names)
        if idx != i:  # earlier documents were invalid; keep counting but stop planning
            p.index[name] = idx
            p.names.append(name)
            continue
        p.index[name] = idx
        p.names.append(name)
        p.priority.append(doc.priority)
        p.max_tries.append(doc.max_tries)
        p.parents.append([])
        for a in doc.after:
            pending_after.append((idx, a, where))
        for out in doc.remote_outputs(default_bucket):
            other = outputs.add(idx, out)
            if other is not None:
                problems.add(f"{where}, field 'outputs': {out} is also written by task "
                             f"{p.names[other]!r}; two tasks may not write the same path")
            p.outputs.append((idx, graph.key(out)))
        ins = doc.remote_inputs(default_bucket)
        if ins:
            inputs.append((idx, ins, where))
    if problems.total == 0 and not p.names:
        problems.add("no tasks in the file")
    if problems.total:
        raise PushError(source, problems.shown, problems.total)
    for idx, name, _where in pending_after:
        parent = p.index.get(name)
        if parent is None:
            p.after.setdefault(idx, []).append(name)
        elif parent == idx:
            problems.add(f"{_position(p, idx)}, field 'after': the task depends on itself")
        elif parent not in p.parents[idx]:
            p.parents[idx].append(parent)
    for idx, ins, _where in inputs:
        outside = []
        for path_ in ins:
            writers = outputs.writers(path_) - {idx}
            if not writers:
                outside.append(path_)
            for w in writers:
                if w not in p.parents[idx]:
                    p.parents[idx].append(w)
        if outside:
            p.inputs[idx] = outside
    cycle = graph.find_cycle(p.parents)
    if cycle is not None:
        text = " -> ".join(p.names[n] for n in cycle)
        problems.add(f"dependency cycle (each runs before the next): {text}")
    if problems.total:
        raise PushError(source, problems.shown, problems.total)
    return p


def _position(p: Plan, idx: int) -> str:
    return f"task {p.names[idx]!r}"


def documents(p: Plan) -> Iterator[str]:
    """Pass two: each document's JSON text, as written (a generated name added)."""
    count = 0
    for i, text in enumerate(_texts(p)):
        if i in p.generated:
            text = json.dumps({"name": p.names[i], **json.loads(text)},
                              separators=(",", ":"), ensure_ascii=False)
        count += 1
        yield text
    if count != len(p.names):
        raise PushError(p.source, ["the file changed while it was pushed"])


def _texts(p: Plan) -> Iterator[str]:
    if not p.json_lines:
        for raw in json.loads(p.path.read_bytes().decode("utf-8")):
            yield json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
        return
    # pass one checked every line, so the text is stored as the user wrote it
    with p.path.open("rb") as f:
        for line in f:
            if line.strip():
                yield line.decode("utf-8").strip()


def spool_stdin(stream: Any, directory: Path) -> Path:
    """Copy standard input to a file so that it can be read twice."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = _mkstemp(directory)
    with os.fdopen(fd, "wb") as out:
        while chunk := stream.read(1 << 20):
            out.write(chunk)
    return Path(name)


def _mkstemp(directory: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="push-", suffix=".jsonl", dir=directory)
