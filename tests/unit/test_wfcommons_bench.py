"""Benchmark 6's own logic (benchmarks/wfcommons.py): its bounds, verdicts and options.

The end-to-end run is tests/test_benchmarks.py's (once, at its tiny size);
these check, without running anything, that the lower bounds it judges
ecloud against are lower bounds, and that a slot count on which no schedule
can meet the goal is called so.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import wfcommons as bench
from boss.wfcommons import Conversion


def graph(runtimes: list[float], parents: list[list[int]],
          priorities: list[int] | None = None) -> Conversion:
    docs: list[dict[str, Any]] = [{"name": f"t{k}", "priority": p} for k, p in
                                  enumerate(priorities or [0] * len(runtimes))]
    return Conversion(docs, [], runtimes, parents)


def test_rounds_bound_sees_tasks_that_do_not_fit_in_one_round() -> None:
    # five 2 s tasks on 2 slots: total work / slots says 5 s, but one slot runs three
    conv = graph([2.0] * 5, [[]] * 5)
    assert conv.bound(2) == 5.0 and conv.level_bound(2) == 5.0
    assert bench.rounds_bound(conv, 2) == 6.0
    assert conv.list_schedule(2) == 6.0


def test_rounds_bound_adds_the_head_and_the_tail() -> None:
    # split (1 s) -> three 2 s tasks -> merge (0.5 s), on 2 slots: 1 + 2 x 2 + 0.5
    conv = graph([1.0, 2.0, 2.0, 2.0, 0.5], [[], [0], [0], [0], [1, 2, 3]])
    assert bench.rounds_bound(conv, 2) == 5.5
    assert bench.rounds_bound(conv, 3) == 3.5  # one round: the critical path
    assert conv.critical_path == 3.5


@st.composite
def dags(draw: st.DrawFn) -> tuple[Conversion, int]:
    n = draw(st.integers(1, 9))
    runtimes = [draw(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 7.0])) for _ in range(n)]
    parents = [sorted(draw(st.sets(st.integers(0, k - 1), max_size=3))) if k else []
               for k in range(n)]
    priorities = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    return graph(runtimes, parents, priorities), draw(st.integers(1, 4))


@settings(max_examples=300, deadline=None)
@given(dags())
def test_the_bounds_are_below_a_real_schedule(case: tuple[Conversion, int]) -> None:
    # the list schedule is a schedule (any priorities): no lower bound may exceed it
    conv, slots = case
    made = conv.list_schedule(slots)
    assert bench.rounds_bound(conv, slots) <= made + 1e-9
    assert conv.level_bound(slots) <= made + 1e-9


def test_attainable_says_no_yes_or_unproven() -> None:
    assert bench.attainable(10.0, 16.37, 16.4) == "no (optimum >= 1.637)"
    assert bench.attainable(10.0, 10.0, 10.5) == "yes (optimum 1.000-1.050)"
    assert bench.attainable(10.0, 10.0, 10.0) == "yes (optimum 1.000)"
    assert bench.attainable(10.0, 10.9, 11.5) == "unproven (optimum 1.090-1.150)"


def figures(makespans: tuple[float, ...], bound: float = 45.0,
            level: float = 45.0) -> bench.Figures:
    return bench.Figures("wf", 4, 10, 0.5, 45.0, 40.0, bound, level, bound, bound,
                         makespans, (0.01,) * len(makespans), (0.0,) * len(makespans))


def test_figures_are_medians_and_name_the_verdict() -> None:
    met = figures((49.0, 46.0, 47.0))
    assert met.makespan == 47.0 and met.verdict == "met"
    row = met.row()
    assert row["runs"] == 3 and row["makespan range s"] == "46.0-49.0"
    assert row["attainable"] == "yes (optimum 1.000)" and row["goal <= 1.10"] is True
    assert figures((60.0,)).verdict == "NOT met"
    # the level bound 1.64 x the issue's: the miss is the workflow's shape
    shape = figures((80.0,), bound=45.0, level=73.7)
    assert shape.attainable == "no (optimum >= 1.638)"
    assert shape.verdict.startswith("not met, infeasible by construction; 1.085")


def test_several_slot_counts_and_repeats() -> None:
    args = bench.parse(["--slots", "4", "40", "4", "--repeat", "3"])
    assert args.slots == [4, 40] and args.repeat == 3
    assert bench.parse([]).slots == [4]


@pytest.mark.parametrize("argv", [["--slots", "4", "0"], ["--slots", "2", "8", "--workers",
                                                         "3"], ["--repeat", "0"]])
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse(argv)
