"""Property tests of the task state machine (boss/lifecycle.py): pure, no database."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from boss.lifecycle import (
    ALIVE,
    MAX_LOST,
    RETRYABLE,
    TERMINAL,
    TRANSITIONS,
    AttemptState,
    Outcome,
    TaskState,
    after_attempt,
    allowed,
    initial_state,
)

T = TaskState
A = AttemptState

ENDINGS = [a for a in AttemptState if a is not A.RUNNING]
FAILURES = (A.FAILED, A.TIMEOUT)

task_states = st.sampled_from(list(TaskState))
endings = st.sampled_from(ENDINGS)
max_tries_st = st.integers(min_value=1, max_value=101)  # retries 0..100, as documents allow


@st.composite
def counts(draw: st.DrawFn) -> tuple[int, int, int]:
    """(tries, lost, max_tries) of a task that is running: tries left, lost within its cap."""
    max_tries = draw(max_tries_st)
    tries = draw(st.integers(min_value=0, max_value=max_tries - 1))
    lost = draw(st.integers(min_value=0, max_value=MAX_LOST))
    return tries, lost, max_tries


def run_attempts(outcomes: list[AttemptState], max_tries: int) -> tuple[Outcome, int]:
    """Feed attempt outcomes to a fresh task until it leaves the queue.

    Returns the last outcome and how many attempts were used. The loop is
    bounded by the outcome list itself.
    """
    tries = lost = 0
    last = Outcome(T.READY, 0, 0, cascade=False)
    used = 0
    for attempt in outcomes:
        last = after_attempt(attempt, tries, lost, max_tries)
        used += 1
        tries, lost = last.tries, last.lost
        if last.task_state is not T.READY:
            break
    return last, used


# --- the transition table -------------------------------------------------


def test_table_covers_every_state_and_has_no_self_loops() -> None:
    assert set(TRANSITIONS) == set(TaskState)
    for src, dsts in TRANSITIONS.items():
        assert dsts <= set(TaskState)
        assert src not in dsts, f"{src} -> {src} is not a transition"


def test_terminal_and_alive_partition_the_states() -> None:
    assert TERMINAL | ALIVE == set(TaskState)
    assert not TERMINAL & ALIVE
    assert RETRYABLE <= TERMINAL
    assert TERMINAL - RETRYABLE == {T.SUCCEEDED}


@given(task_states, task_states)
def test_allowed_is_the_table(src: TaskState, dst: TaskState) -> None:
    assert allowed(src, dst) == (dst in TRANSITIONS[src])


@given(st.lists(task_states, max_size=30))
def test_succeeded_is_absorbing(steps: list[TaskState]) -> None:
    """No path of allowed transitions ever leaves succeeded."""
    state = T.SUCCEEDED
    for dst in steps:
        if allowed(state, dst):
            state = dst
    assert state is T.SUCCEEDED
    assert TRANSITIONS[T.SUCCEEDED] == frozenset()


def test_only_claims_enter_running_and_only_ready_tasks_are_claimed() -> None:
    assert [s for s in TaskState if allowed(s, T.RUNNING)] == [T.READY]


def test_every_state_but_succeeded_can_still_reach_it() -> None:
    """Breadth-first over the table: every state but succeeded itself can still succeed."""
    for start in TaskState:
        seen = {start}
        todo = deque([start])
        while todo:
            for nxt in TRANSITIONS[todo.popleft()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        if start is T.SUCCEEDED:
            assert seen == {T.SUCCEEDED}
        else:
            assert T.SUCCEEDED in seen, start


@given(task_states)
def test_retry_targets_are_the_only_exits_from_retryable_states(state: TaskState) -> None:
    if state in RETRYABLE:
        assert TRANSITIONS[state] == {T.READY, T.WAITING}
    if state in ALIVE:
        assert T.CANCELLED in TRANSITIONS[state]


# --- one finished attempt -------------------------------------------------


@given(endings, counts())
def test_every_outcome_is_an_allowed_transition_from_running(
        attempt: AttemptState, c: tuple[int, int, int]) -> None:
    tries, lost, max_tries = c
    out = after_attempt(attempt, tries, lost, max_tries)
    assert allowed(T.RUNNING, out.task_state)
    # descendants are failed exactly when the task will never succeed
    assert out.cascade == (out.task_state in (T.FAILED, T.CANCELLED))
    assert out.task_state is not T.UPSTREAM_FAILED


@given(endings, counts())
def test_counters_move_by_at_most_one_and_apart(
        attempt: AttemptState, c: tuple[int, int, int]) -> None:
    tries, lost, max_tries = c
    out = after_attempt(attempt, tries, lost, max_tries)
    assert out.tries - tries in (0, 1)
    assert out.lost - lost in (0, 1)
    if attempt is A.LOST:
        assert (out.tries, out.lost) == (tries, lost + 1), "a lost attempt spends no retry"
    elif attempt in FAILURES or attempt is A.SUCCEEDED:
        assert (out.tries, out.lost) == (tries + 1, lost)
    else:  # cancelled: not the task's fault, not the worker's either
        assert (out.tries, out.lost) == (tries, lost)


@given(counts())
def test_outcome_of_each_ending(c: tuple[int, int, int]) -> None:
    tries, lost, max_tries = c
    assert after_attempt(A.SUCCEEDED, tries, lost, max_tries).task_state is T.SUCCEEDED
    assert after_attempt(A.CANCELLED, tries, lost, max_tries).task_state is T.CANCELLED
    for failure in FAILURES:
        got = after_attempt(failure, tries, lost, max_tries).task_state
        assert got is (T.FAILED if tries + 1 >= max_tries else T.READY)
    got = after_attempt(A.LOST, tries, lost, max_tries).task_state
    assert got is (T.FAILED if lost + 1 > MAX_LOST else T.READY)


@given(counts())
def test_running_is_not_an_ending(c: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="not an ending"):
        after_attempt(A.RUNNING, *c)


# --- a task's whole life --------------------------------------------------


@given(max_tries_st, st.lists(st.sampled_from(FAILURES), min_size=101, max_size=101))
def test_real_failures_fail_the_task_after_exactly_max_tries(
        max_tries: int, failures: list[AttemptState]) -> None:
    last, used = run_attempts(failures, max_tries)
    assert last.task_state is T.FAILED and last.cascade
    assert used == max_tries == last.tries
    assert last.lost == 0


@given(max_tries_st)
def test_lost_attempts_fail_the_task_after_max_lost_plus_one(max_tries: int) -> None:
    last, used = run_attempts([A.LOST] * (MAX_LOST + 10), max_tries)
    assert last.task_state is T.FAILED and last.cascade
    assert used == MAX_LOST + 1 == last.lost
    assert last.tries == 0


@given(max_tries_st,
       st.lists(st.sampled_from([*FAILURES, A.LOST]), min_size=MAX_LOST + 102,
                max_size=MAX_LOST + 102))
def test_failures_and_losses_are_counted_apart(
        max_tries: int, outcomes: list[AttemptState]) -> None:
    """Mixed failures and losses: whichever budget runs out first ends the task."""
    last, used = run_attempts(outcomes, max_tries)
    assert last.task_state is T.FAILED
    seen = outcomes[:used]
    real = sum(1 for a in seen if a in FAILURES)
    lost = sum(1 for a in seen if a is A.LOST)
    assert (last.tries, last.lost) == (real, lost)
    assert real == max_tries or lost == MAX_LOST + 1
    assert real <= max_tries and lost <= MAX_LOST + 1
    # it ended at the first moment a budget was spent, not later
    assert used <= max_tries + MAX_LOST


@given(max_tries_st, st.lists(endings, min_size=1, max_size=200))
def test_any_history_ends_or_stays_ready_consistently(
        max_tries: int, outcomes: list[AttemptState]) -> None:
    last, used = run_attempts(outcomes, max_tries)
    seen = outcomes[:used]
    assert used <= max_tries + MAX_LOST
    if last.task_state is T.READY:
        assert used == len(outcomes)
        assert last.tries < max_tries and last.lost <= MAX_LOST
    if last.task_state is T.SUCCEEDED:
        assert seen[-1] is A.SUCCEEDED and not last.cascade
    if last.task_state is T.CANCELLED:
        assert seen[-1] is A.CANCELLED
    # before the last attempt, every one sent the task back to the queue
    assert all(a in (*FAILURES, A.LOST) for a in seen[:-1])


# --- a new or retried task ------------------------------------------------


@given(st.lists(task_states, max_size=12))
def test_initial_state(parents: list[TaskState]) -> None:
    got = initial_state(parents)
    bad = {T.FAILED, T.UPSTREAM_FAILED, T.CANCELLED}
    if any(p in bad for p in parents):
        assert got is T.UPSTREAM_FAILED
    elif all(p is T.SUCCEEDED for p in parents):
        assert got is T.READY
    else:
        assert got is T.WAITING
        assert any(p in ALIVE for p in parents)
    assert initial_state(list(reversed(parents))) is got


@given(st.lists(task_states, max_size=12), st.sampled_from(sorted(RETRYABLE)))
def test_retry_lands_on_an_allowed_state(parents: list[TaskState], was: TaskState) -> None:
    """A retried task takes initial_state; unless it stays upstream_failed, that is allowed."""
    got = initial_state(parents)
    if got is not T.UPSTREAM_FAILED:
        assert allowed(was, got)


@given(st.lists(task_states, max_size=12))
def test_waiting_task_can_follow_its_parents(parents: list[TaskState]) -> None:
    """Whatever the parents do next, the state initial_state gives can get there."""
    got = initial_state(parents)
    if got is T.WAITING:
        assert allowed(T.WAITING, T.READY) and allowed(T.WAITING, T.UPSTREAM_FAILED)
    if got is T.READY:
        assert allowed(T.READY, T.RUNNING) and allowed(T.READY, T.UPSTREAM_FAILED)
