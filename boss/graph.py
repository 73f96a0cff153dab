"""The dependency graph as plain data: implied edges, cycles, descendants.

Nodes are integers (positions in a push file); the functions are iterative
so a million-node graph does not hit Python's recursion limit.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence

from protocol.document import RemotePath


def ancestors(path: RemotePath) -> Iterator[str]:
    """Directory keys (``bucket:dir/``) that contain ``path``, nearest first."""
    parts = path.path.rstrip("/").split("/")
    for i in range(len(parts) - 1, 0, -1):
        yield f"{path.bucket}:{'/'.join(parts[:i])}/"


def key(path: RemotePath) -> str:
    """The key under which an output is indexed: ``bucket:path`` without trailing '/'."""
    return f"{path.bucket}:{path.path.rstrip('/')}"


class OutputIndex:
    """Which node writes which remote path, to find data-implied dependencies.

    A task depends on another when one of its inputs is that task's output,
    lies under an output directory, or is a directory holding that output.
    """

    def __init__(self) -> None:
        self._exact: dict[str, int] = {}
        self._dirs: dict[str, int] = {}  # "bucket:dir/" -> node
        self._sorted: list[str] | None = None

    def add(self, node: int, path: RemotePath) -> int | None:
        """Record an output; return the node that already writes it, if any."""
        k = key(path)
        other = self._exact.get(k)
        if other is not None and other != node:
            return other
        self._exact[k] = node
        if path.is_dir:
            self._dirs[k + "/"] = node
        self._sorted = None
        return None

    def writers(self, path: RemotePath) -> set[int]:
        found: set[int] = set()
        k = key(path)
        if k in self._exact:
            found.add(self._exact[k])
        for d in ancestors(path):
            if d in self._dirs:
                found.add(self._dirs[d])
        if path.is_dir:
            if self._sorted is None:
                self._sorted = sorted(self._exact)
            prefix = k + "/"
            i = bisect.bisect_left(self._sorted, prefix)
            while i < len(self._sorted) and self._sorted[i].startswith(prefix):
                found.add(self._exact[self._sorted[i]])
                i += 1
        return found


def find_cycle(parents: Sequence[Iterable[int]]) -> list[int] | None:
    """Return one cycle as a node list ``[a, b, ..., a]`` or None.

    ``parents[n]`` lists the nodes n depends on. Iterative three-colour DFS.
    """
    n = len(parents)
    colour = bytearray(n)  # 0 new, 1 on stack, 2 done
    for root in range(n):
        if colour[root]:
            continue
        stack: list[tuple[int, Iterator[int]]] = [(root, iter(parents[root]))]
        colour[root] = 1
        while stack:
            node, it = stack[-1]
            for nxt in it:
                if colour[nxt] == 0:
                    colour[nxt] = 1
                    stack.append((nxt, iter(parents[nxt])))
                    break
                if colour[nxt] == 1:
                    path = [s[0] for s in stack]
                    cycle = [*path[path.index(nxt):], nxt]
                    cycle.reverse()  # read as "a -> b": a must run before b
                    return cycle
            else:
                colour[node] = 2
                stack.pop()
    return None


def descendants(children: dict[int, list[int]], roots: Iterable[int]) -> set[int]:
    """Every node reachable from ``roots`` through ``children`` (roots excluded)."""
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        for child in children.get(node, ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def invert(parents: Sequence[Iterable[int]]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for child, ps in enumerate(parents):
        for p in ps:
            children[p].append(child)
    return children
