"""Real workflow DAGs: WfCommons instances imported as task documents.

WfCommons (https://wfcommons.org) publishes traces of real workflow runs:
every task with its recorded runtime, its parents and the files it read and
wrote, with their sizes. :func:`convert` turns one into ecloud tasks that
replay it: each task sleeps its runtime times ``time_scale`` and writes each
of its output files at its size times ``size_scale`` (zeros, with
``head -c N /dev/zero``: nothing but POSIX ``sh`` and coreutils). Every file
is ``data:wf/PREFIX/FILE``, so a task's inputs are its parents' outputs and
the boss derives the dependencies from the data as for any push; a declared
parent that shares no file with its child is added as ``after``. Files that
no task writes are the workflow's inputs: :func:`create_inputs` writes them
into the datastore before the push, or the first tasks could not stage them
in. Tasks get a priority by their bottom level (the longest path from their
start to the end of the workflow), so that among ready tasks the one with
the most work behind it runs first.

The figures a schedule on S slots is judged against come with the
conversion: the critical path (the longest path by scaled runtime) and the
total work; no schedule beats max(critical path, total work / S).

Formats (``schemaVersion``):

- 1.4, the Makeflow instances: ``workflow.tasks``, each with ``name``,
  ``parents`` (names), ``runtimeInSeconds`` and ``files`` (``name``,
  ``link``: ``input`` | ``output``, ``sizeInBytes``);
- 1.5 and 1.6: ``workflow.specification.tasks`` (``id``, ``parents`` (ids),
  ``inputFiles``, ``outputFiles``), ``workflow.specification.files`` (``id``,
  ``sizeInBytes``) and ``workflow.execution.tasks`` (``id``,
  ``runtimeInSeconds``).

Any other version is refused; so is a file that lacks what the conversion
needs, with the file, the task and the field named.

Errors::

    UserError (boss.errors)
    └── WfCommonsError      the instance cannot be read or converted
    DatastoreError (worker.errors)   creating the workflow's inputs failed
"""

from __future__ import annotations

import heapq
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boss import graph
from boss.errors import UserError
from protocol.document import describe, parse_remote, validate
from worker.datastore import Datastore, translated

SUPPORTED = ("1.4", "1.5", "1.6")
BUCKET = "data"
MAX_FILE_BYTES = 1 << 30  # one scaled file; far larger is a forgotten --size-scale
MAX_INSTANCE_BYTES = 200_000_000
PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
ZEROS = bytes(1 << 20)

# $1: seconds to sleep; then pairs SIZE FILE. The loop ends: each turn shifts two.
SCRIPT = ('sleep "$1" || exit; shift; '
          'while [ "$#" -ge 2 ]; do '
          'case $2 in */*) mkdir -p "${2%/*}" || exit;; esac; '
          'head -c "$1" /dev/zero > "$2" || exit; shift 2; done')


class WfCommonsError(UserError):
    """A WfCommons instance cannot be read or converted; the message says where."""


@dataclass(frozen=True)
class WfTask:
    """One task as recorded: its name, runtime (s), parents and files (name, bytes)."""

    name: str
    runtime: float
    parents: tuple[str, ...]
    inputs: tuple[tuple[str, int], ...]
    outputs: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Workflow:
    """A parsed instance: where it came from, its schema version and its tasks."""

    source: str
    name: str
    schema: str
    tasks: tuple[WfTask, ...]


@dataclass(frozen=True)
class Conversion:
    """Task documents (in a topological order) and what a run needs besides them.

    ``inputs`` are the workflow's input files as (``data:wf/PREFIX/FILE``,
    scaled size). ``runtimes`` (scaled seconds) and ``parents`` (positions in
    ``documents``) are the graph the figures are computed on.
    """

    documents: list[dict[str, Any]]
    inputs: list[tuple[str, int]]
    runtimes: list[float]
    parents: list[list[int]]

    @property
    def edges(self) -> int:
        return sum(len(p) for p in self.parents)

    @property
    def total_work(self) -> float:
        """The sum of the scaled runtimes."""
        return math.fsum(self.runtimes)

    @property
    def critical_path(self) -> float:
        """The longest path through the graph by scaled runtime."""
        return max((s + r for s, r in zip(self._earliest(), self.runtimes, strict=True)),
                   default=0.0)

    def bound(self, slots: int) -> float:
        """max(critical path, total work / slots): no schedule on ``slots`` slots is shorter."""
        return max(self.critical_path, self.total_work / _slots(slots))

    def level_bound(self, slots: int) -> float:
        """A tighter lower bound: :meth:`bound`, and for every start time T, T plus the
        work of the tasks that cannot start before T, shared by the slots.

        A task cannot start before its earliest start (the longest path to it), so
        when a long task gates the rest (BWA's index) this sees the wait that
        ``total work / slots`` spreads over idle slots.
        """
        n = _slots(slots)
        earliest = self._earliest()
        best, after = self.bound(n), 0.0
        for start, runtime in sorted(zip(earliest, self.runtimes, strict=True), reverse=True):
            after += runtime
            best = max(best, start + after / n)
        return best

    def list_schedule(self, slots: int) -> float:
        """The makespan of the boss's policy without overheads: whenever a slot is free it
        takes the ready task of highest priority, in push order among equals."""
        n = _slots(slots)
        children: list[list[int]] = [[] for _ in self.documents]
        for child, ps in enumerate(self.parents):
            for p in ps:
                children[p].append(child)
        pending = [len(p) for p in self.parents]
        ready = [(-int(d.get("priority", 0)), k) for k, d in enumerate(self.documents)
                 if not pending[k]]
        heapq.heapify(ready)
        running: list[tuple[float, int]] = []
        now = 0.0
        for _ in range(2 * len(self.documents) + 1):  # each turn ends a task or starts one
            if ready and len(running) < n:
                _, k = heapq.heappop(ready)
                heapq.heappush(running, (now + self.runtimes[k], k))
                continue
            if not running:
                break
            now, k = heapq.heappop(running)
            for c in children[k]:
                pending[c] -= 1
                if not pending[c]:
                    heapq.heappush(ready, (-int(self.documents[c].get("priority", 0)), c))
        return now

    def _earliest(self) -> list[float]:
        """Each task's earliest start: parents come first in ``documents``."""
        start = [0.0] * len(self.runtimes)
        for k, ps in enumerate(self.parents):
            for p in ps:
                start[k] = max(start[k], start[p] + self.runtimes[p])
        return start


def _slots(slots: int) -> int:
    if slots < 1:
        raise ValueError("slots must be at least 1")
    return slots


# --- reading ---------------------------------------------------------------------------

def load(path: Path) -> Workflow:
    """Read and parse an instance file."""
    try:
        size = path.stat().st_size
        if size > MAX_INSTANCE_BYTES:
            raise WfCommonsError(f"{path}: {size} bytes is too large for a WfCommons "
                                 f"instance (at most {MAX_INSTANCE_BYTES})")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WfCommonsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise WfCommonsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                             "a WfCommons instance is a JSON file") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WfCommonsError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} "
                             f"column {exc.colno}") from exc
    return parse(data, str(path))


def parse(data: Any, source: str) -> Workflow:
    """Parse a decoded instance; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise WfCommonsError(f"{source}: a WfCommons instance is a JSON object with "
                             f"'schemaVersion' and 'workflow', not {type(data).__name__}")
    version = data.get("schemaVersion")
    if version is None:
        raise WfCommonsError(f"{source}: no 'schemaVersion': not a WfCommons instance? "
                             f"(supported: {', '.join(SUPPORTED)})")
    if str(version) not in SUPPORTED:
        raise WfCommonsError(
            f"{source}: schemaVersion {version!r} is not supported (only "
            f"{', '.join(SUPPORTED)}); migrate it to 1.6 with WfFormat's "
            "tools/wfcommons-migrate-instance.py")
    workflow = _get(data, "workflow", dict, source)
    name = data.get("name")
    name = name if isinstance(name, str) and name else Path(source).stem
    if str(version) == "1.4":
        tasks, children = _tasks_v14(workflow, source)
    else:
        tasks, children = _tasks_v15(workflow, source)
    _check_graph(tasks, source)
    _check_children(children, tasks, source)
    return Workflow(source, name, str(version), tuple(tasks))


def _get(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """A required field of the expected JSON type, else an error naming it."""
    if key not in obj:
        raise WfCommonsError(f"{where}: {key!r} is missing")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise WfCommonsError(f"{where}: {key!r} must be {_kind(kind)}, not "
                             f"{type(value).__name__}")
    return value


def _kind(kind: type) -> str:
    names: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}
    return names.get(kind, kind.__name__)


def _number(obj: Mapping[str, Any], key: str, where: str) -> float:
    if key not in obj:
        raise WfCommonsError(f"{where}: {key!r} is missing")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WfCommonsError(f"{where}: {key!r} must be a number, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise WfCommonsError(f"{where}: {key!r} must be a non-negative number, not {value!r}")
    return float(value)


def _names(obj: Mapping[str, Any], key: str, where: str) -> list[str]:
    values = _get(obj, key, list, where)
    for v in values:
        if not isinstance(v, str) or not v:
            raise WfCommonsError(f"{where}: {key!r} must list non-empty strings, not {v!r}")
    return list(values)


def _task_list(container: Mapping[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    tasks = _get(container, key, list, where)
    if not tasks:
        raise WfCommonsError(f"{where}: {key!r} is empty: the workflow has no task")
    for i, t in enumerate(tasks):
        if not isinstance(t, dict):
            raise WfCommonsError(f"{where}: {key}[{i}] must be an object, not "
                                 f"{type(t).__name__}")
    return list(tasks)


def _tasks_v14(workflow: Mapping[str, Any], source: str
               ) -> tuple[list[WfTask], dict[str, Any]]:
    raw = _task_list(workflow, "tasks", f"{source}: workflow (schemaVersion 1.4)")
    tasks = []
    for i, t in enumerate(raw):
        name = _get(t, "name", str, f"{source}: workflow.tasks[{i}]")
        where = f"{source}: task {name!r}"
        files: dict[str, list[tuple[str, int]]] = {"input": [], "output": []}
        for j, f in enumerate(_get(t, "files", list, where)):
            fwhere = f"{where}, files[{j}]"
            if not isinstance(f, dict):
                raise WfCommonsError(f"{fwhere}: must be an object")
            fname = _get(f, "name", str, fwhere)
            link = _get(f, "link", str, fwhere)
            if link not in files:
                raise WfCommonsError(f"{fwhere} ({fname!r}): 'link' must be 'input' or "
                                     f"'output', not {link!r}")
            files[link].append((fname, int(_number(f, "sizeInBytes", fwhere))))
        tasks.append(WfTask(name, _number(t, "runtimeInSeconds", where),
                            tuple(_names(t, "parents", where)),
                            _files(files["input"], where), _files(files["output"], where)))
        if "children" in t:
            _names(t, "children", where)
    return tasks, {t["name"]: t.get("children") for t in raw}


def _tasks_v15(workflow: Mapping[str, Any], source: str
               ) -> tuple[list[WfTask], dict[str, Any]]:
    spec = _get(workflow, "specification", dict, f"{source}: workflow")
    raw = _task_list(spec, "tasks", f"{source}: workflow.specification")
    sizes: dict[str, int] = {}
    listed = _get(spec, "files", list, f"{source}: workflow.specification") \
        if "files" in spec else []
    for j, f in enumerate(listed):
        fwhere = f"{source}: workflow.specification.files[{j}]"
        if not isinstance(f, dict):
            raise WfCommonsError(f"{fwhere}: must be an object")
        sizes[_get(f, "id", str, fwhere)] = int(_number(f, "sizeInBytes", fwhere))
    execution = workflow.get("execution")
    if not isinstance(execution, dict):
        raise WfCommonsError(f"{source}: no 'workflow.execution': the recorded runtimes "
                             "are needed (a specification-only instance cannot be replayed)")
    runtimes: dict[str, float] = {}
    for i, e in enumerate(_task_list(execution, "tasks", f"{source}: workflow.execution")):
        ewhere = f"{source}: workflow.execution.tasks[{i}]"
        runtimes[_get(e, "id", str, ewhere)] = _number(e, "runtimeInSeconds", ewhere)
    tasks = []
    for i, t in enumerate(raw):
        tid = _get(t, "id", str, f"{source}: workflow.specification.tasks[{i}]")
        where = f"{source}: task {tid!r}"
        if tid not in runtimes:
            raise WfCommonsError(f"{where}: no runtime: workflow.execution.tasks has no "
                                 "entry with this id")
        tasks.append(WfTask(tid, runtimes[tid], tuple(_names(t, "parents", where)),
                            _sized(t, "inputFiles", sizes, where),
                            _sized(t, "outputFiles", sizes, where)))
        if "children" in t:
            _names(t, "children", where)
    return tasks, {t["id"]: t.get("children") for t in raw}


def _sized(task: Mapping[str, Any], key: str, sizes: Mapping[str, int],
           where: str) -> tuple[tuple[str, int], ...]:
    """A 1.5 task's ``inputFiles`` or ``outputFiles`` with their sizes."""
    ids = _names(task, key, where) if key in task else []
    missing = [f for f in ids if f not in sizes]
    if missing:
        raise WfCommonsError(f"{where}: {key} {missing[0]!r} is not in "
                             "workflow.specification.files (its size is needed)")
    return _files([(f, sizes[f]) for f in ids], where)


def _files(pairs: Iterable[tuple[str, int]], where: str) -> tuple[tuple[str, int], ...]:
    """Files of one direction, each once, with names checked as datastore paths."""
    seen: dict[str, int] = {}
    for name, size in pairs:
        if any(part in ("", ".", "..") for part in name.split("/")) or "\x00" in name:
            raise WfCommonsError(
                f"{where}: file {name!r} cannot be a datastore path (it is absolute, ends "
                "in '/', or has an empty, '.' or '..' part)")
        seen.setdefault(name, size)
    return tuple(seen.items())


def _check_children(children: Mapping[str, Any], tasks: Sequence[WfTask], source: str) -> None:
    """When tasks list ``children``, they must mirror the ``parents``."""
    parents = {t.name: set(t.parents) for t in tasks}
    for name, kids in children.items():
        if kids is None:
            continue
        for kid in kids:
            if kid not in parents:
                raise WfCommonsError(f"{source}: task {name!r} lists an unknown child "
                                     f"{kid!r}")
            if name not in parents[kid]:
                raise WfCommonsError(f"{source}: task {name!r} lists {kid!r} as a child, "
                                     f"but {kid!r} does not list it as a parent")
    for t in tasks:
        for p in t.parents:
            kids = children.get(p)
            if kids is not None and t.name not in kids:
                raise WfCommonsError(f"{source}: task {t.name!r} lists {p!r} as a parent, "
                                     f"but {p!r} does not list it as a child")


def _check_graph(tasks: Sequence[WfTask], source: str) -> None:
    names: set[str] = set()
    for t in tasks:
        if t.name in names:
            raise WfCommonsError(f"{source}: two tasks are named {t.name!r}")
        names.add(t.name)
    writer: dict[str, str] = {}
    for t in tasks:
        for p in t.parents:
            if p not in names:
                raise WfCommonsError(f"{source}: task {t.name!r} has an unknown parent {p!r}")
        own = {f for f, _ in t.inputs} & {f for f, _ in t.outputs}
        if own:
            raise WfCommonsError(f"{source}: task {t.name!r} both reads and writes "
                                 f"{sorted(own)[0]!r}; a replayed task cannot update a "
                                 "file in place")
        for f, _ in t.outputs:
            if f in writer:
                raise WfCommonsError(f"{source}: file {f!r} is written by two tasks, "
                                     f"{writer[f]!r} and {t.name!r}")
            writer[f] = t.name


# --- converting --------------------------------------------------------------------------

def default_prefix(path: Path) -> str:
    """The prefix of an instance file: its name without ``.json``."""
    stem = path.name.removesuffix(".json")
    if not PREFIX_RE.fullmatch(stem):
        raise WfCommonsError(f"{path}: the file name {stem!r} cannot be a task-name prefix "
                             "(letters, digits, _ . -, at most 100): pass --prefix NAME")
    return stem


def seconds(runtime: float, time_scale: float) -> float:
    """A scaled runtime as the task's ``sleep`` gets it (microseconds)."""
    return round(runtime * time_scale, 6)


def scaled_size(size: int, size_scale: float) -> int:
    return round(size * size_scale)


def convert(wf: Workflow, *, time_scale: float = 1.0, size_scale: float = 1.0,
            prefix: str, bucket: str = BUCKET) -> Conversion:
    """Task documents replaying ``wf``, its input files, and its critical path and work."""
    if not (math.isfinite(time_scale) and time_scale >= 0):
        raise WfCommonsError(f"--time-scale {time_scale!r}: give a non-negative number")
    if not (math.isfinite(size_scale) and size_scale >= 0):
        raise WfCommonsError(f"--size-scale {size_scale!r}: give a non-negative number")
    if not PREFIX_RE.fullmatch(prefix):
        raise WfCommonsError(f"--prefix {prefix!r}: use letters, digits and _ . - (at most "
                             "100, starting with a letter or digit)")
    index = {t.name: i for i, t in enumerate(wf.tasks)}
    writer = {f: i for i, t in enumerate(wf.tasks) for f, _ in t.outputs}
    parents: list[list[int]] = []
    after: list[list[int]] = []
    for t in wf.tasks:
        by_data = {writer[f] for f, _ in t.inputs if f in writer}
        declared = [index[p] for p in t.parents]
        after.append([p for p in dict.fromkeys(declared) if p not in by_data])
        parents.append(sorted(by_data | set(declared)))
    order = _topological(parents, wf)
    runtime = [seconds(t.runtime, time_scale) for t in wf.tasks]
    bottom = _bottom_levels(parents, order, runtime)
    ranks = {b: r for r, b in enumerate(sorted(set(bottom)))}

    def remote(f: str) -> str:
        return f"{bucket}:wf/{prefix}/{f}"

    inputs: dict[str, int] = {}
    documents: list[dict[str, Any]] = []
    for i in order:
        t = wf.tasks[i]
        outs = [(f, scaled_size(n, size_scale)) for f, n in t.outputs]
        for f, n in [*outs, *((f, scaled_size(n, size_scale)) for f, n in t.inputs)]:
            if n > MAX_FILE_BYTES:
                raise WfCommonsError(
                    f"{wf.source}: file {f!r} of task {t.name!r} would be {n} bytes at "
                    f"--size-scale {size_scale:g} (at most {MAX_FILE_BYTES} a file): pass a "
                    f"smaller --size-scale, e.g. {_suggest(n, size_scale)}")
        for f, n in t.inputs:
            if f not in writer:
                inputs[f] = max(inputs.get(f, 0), scaled_size(n, size_scale))
        argv = [SCRIPT, "wfcommons-task", _decimal(runtime[i])]
        for f, n in outs:
            argv += [str(n), f]
        doc: dict[str, Any] = {
            "name": f"{prefix}/{t.name}",
            "inputs": {remote(f): f for f, _ in t.inputs},
            "outputs": {remote(f): f for f, _ in outs},
            "commands": [{"command": argv, "shell": True}],
            "priority": min(ranks[bottom[i]], 1_000_000),
        }
        if after[i]:
            doc["after"] = [f"{prefix}/{wf.tasks[p].name}" for p in after[i]]
        _check_document(doc, wf.source, len(documents))
        documents.append(doc)
    position = {i: k for k, i in enumerate(order)}
    return Conversion(documents, sorted((remote(f), n) for f, n in inputs.items()),
                      [runtime[i] for i in order],
                      [sorted(position[p] for p in parents[i]) for i in order])


def _suggest(size: int, scale: float) -> str:
    target = scale * MAX_FILE_BYTES / size / 10
    return f"{10 ** math.floor(math.log10(target)):g}" if target > 0 else "0.001"


def _decimal(x: float) -> str:
    """Seconds as ``sleep`` reads them: plain decimal, never ``1e-06``."""
    return f"{x:.6f}".rstrip("0").rstrip(".") or "0"


def _check_document(doc: dict[str, Any], source: str, index: int) -> None:
    """Refuse here, naming the instance, what the push would refuse later."""
    _, problems = validate(doc, describe(index, None, doc))
    if problems:
        raise WfCommonsError(f"{source}: the converted {problems[0]} (rename it in the "
                             "instance, or pick a shorter --prefix)")


def _topological(parents: Sequence[Sequence[int]], wf: Workflow) -> list[int]:
    """Tasks parents first, in file order where the graph leaves a choice."""
    children = graph.invert(parents)
    pending = [len(p) for p in parents]
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in children.get(i, ()):
            pending[c] -= 1
            if pending[c] == 0:
                heapq.heappush(ready, c)
    if len(order) < len(parents):
        cycle = graph.find_cycle(parents) or []
        raise WfCommonsError(f"{wf.source}: dependency cycle (each runs before the next): "
                             + " -> ".join(wf.tasks[i].name for i in cycle))
    return order


def _bottom_levels(parents: Sequence[Sequence[int]], order: Sequence[int],
                   runtime: Sequence[float]) -> list[float]:
    """Per task, the longest path by runtime from its start to the workflow's end."""
    bottom = list(runtime)
    for i in reversed(order):  # children come later in the order: theirs are final
        for p in parents[i]:
            bottom[p] = max(bottom[p], runtime[p] + bottom[i])
    return bottom


# --- the workflow's inputs in the datastore ----------------------------------------------

def create_inputs(inputs: Sequence[tuple[str, int]], buckets: Mapping[str, str],
                  default_url: str) -> tuple[int, int]:
    """Write each input file (zeros, its scaled size) unless it is already there at that size.

    Each file is written under a temporary name and then moved into place, so an
    interrupted import leaves no short file that a later one would take as done.
    Returns (files written, bytes written).
    """
    written = nbytes = 0
    with Datastore(buckets, default_url) as store:
        for key, size in inputs:
            fs, path = store.resolve(parse_remote(key))
            with translated(f"creating the workflow input {key}"):
                if fs.exists(path) and fs.info(path).get("size") == size:
                    continue
                parent = path.rsplit("/", 1)[0]
                fs.makedirs(parent, exist_ok=True)
                temp = f"{parent}/.ecloud-import-{path.rsplit('/', 1)[1]}"
                with fs.open(temp, "wb") as f:
                    for start in range(0, size, len(ZEROS)):
                        f.write(ZEROS[:min(len(ZEROS), size - start)])
                if fs.exists(path):
                    fs.rm(path)
                fs.mv(temp, path)
            written += 1
            nbytes += size
    return written, nbytes
