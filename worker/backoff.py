"""Reconnect delays: capped exponential backoff with full jitter.

Pure: the caller sleeps and decides when to give up. Full jitter (a uniform
draw between 0 and the capped exponential) spreads a fleet of workers that lost
the boss at the same moment, so they do not reconnect in lock-step when it comes
back (AWS Architecture Blog, "Exponential Backoff And Jitter").
"""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(base: float, cap: float, rng: random.Random | None = None) -> Iterator[float]:
    """Yield endless delays in seconds: the n-th is uniform in [0, min(cap, base * 2**n)].

    ``rng`` makes the sequence reproducible in tests; by default a fresh
    ``random.Random()``. The iterator never ends: bound it with
    ``itertools.islice`` or a deadline.
    """
    if not base > 0:
        raise ValueError(f"backoff base must be > 0 seconds, got {base!r}")
    if not cap >= base:
        raise ValueError(f"backoff cap ({cap!r} s) must be >= base ({base!r} s)")
    draw = rng if rng is not None else random.Random()
    ceiling = base
    while True:
        yield draw.uniform(0.0, ceiling)
        # stop doubling once capped, so the float never overflows on a long outage
        ceiling = min(cap, ceiling * 2)
