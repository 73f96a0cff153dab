"""boss.cost: prices, VM-seconds and charges, as tables of cases."""

from __future__ import annotations

import pytest

from boss import cost
from protocol.settings import CostSettings, Settings

PRICES = CostSettings(currency="EUR", local=0.5, ssh=1.25,
                      gce={"e2-standard-2": 0.067, "n2-standard-4": 0.194},
                      gce_spot={"e2-standard-2": 0.022})


@pytest.mark.parametrize(("provider", "machine_type", "spot", "want"), [
    ("manual", "", False, 0.0),
    ("manual", "e2-standard-2", True, 0.0),
    ("local", "", False, 0.5),
    ("local", "e2-standard-2", True, 0.5),      # machine type only matters for gce
    ("ssh", "", False, 1.25),
    ("gce", "e2-standard-2", False, 0.067),
    ("gce", "e2-standard-2", True, 0.022),
    ("gce", "n2-standard-4", False, 0.194),
    ("gce", "n2-standard-4", True, None),       # no spot price given: unknown, not 0
    ("gce", "a2-highgpu-1g", False, None),
    ("gce", "", False, None),
    ("azure", "", False, None),                 # a provider without prices
])
def test_hourly_price(provider: str, machine_type: str, spot: bool,
                      want: float | None) -> None:
    assert cost.hourly_price(provider, PRICES, machine_type, spot) == want


@pytest.mark.parametrize(("gce", "want"), [
    ({"machine_type": "e2-standard-4"}, 0.134),
    ({"machine_type": "e2-standard-4", "spot": True}, 0.044),
    ({"machine_type": "custom-8-32768"}, None),
])
def test_price_for_reads_gce_settings(gce: dict[str, object], want: float | None) -> None:
    settings = Settings.model_validate({"gce": gce})
    assert cost.price_for("gce", settings) == want
    assert cost.price_for("local", settings) == 0.0  # the built-in default


@pytest.mark.parametrize(("state", "created", "last_seen", "now", "want"), [
    ("idle", 100.0, 150.0, 400.0, 300.0),         # alive: until now
    ("busy", 100.0, None, 400.0, 300.0),
    ("provisioning", 100.0, None, 160.0, 60.0),   # billed from the request on
    ("draining", 100.0, 390.0, 400.0, 300.0),
    ("terminated", 100.0, 250.0, 400.0, 150.0),   # ended: until last seen
    ("lost", 100.0, 130.0, 400.0, 30.0),
    ("failed", 100.0, 100.5, 400.0, 0.5),
    ("failed", 100.0, None, 400.0, 0.0),          # never seen: nothing to bill
    ("terminated", 100.0, 90.0, 400.0, 0.0),      # clock skew never gives negative time
])
def test_vm_seconds(state: str, created: float, last_seen: float | None, now: float,
                    want: float) -> None:
    assert cost.vm_seconds(state, created, last_seen, now) == pytest.approx(want)


@pytest.mark.parametrize(("seconds", "per_hour", "want"), [
    (3600.0, 0.067, 0.067),
    (1800.0, 2.0, 1.0),
    (0.0, 5.0, 0.0),
    (7200.0, 0.0, 0.0),
    (3600.0, None, None),
])
def test_charge(seconds: float, per_hour: float | None, want: float | None) -> None:
    got = cost.charge(seconds, per_hour)
    assert got == (None if want is None else pytest.approx(want))


def test_worker_costs() -> None:
    settings = Settings.model_validate({
        "cost": {"local": 0.36, "gce": {"e2-standard-2": 0.072}},
        "gce": {"machine_type": "e2-standard-2"},
    })
    rows = [
        cost.WorkerUsage(1, "local", "terminated", 0.0, 1000.0),
        cost.WorkerUsage(2, "gce", "busy", 500.0, 1900.0),
        cost.WorkerUsage(3, "manual", "idle", 0.0, 10.0),
        cost.WorkerUsage(4, "mystery", "lost", 0.0, 100.0),
    ]
    got = {c.worker_id: c for c in cost.worker_costs(rows, settings, now=2300.0)}
    assert (got[1].seconds, got[1].per_hour) == (1000.0, 0.36)
    assert got[1].cost is not None and got[1].cost == pytest.approx(0.1)
    assert (got[2].seconds, got[2].per_hour) == (1800.0, 0.072)
    assert got[2].cost is not None and got[2].cost == pytest.approx(0.036)
    assert got[3] == cost.WorkerCost(3, 2300.0, 0.0, 0.0)
    assert got[4] == cost.WorkerCost(4, 100.0, None, None)


@pytest.mark.parametrize(("busy", "prices", "want_cost", "want_unpriced"), [
    ({}, {}, 0.0, 0.0),
    ({1: 3600.0}, {1: 0.5}, 0.5, 0.0),
    ({1: 1800.0, 2: 7200.0}, {1: 1.0, 2: 0.25}, 1.0, 0.0),
    ({1: 1800.0, 2: 60.0}, {1: 1.0, 2: None}, 0.5, 60.0),   # unknown price: not free
    ({None: 30.0, 1: 3600.0}, {1: 2.0}, 2.0, 30.0),         # worker row deleted
    ({7: 10.0}, {1: 2.0}, 0.0, 10.0),                       # worker not in the table
])
def test_busy_cost(busy: dict[int | None, float], prices: dict[int, float | None],
                   want_cost: float, want_unpriced: float) -> None:
    got_cost, got_unpriced = cost.busy_cost(busy, prices)
    assert got_cost == pytest.approx(want_cost)
    assert got_unpriced == pytest.approx(want_unpriced)
