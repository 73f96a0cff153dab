"""worker.backoff: capped exponential delays with full jitter."""

from __future__ import annotations

import itertools
import random

import pytest

from worker.backoff import backoff_delays


class Highest(random.Random):
    """Always draws the top of the range, exposing the ceiling sequence."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_ceiling_doubles_then_stays_at_the_cap() -> None:
    delays = list(itertools.islice(backoff_delays(0.5, 10.0, Highest()), 8))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_delays_are_jittered_within_zero_and_the_ceiling() -> None:
    delays = list(itertools.islice(backoff_delays(0.1, 5.0, random.Random(42)), 200))
    ceilings = [min(5.0, 0.1 * 2**n) for n in range(200)]
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    # full jitter, not equal jitter: capped delays spread over the whole range
    capped = delays[10:]
    assert min(capped) < 1.0 and max(capped) > 4.0


def test_same_seed_same_delays_and_a_long_outage_never_overflows() -> None:
    first = list(itertools.islice(backoff_delays(1, 60, random.Random(7)), 5000))
    again = list(itertools.islice(backoff_delays(1, 60, random.Random(7)), 5000))
    assert first == again and max(first) <= 60


def test_default_rng_works() -> None:
    assert 0 <= next(backoff_delays(1.0, 2.0)) <= 1.0


@pytest.mark.parametrize(("base", "cap", "why"), [
    (0.0, 1.0, "base must be > 0"),
    (-1.0, 1.0, "base must be > 0"),
    (float("nan"), 1.0, "base must be > 0"),
    (2.0, 1.0, "must be >= base"),
])
def test_bad_arguments_are_refused(base: float, cap: float, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        next(backoff_delays(base, cap))
