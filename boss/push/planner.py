"""Planning a push: the dependency graph of a file, built a chunk at a time.

Memory is bounded by the graph, not by the documents: per task, its name in
the name index, a parent index in an array and two small integers; tasks
with more than one parent, with inputs or outputs, or with ``after`` names
not seen yet keep a little more.
"""

from __future__ import annotations

import json
import uuid
from array import array
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

from boss import graph
from boss.errors import PushError
from boss.push.reader import Problems, checked_chunks
from boss.push.records import BAD, Chunk, Record
from protocol.document import RemotePath


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
        self.problems = Problems()
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
