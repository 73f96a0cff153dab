"""The gce provider through the real google-api-python-client, against tests/gce_server.py.

Only 127.0.0.1 is ever contacted: credentials are anonymous and explicit,
NO_GCE_CHECK keeps google-auth off the metadata server, and every socket
connect to another address fails the test.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials

from boss.providers import Created, Failed, ProviderError, WorkerSpec, provider_for
from boss.providers import gce_requests as rq
from boss.providers.gce import GceProvider
from protocol.settings import Settings
from tests.gce_server import FakeCompute, serve

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBossHostKeyForTestsOnly0000000000000 root@boss"
PROJECT, ZONE = "proj", "us-central1-a"
QUOTA = "QUOTA_EXCEEDED CPUS in us-central1"


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    real = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else address
        assert host in ("127.0.0.1", "::1"), f"the test tried to reach {address}"
        real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


_OPEN: list[GceProvider] = []


@pytest.fixture
def fake() -> Iterator[FakeCompute]:
    with serve() as f:
        try:
            yield f
        finally:
            while _OPEN:
                _OPEN.pop().close()


def make_settings(url: str, boss: dict[str, Any] | None = None, **gce: Any) -> Settings:
    return Settings.model_validate({
        "gce": {"project": PROJECT, "zone": ZONE, "api_endpoint": url, **gce},
        "boss": {"ssh_host": "boss.example", "ssh_port": 2222, "ssh_user": "ecloud",
                 "listen": "127.0.0.1:7878", **(boss or {})},
    })


def make_provider(fake: FakeCompute, gce: dict[str, Any] | None = None,
                  boss: dict[str, Any] | None = None, **kw: Any) -> GceProvider:
    options: dict[str, Any] = {"boss_host_key": HOST_KEY, "worker_key": "WORKER-PRIVATE-KEY",
                               "credentials": AnonymousCredentials(), "retry_wait": 0.001,
                               "retry_wait_max": 0.01, "poll_seconds": 0.01, **kw}
    provider = GceProvider(make_settings(fake.url, boss, **(gce or {})), **options)
    _OPEN.append(provider)  # closed by the fake fixture (no socket left open)
    return provider


def specs(n: int, start: int = 1, spot: bool = False) -> list[WorkerSpec]:
    return [WorkerSpec(i, f"gce-{i:04x}beef", f"token-{i}", 2, spot)
            for i in range(start, start + n)]


def test_twenty_workers_quota_and_a_retried_503(fake: FakeCompute) -> None:
    fake.quota, fake.fail_first = 15, 1
    provider = make_provider(fake)
    results = provider.create(specs(20))
    assert [r.worker_id for r in results] == list(range(1, 21))
    created = [r for r in results if isinstance(r, Created)]
    failed = [r for r in results if isinstance(r, Failed)]
    assert len(created) == 15 and len(failed) == 5
    assert {f.error for f in failed} == {QUOTA}
    assert created[0].reference == f"zones/{ZONE}/instances/gce-0001beef"
    assert all(c.address and c.address.startswith("10.128.") for c in created)
    # the 503 was answered once and the same insert was sent again
    assert fake.failures_served == 1
    inserts = [c for c in fake.calls if c.method == "POST" and c.path.endswith("/instances")]
    assert len(inserts) == 21
    assert inserts[0].body == inserts[1].body
    assert inserts[0].query["requestId"] == inserts[1].query["requestId"]
    assert len(fake.instances) == 15


def test_errors_in_the_operation(fake: FakeCompute) -> None:
    fake.quota, fake.quota_in_operation, fake.op_polls = 2, True, 3
    fake.stockout = {"gce-0002beef"}
    results = make_provider(fake).create(specs(4))
    assert [type(r) for r in results] == [Created, Failed, Created, Failed]
    assert results[1] == Failed(2, f"ZONE_RESOURCE_POOL_EXHAUSTED in {ZONE}")
    assert results[3] == Failed(4, QUOTA)


def test_metadata_labels_and_spot(fake: FakeCompute) -> None:
    provider = make_provider(fake, {"labels": {"team": "render"}},
                             script_for=lambda s: f"#!/bin/sh\necho {s.name}\n")
    [plain, spot] = provider.create([*specs(1), *specs(1, start=2, spot=True)])
    assert isinstance(plain, Created) and isinstance(spot, Created)
    instance = fake.instances[(PROJECT, ZONE, "gce-0001beef")]
    meta = rq.metadata_items(instance)
    assert meta["startup-script"] == "#!/bin/sh\necho gce-0001beef\n"
    assert meta["ecloud-token"] == "token-1"
    assert meta["ecloud-boss-host-key"] == "[boss.example]:2222 " + " ".join(HOST_KEY.split()[:2])
    assert meta["ecloud-boss"] == "ssh://ecloud@boss.example:2222?port=7878"
    assert meta["ecloud-worker-key"] == "WORKER-PRIVATE-KEY"
    assert meta["ecloud-worker-id"] == "1" and meta["ecloud-slots"] == "2"
    assert instance["labels"] == {"team": "render", "ecloud-boss": "ecloud",
                                  "ecloud-worker-id": "1", "ecloud-worker": "gce-0001beef"}
    assert instance["scheduling"]["provisioningModel"] == "STANDARD"
    other = fake.instances[(PROJECT, ZONE, "gce-0002beef")]
    assert other["scheduling"]["provisioningModel"] == "SPOT"
    assert rq.metadata_items(other)["ecloud-token"] == "token-2"


def test_default_script_is_in_the_metadata(fake: FakeCompute) -> None:
    make_provider(fake).create(specs(1))
    meta = rq.metadata_items(fake.instances[(PROJECT, ZONE, "gce-0001beef")])
    # `boss worker-script`'s script, pinned to this ecloud, reading the same attributes
    script = meta["startup-script"]
    assert "worker" in script and "run --burst" in script
    for attribute in ("ecloud-token", "ecloud-boss", "ecloud-boss-host-key"):
        assert attribute in script and attribute in meta


def test_list_by_label_over_pages(fake: FakeCompute) -> None:
    fake.page_size = 3
    provider = make_provider(fake)
    provider.create(specs(7))
    fake.add_instance(PROJECT, ZONE, "someone-else", {"ecloud-boss": "other"})
    fake.add_instance(PROJECT, ZONE, "unlabelled", {})
    fake.add_instance(PROJECT, ZONE, "ours-stopped", {"ecloud-boss": "ecloud"},
                      status="TERMINATED")
    found = {i.name: i for i in provider.list()}
    assert set(found) == {f"gce-{i:04x}beef" for i in range(1, 8)} | {"ours-stopped"}
    assert not found["ours-stopped"].alive and found["gce-0001beef"].alive
    assert found["gce-0003beef"].reference == f"zones/{ZONE}/instances/gce-0003beef"
    lists = [c for c in fake.calls if c.method == "GET" and c.path.endswith("/instances")]
    assert len(lists) == 3  # 8 matching instances, 3 a page
    assert lists[0].query["filter"] == '(labels.ecloud-boss = "ecloud")'


@pytest.mark.parametrize("wait", [False, True])
def test_delete_and_delete_of_a_missing_instance(fake: FakeCompute, wait: bool) -> None:
    provider = make_provider(fake, wait_for_delete=wait)
    [a, b] = provider.create(specs(2))
    assert isinstance(a, Created) and isinstance(b, Created)
    provider.delete(a.reference)
    provider.delete("gce-0002beef")  # a bare name: the configured zone
    assert provider.list() == []
    provider.delete(a.reference)  # already gone: not an error
    provider.delete(f"zones/{ZONE}/instances/never-was")


def test_delete_failure_is_a_provider_error(fake: FakeCompute) -> None:
    fake.fail_first, fake.fail_status = 1, 400
    with pytest.raises(ProviderError, match="cannot delete instance x in us-central1-a"):
        make_provider(fake).delete("x")
    # a 404 for a zone that does not exist is not "already deleted"
    with pytest.raises(ProviderError, match="HTTP 404 notFound: The resource 'projects/proj/"
                       "zones/mars-1a' was not found"):
        make_provider(fake).delete("zones/mars-1a/instances/x")


def test_dry_run_prints_what_would_be_sent(fake: FakeCompute) -> None:
    lines: list[str] = []
    dry = make_provider(fake, {"spot": True}, dry_run=True, echo=lines.append)
    results = dry.create(specs(3))
    assert all(isinstance(r, Failed) and r.error.startswith("DRY_RUN") for r in results)
    dry.delete(f"zones/{ZONE}/instances/gce-0001beef")
    assert dry.list() == []
    assert fake.calls == []  # nothing was sent
    printed = [json.loads(line) for line in lines]
    assert [p["method"] for p in printed] == ["instances.insert"] * 3 + [
        "instances.delete", "instances.list"]
    assert printed[0]["project"] == PROJECT and printed[0]["zone"] == ZONE
    # the same specs, really sent: the bodies the API received are the ones printed
    make_provider(fake, {"spot": True}).create(specs(3))
    assert fake.bodies() == [p["body"] for p in printed[:3]]


def test_retries_are_bounded(fake: FakeCompute) -> None:
    fake.fail_first = 1000
    provider = make_provider(fake, retry_attempts=3)
    results = provider.create(specs(2))
    assert results == [Failed(i, "HTTP 503 backendError: The service is currently unavailable.")
                       for i in (1, 2)]
    assert len(fake.calls) == 6
    with pytest.raises(ProviderError, match="cannot list instances"):
        provider.list()


def test_an_operation_that_never_finishes(fake: FakeCompute) -> None:
    fake.op_polls = 10**9
    results = make_provider(fake, operation_seconds=0.05).create(specs(1))
    assert results == [Failed(1, "TIMEOUT waiting for instances.insert")]
    assert fake.instances == {}  # its deletion was asked for


def test_bulk_insert_with_quota(fake: FakeCompute) -> None:
    fake.quota = 4
    provider = make_provider(fake, bulk_from=5)
    results = provider.create(specs(6))
    assert [type(r) for r in results] == [Created] * 4 + [Failed] * 2
    assert {r.error for r in results if isinstance(r, Failed)} == {QUOTA}
    [bulk] = fake.bodies("/bulkInsert")
    assert bulk["count"] == "6" and len(bulk["perInstanceProperties"]) == 6
    shared = rq.metadata_items(bulk["instanceProperties"])
    assert "ecloud-token" not in shared and "startup-script" in shared
    for i in range(1, 5):
        meta = rq.metadata_items(fake.instances[(PROJECT, ZONE, f"gce-{i:04x}beef")])
        assert meta["ecloud-token"] == f"token-{i}"
        assert meta["ecloud-boss-host-key"].startswith("[boss.example]:2222 ssh-ed25519 ")
    assert len(provider.list()) == 4


def test_bulk_below_the_threshold_inserts_each(fake: FakeCompute) -> None:
    make_provider(fake, bulk_from=5).create(specs(4))
    assert fake.bodies("/bulkInsert") == [] and len(fake.bodies()) == 4


def test_missing_host_key_file(fake: FakeCompute, tmp_path: Any) -> None:
    provider = make_provider(fake, boss={"ssh_host_key_file": str(tmp_path / "nope.pub")},
                             boss_host_key=None)
    [result] = provider.create(specs(1))
    assert isinstance(result, Failed) and "ssh_host_key_file" in result.error
    assert fake.calls == []
    with pytest.raises(ProviderError, match=r"ssh_host_key_file"):
        provider.plan(specs(1))


def test_registered_as_gce(fake: FakeCompute, tmp_path: Any) -> None:
    key = tmp_path / "host.pub"
    key.write_text(HOST_KEY + "\n")
    settings = make_settings(fake.url, boss={"ssh_host_key_file": str(key)})
    settings.provider.default = "gce"
    provider = provider_for(settings)
    assert isinstance(provider, GceProvider)
    _OPEN.append(provider)
    assert provider.boot().known_hosts.startswith("[boss.example]:2222 ssh-ed25519 ")


def test_no_credentials(fake: FakeCompute, monkeypatch: pytest.MonkeyPatch,
                        tmp_path: Any) -> None:
    """Application-default credentials that do not exist: every worker fails, saying why."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    provider = make_provider(fake, credentials=None)
    results = provider.create(specs(2))
    assert [type(r) for r in results] == [Failed, Failed]
    assert all("no Google credentials" in r.error for r in results if isinstance(r, Failed))
    with pytest.raises(ProviderError, match="application-default login"):
        provider.list()
    assert fake.calls == []


def test_autoscaler_with_gce_creates_drains_deletes_and_reaps_orphans(
        fake: FakeCompute, tmp_path: Any) -> None:
    """The autoscaler over the gce provider: backlog -> instances (quota errors recorded and
    shown in status), a drained worker's instance deleted, an unknown labelled one too."""
    from boss.scaler import Scaler
    from boss.service import Boss
    from tests.conftest import make_settings as boss_settings
    from tests.integration.test_transitions import push, task

    s = boss_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db")
    g = make_settings(fake.url)
    s.gce, s.boss.ssh_host, s.boss.ssh_port = g.gce, g.boss.ssh_host, g.boss.ssh_port
    s.worker.slots, s.autoscale.max_workers, s.autoscale.idle_seconds = 1, 4, 0
    boss = Boss(s)
    boss.init()
    try:
        fake.quota = 4  # the orphan holds one until it is reaped, after the creations
        fake.add_instance(PROJECT, ZONE, "orphan-1", {"ecloud-boss": "ecloud"})
        provider = make_provider(fake)
        provider.settings = s
        push(boss, tmp_path, [task(f"t{i}") for i in range(4)])
        scaler = Scaler(boss, provider)
        decision = scaler.tick()
        assert decision.create == 4
        status = boss.status()
        assert status["workers"] == {"provisioning": 3, "failed": 1}
        assert status["worker_errors"] == [{"error": QUOTA, "count": 1}]
        assert "orphan-1" not in {i.name for i in provider.list()}  # reaped on tick 1
        # one worker comes up, is told to drain, leaves; its instance is deleted
        wid, *_ = [w["id"] for w in boss.workers() if w["state"] == "provisioning"]
        boss.goodbye(wid, "drained")
        before = {i.reference for i in provider.list()}
        scaler.tick()
        after = {i.reference for i in provider.list()}
        assert len(before - after) == 1
    finally:
        boss.close()
