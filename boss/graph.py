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
        return self.add_key(node, key(path), path.is_dir)

    def add_key(self, node: int, k: str, is_dir: bool) -> int | None:
        """:meth:`add` for an output already made a key (``bucket:path``, no '/' at the end)."""
        other = self._exact.get(k)
        if other is not None and other != node:
            return other
        self._exact[k] = node
        if is_dir:
            self._dirs[k + "/"] = node
        self._sorted = None
        return None

    def writers(self, path: RemotePath) -> set[int]:
        return self.writers_of(path.bucket, path.path)

    def writers_of(self, bucket: str, path: str, inside: bool = True) -> set[int]:
        """:meth:`writers` of ``bucket:path``; ``inside=False`` leaves out, for a
        directory, the outputs under it (the one lookup that needs a sorted index,
        rebuilt after every :meth:`add`)."""
        found: set[int] = set()
        stripped = path.rstrip("/")
        k = f"{bucket}:{stripped}"
        w = self._exact.get(k)
        if w is not None:
            found.add(w)
        if self._dirs:  # ancestors(), without making a RemotePath
            parts = stripped.split("/")
            for i in range(len(parts) - 1, 0, -1):
                w = self._dirs.get(f"{bucket}:{'/'.join(parts[:i])}/")
                if w is not None:
                    found.add(w)
        if inside and path.endswith("/"):
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
