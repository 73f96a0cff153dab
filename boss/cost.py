"""What the workers cost: prices per worker-hour from ``[cost]``, pure arithmetic.

A worker's **price** comes from its provider: ``[cost] local`` and ``[cost] ssh``
are flat prices per worker-hour; a ``gce`` worker is priced by ``[gce]
machine_type`` in ``[cost] gce`` (or ``[cost] gce_spot`` when ``[gce] spot``);
a ``manual`` worker (registered with ``boss admin add-worker``) costs nothing
we can know, so 0. A provider or machine type without a price gives ``None``
(unknown), never a made-up number.

A worker's **VM-seconds** run from its row's ``created_at`` (when the boss
asked for it: a cloud bills from then) to ``last_seen`` once it has ended
(terminated, lost, failed), or to ``now`` while it lives.

A task's **cost** is its attempts' busy seconds times the price per second of
the worker each ran on. That is the task's share of what its workers were
busy for; idle and boot time is not spread over tasks. The two totals need
not nest: a lost attempt lasts until the boss gave it up, while its worker's
VM-seconds stop at the worker's last contact.

Nothing here does I/O: callers pass rows and settings in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from protocol.settings import CostSettings, Settings

# worker states after which the machine no longer runs (boss/service.py sets them)
ENDED = frozenset({"terminated", "lost", "failed"})


@dataclass(frozen=True)
class WorkerUsage:
    """The fields of a worker row that its cost depends on."""

    id: int
    provider: str
    state: str
    created_at: float
    last_seen: float | None


@dataclass(frozen=True)
class WorkerCost:
    worker_id: int
    seconds: float
    per_hour: float | None  # None: no price known for its provider or machine type
    cost: float | None


def hourly_price(provider: str, prices: CostSettings, machine_type: str = "",
                 spot: bool = False) -> float | None:
    """Price of one worker-hour of ``provider``; None when the settings hold none."""
    if provider == "manual":
        return 0.0
    if provider == "local":
        return prices.local
    if provider == "ssh":
        return prices.ssh
    if provider == "gce":
        return (prices.gce_spot if spot else prices.gce).get(machine_type)
    return None


def price_for(provider: str, settings: Settings) -> float | None:
    """:func:`hourly_price` with the machine type and spot flag of ``[gce]``.

    Worker rows do not record their machine type, so every gce worker is
    priced as the settings say now.
    """
    return hourly_price(provider, settings.cost, settings.gce.machine_type, settings.gce.spot)


def vm_seconds(state: str, created_at: float, last_seen: float | None, now: float) -> float:
    """Seconds the worker's machine has existed (0 for an ended worker never seen)."""
    if state in ENDED:
        end = last_seen if last_seen is not None else created_at
    else:
        end = now
    return max(0.0, end - created_at)


def charge(seconds: float, per_hour: float | None) -> float | None:
    """Cost of ``seconds`` at ``per_hour``; None when the price is unknown."""
    return None if per_hour is None else seconds / 3600.0 * per_hour


def worker_costs(rows: Iterable[WorkerUsage], settings: Settings, now: float
                 ) -> list[WorkerCost]:
    out = []
    for w in rows:
        seconds = vm_seconds(w.state, w.created_at, w.last_seen, now)
        per_hour = price_for(w.provider, settings)
        out.append(WorkerCost(w.id, seconds, per_hour, charge(seconds, per_hour)))
    return out


def busy_cost(busy_seconds: Mapping[int | None, float],
              per_hour: Mapping[int, float | None]) -> tuple[float, float]:
    """Cost of attempt seconds by worker id: (priced cost, seconds left unpriced).

    Attempts whose worker row is gone (``None``) or has no known price are
    counted as unpriced seconds rather than as free.
    """
    cost = 0.0
    unpriced = 0.0
    for worker_id, seconds in busy_seconds.items():
        price = per_hour.get(worker_id) if worker_id is not None else None
        if price is None:
            unpriced += seconds
        else:
            cost += seconds / 3600.0 * price
    return cost, unpriced
