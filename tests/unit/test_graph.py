"""The pure dependency graph: cycles, the output index, descendants."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boss.graph import OutputIndex, ancestors, descendants, find_cycle, invert, key
from protocol.document import parse_remote

PROPS = settings(max_examples=60, deadline=None, database=None)


def assert_real_cycle(parents: Sequence[Sequence[int]], cycle: list[int] | None) -> None:
    """``cycle`` is [a, b, ..., a] and each node is a parent of (runs before) the next."""
    assert cycle is not None
    assert len(cycle) >= 2
    assert cycle[0] == cycle[-1]
    assert len(set(cycle[:-1])) == len(cycle) - 1, "a cycle visits each node once"
    for a, b in itertools.pairwise(cycle):
        assert a in parents[b], f"{a} -> {b} is not an edge (parents[{b}] = {parents[b]})"


def has_cycle_kahn(parents: Sequence[Sequence[int]]) -> bool:
    """Reference: a graph is acyclic exactly when Kahn's algorithm orders every node."""
    n = len(parents)
    children = invert(parents)
    indegree = [len(set(p)) for p in parents]
    todo = [i for i in range(n) if indegree[i] == 0]
    done = 0
    while todo:
        node = todo.pop()
        done += 1
        for c in set(children.get(node, ())):
            indegree[c] -= 1
            if indegree[c] == 0:
                todo.append(c)
    return done != n


# --- find_cycle -------------------------------------------------------------------


@pytest.mark.parametrize("parents", [
    [],
    [[]],
    [[], [0], [0, 1], [2, 1, 0]],
    [[1, 2], [2], []],  # edges pointing forward in index order
    [[], [0], [0], [1, 2]],  # a diamond
    [[], [0, 0, 0]],  # repeated parents
])
def test_no_cycle(parents: list[list[int]]) -> None:
    assert find_cycle(parents) is None


def test_self_loop() -> None:
    # push refuses "after itself" before building the graph, but the graph still
    # reports a self-loop as a one-node cycle
    assert find_cycle([[], [1]]) == [1, 1]


def test_two_cycle() -> None:
    parents = [[1], [0]]
    cycle = find_cycle(parents)
    assert cycle in ([0, 1, 0], [1, 0, 1])
    assert_real_cycle(parents, cycle)


def test_long_cycle() -> None:
    n = 1000
    parents = [[(i - 1) % n] for i in range(n)]  # 0 -> 1 -> ... -> 999 -> 0
    cycle = find_cycle(parents)
    assert_real_cycle(parents, cycle)
    assert cycle is not None and len(cycle) == n + 1


def test_cycle_reachable_from_an_acyclic_part() -> None:
    # 0 -> 1 -> 2 -> 3 (3 waits on 2 ...) and 3 -> 4 -> 5 -> 3; 6 hangs off the side
    parents: list[list[int]] = [[], [0], [1], [2, 5], [3], [4], [0]]
    cycle = find_cycle(parents)
    assert_real_cycle(parents, cycle)
    assert cycle is not None and set(cycle) == {3, 4, 5}


def test_cycle_after_many_acyclic_roots() -> None:
    parents: list[list[int]] = [[] for _ in range(50)] + [[51], [50]]
    cycle = find_cycle(parents)
    assert_real_cycle(parents, cycle)
    assert cycle is not None and set(cycle) == {50, 51}


def test_200k_chain_without_recursion() -> None:
    n = 200_000
    # node i waits on i+1, so the search from node 0 goes 200k deep
    parents = [[i + 1] if i < n - 1 else [] for i in range(n)]
    assert find_cycle(parents) is None
    # close the chain into one 200k-node cycle
    parents[n - 1] = [0]
    cycle = find_cycle(parents)
    assert cycle is not None and len(cycle) == n + 1
    assert_real_cycle(parents, cycle)


# --- properties -------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn, min_nodes: int = 1) -> list[list[int]]:
    """A random DAG: node j may depend on any i < j (edges only from lower to higher)."""
    n = draw(st.integers(min_value=min_nodes, max_value=25))
    parents: list[list[int]] = []
    for j in range(n):
        ps = draw(st.lists(st.integers(min_value=0, max_value=j - 1), max_size=4)) if j else []
        parents.append(ps)
    return parents


@PROPS
@given(dags())
def test_random_dag_has_no_cycle(parents: list[list[int]]) -> None:
    assert find_cycle(parents) is None


@PROPS
@given(dags(min_nodes=2), st.data())
def test_back_edge_along_a_path_makes_a_cycle(parents: list[list[int]], data: st.DataObject
                                              ) -> None:
    n = len(parents)
    # a path through increasing nodes: each runs before the next
    path = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=2, max_size=n)))
    for a, b in itertools.pairwise(path):
        if a not in parents[b]:
            parents[b].append(a)
    assert find_cycle(parents) is None
    # the back edge: the first node of the path now waits on the last
    parents[path[0]].append(path[-1])
    assert_real_cycle(parents, find_cycle(parents))


@PROPS
@given(st.integers(1, 12).flatmap(
    lambda n: st.lists(st.lists(st.integers(0, n - 1), max_size=3), min_size=n, max_size=n)))
def test_any_graph_agrees_with_kahn(parents: list[list[int]]) -> None:
    cycle = find_cycle(parents)
    assert (cycle is not None) == has_cycle_kahn(parents)
    if cycle is not None:
        assert_real_cycle(parents, cycle)


# --- the output index -------------------------------------------------------------


def index(*outputs: tuple[int, str]) -> OutputIndex:
    idx = OutputIndex()
    for node, path in outputs:
        assert idx.add(node, parse_remote(path)) is None
    return idx


def writers(idx: OutputIndex, path: str) -> set[int]:
    return idx.writers(parse_remote(path))


def test_key_and_ancestors() -> None:
    assert key(parse_remote("data:a/b/")) == "data:a/b"
    assert key(parse_remote("data:a/b")) == "data:a/b"
    assert list(ancestors(parse_remote("data:a/b/c"))) == ["data:a/b/", "data:a/"]
    assert list(ancestors(parse_remote("data:a/b/"))) == ["data:a/"]
    assert list(ancestors(parse_remote("data:a"))) == []


def test_exact_output() -> None:
    idx = index((0, "data:x"), (1, "data:y/z"))
    assert writers(idx, "data:x") == {0}
    assert writers(idx, "data:y/z") == {1}
    assert writers(idx, "other:x") == set()
    assert writers(idx, "data:x/inner") == set()  # x is a file, not a directory
    assert writers(idx, "data:xy") == set()
    assert writers(idx, "x") == set()  # the default bucket is another bucket


def test_input_under_an_output_directory() -> None:
    idx = index((0, "data:d/"), (1, "data:d2/"))
    assert writers(idx, "data:d/f") == {0}
    assert writers(idx, "data:d/e/f/g") == {0}
    assert writers(idx, "data:d/") == {0}
    assert writers(idx, "data:d") == {0}
    assert writers(idx, "data:d2/f") == {1}
    assert writers(idx, "data:dx/f") == set()


def test_input_directory_holding_outputs() -> None:
    idx = index((1, "data:r/a"), (2, "data:r/b/c"), (3, "data:rx"), (4, "data:r-1"),
                (5, "other:r/a"))
    assert writers(idx, "data:r/") == {1, 2}
    assert writers(idx, "data:r/b/") == {2}
    assert writers(idx, "data:r") == set()  # a file named r holds nothing


def test_nested_writers_are_all_found() -> None:
    idx = index((0, "data:top/"), (1, "data:top/mid/"), (2, "data:top/mid/leaf"))
    assert writers(idx, "data:top/mid/leaf") == {0, 1, 2}
    assert writers(idx, "data:top/") == {0, 1, 2}


def test_adding_after_a_lookup_is_seen() -> None:
    idx = index((0, "data:r/a"))
    assert writers(idx, "data:r/") == {0}
    assert idx.add(1, parse_remote("data:r/b")) is None
    assert writers(idx, "data:r/") == {0, 1}


@pytest.mark.parametrize("second", ["data:x", "data:x/"])
def test_duplicate_writer(second: str) -> None:
    idx = index((0, "data:x"))
    assert idx.add(1, parse_remote(second)) == 0
    assert idx.add(0, parse_remote(second)) is None  # the same task twice is one writer
    assert writers(idx, "data:x") == {0}


# --- descendants and invert -------------------------------------------------------


def test_invert() -> None:
    assert invert([[], [0], [0, 1]]) == {0: [1, 2], 1: [2]}
    assert invert([]) == {}
    assert invert([[], []]) == {}


def test_descendants() -> None:
    children = invert([[], [0], [0], [1, 2], [], [4]])
    assert descendants(children, [0]) == {1, 2, 3}
    assert descendants(children, [1]) == {3}
    assert descendants(children, [3]) == set()
    assert descendants(children, [0, 4]) == {1, 2, 3, 5}
    assert descendants(children, []) == set()
    # a root reachable from another root is a descendant
    assert descendants(children, [0, 1]) == {1, 2, 3}


def test_descendants_of_a_cycle_and_a_long_chain() -> None:
    assert descendants({0: [1], 1: [0]}, [0]) == {0, 1}
    n = 200_000
    chain = {i: [i + 1] for i in range(n - 1)}
    assert len(descendants(chain, [0])) == n - 1


@PROPS
@given(dags())
def test_descendants_agree_with_parents(parents: list[list[int]]) -> None:
    children = invert(parents)
    for root in range(len(parents)):
        below = descendants(children, [root])
        assert root not in below  # acyclic
        # each direct child is below; everything below has a parent on the way down
        assert set(children.get(root, ())) <= below
        for d in below:
            assert any(p == root or p in below for p in parents[d])
