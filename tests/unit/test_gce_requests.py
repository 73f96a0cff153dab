"""The gce provider's request bodies and error summaries (pure; no client, no network)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from boss.providers import WorkerSpec, reach
from boss.providers import gce_requests as rq
from protocol.settings import GceSettings

ZONE = "us-central1-a"
BOOT = reach.Boot(boss_url="ssh://ecloud@boss:22?port=7878",
               known_hosts="boss ssh-ed25519 AAAA", worker_key="KEY")
SPEC = WorkerSpec(7, "gce-0a1b2c3d", "secret-token", 4)


def body(gce: GceSettings | None = None, spec: WorkerSpec = SPEC, spot: bool = False
         ) -> dict[str, Any]:
    return rq.instance_body(gce or GceSettings(), ZONE, spec, "#!/bin/sh\n", BOOT, spot)


def test_instance_body_defaults() -> None:
    b = body()
    assert b["name"] == "gce-0a1b2c3d"
    assert b["machineType"] == f"zones/{ZONE}/machineTypes/e2-standard-2"
    assert b["disks"] == [{"boot": True, "autoDelete": True, "type": "PERSISTENT",
                           "initializeParams": {
                               "sourceImage": "projects/debian-cloud/global/images/family/"
                                              "debian-12",
                               "diskSizeGb": "20"}}]
    assert b["networkInterfaces"] == [{"network": "global/networks/default", "accessConfigs": [
        {"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]}]
    assert b["serviceAccounts"] == [{"email": "default", "scopes": [
        "https://www.googleapis.com/auth/cloud-platform"]}]
    assert b["labels"] == {"ecloud-boss": "ecloud", "ecloud-worker-id": "7",
                           "ecloud-worker": "gce-0a1b2c3d"}
    assert b["scheduling"]["provisioningModel"] == "STANDARD"
    json.dumps(b)  # the body is plain JSON


def test_metadata_carries_script_token_host_key_and_identity() -> None:
    items = rq.metadata_items(body())
    assert items == {"startup-script": "#!/bin/sh\n",
                     "ecloud-boss-host-key": "boss ssh-ed25519 AAAA",
                     "ecloud-boss": "ssh://ecloud@boss:22?port=7878", "ecloud-worker-key": "KEY",
                     "ecloud-token": "secret-token", "ecloud-worker-id": "7",
                     "ecloud-worker-name": "gce-0a1b2c3d", "ecloud-slots": "4"}


def test_no_worker_key_no_item() -> None:
    boot = reach.Boot(boss_url="u", known_hosts="k")
    assert "ecloud-worker-key" not in rq.shared_metadata("s", boot)


def test_spot_scheduling() -> None:
    assert body(spot=True)["scheduling"] == {
        "provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
        "onHostMaintenance": "TERMINATE", "automaticRestart": False}


def test_custom_settings() -> None:
    gce = GceSettings(machine_type="n2-highcpu-8", network="projects/p/global/networks/vpc",
                      subnetwork="work", external_ip=False, service_account="",
                      labels={"team": "render", "ecloud-boss": "spoofed"}, boss_label="b2",
                      disk_gb=100, image="projects/p/global/images/mine")
    b = body(gce)
    assert b["machineType"] == f"zones/{ZONE}/machineTypes/n2-highcpu-8"
    assert b["networkInterfaces"] == [{"network": "projects/p/global/networks/vpc",
                                       "subnetwork": "regions/us-central1/subnetworks/work"}]
    assert b["serviceAccounts"] == []
    assert b["labels"]["team"] == "render" and b["labels"]["ecloud-boss"] == "b2"
    assert b["disks"][0]["initializeParams"] == {"sourceImage": "projects/p/global/images/mine",
                                                 "diskSizeGb": "100"}


def test_bulk_body_has_names_and_no_tokens() -> None:
    specs = [SPEC, WorkerSpec(8, "gce-ffff0000", "other-token", 4)]
    b = rq.bulk_insert_body(GceSettings(), ZONE, specs, "#!/bin/sh\n", BOOT, False, "batch1")
    assert b["count"] == "2" and b["minCount"] == "1"
    assert b["perInstanceProperties"] == {"gce-0a1b2c3d": {}, "gce-ffff0000": {}}
    props = b["instanceProperties"]
    assert props["machineType"] == "e2-standard-2"  # a name, not a URL, in InstanceProperties
    assert props["labels"] == {"ecloud-boss": "ecloud", "ecloud-batch": "batch1"}
    assert "token" not in json.dumps(b)


@pytest.mark.parametrize(("name", "expected"), [
    ("gce-0a1b2c3d", "gce-0a1b2c3d"),
    ("My Worker_1", "ecloud-3-my-worker-1"),
    ("9lives", "ecloud-3-9lives"),
    ("x" * 80, "ecloud-3-" + "x" * 54),
])
def test_instance_names(name: str, expected: str) -> None:
    got = rq.instance_name(WorkerSpec(3, name, "t", 1))
    assert got == expected and len(got) <= 63


def test_label_values() -> None:
    assert rq.label_value("My.Worker") == "my_worker"
    assert len(rq.label_value("a" * 100)) == 63


def test_references() -> None:
    ref = rq.reference(ZONE, "w1")
    assert ref == "zones/us-central1-a/instances/w1"
    assert rq.parse_reference(ref, "other") == (ZONE, "w1")
    assert rq.parse_reference("https://compute.googleapis.com/compute/v1/projects/p/zones/"
                              "europe-west1-b/instances/w2", ZONE) == ("europe-west1-b", "w2")
    assert rq.parse_reference("w3", ZONE) == (ZONE, "w3")
    with pytest.raises(ValueError):
        rq.parse_reference("a/b", ZONE)


def test_filters_and_urls() -> None:
    assert rq.boss_filter("ecloud") == '(labels.ecloud-boss = "ecloud")'
    assert rq.boss_filter("b", "x1") == (
        '(labels.ecloud-boss = "b") AND (labels.ecloud-batch = "x1")')
    assert reach.boss_url("u", "h", 2222, 7878) == "ssh://u@h:2222?port=7878"
    r = rq.list_request("p", ZONE, "f", "tok")
    assert r.to_json() == {"method": "instances.list", "project": "p", "zone": ZONE,
                           "filter": "f", "maxResults": "500", "pageToken": "tok"}


def test_known_hosts_line() -> None:
    key = "ssh-ed25519 AAAAC3Nz root@boss"
    assert reach.known_hosts_line("boss.example", 22, key) == "boss.example ssh-ed25519 AAAAC3Nz"
    assert reach.known_hosts_line("10.0.0.2", 2222, key) == "[10.0.0.2]:2222 ssh-ed25519 AAAAC3Nz"
    line = "[10.0.0.2]:22 ssh-ed25519 AAAAC3Nz"
    assert reach.known_hosts_line("ignored", 22, line) == line
    with pytest.raises(ValueError, match="public key line"):
        reach.known_hosts_line("h", 22, "-----BEGIN OPENSSH PRIVATE KEY-----")


def test_default_script_runs_the_worker_from_metadata() -> None:
    script = rq.default_script(SPEC)
    assert script.startswith("#!/bin/bash") and "exec worker run" in script
    for key in ("ecloud-token", "ecloud-boss-host-key", "ecloud-boss", "ecloud-slots",
                "ecloud-worker-key"):
        assert key in script
    assert SPEC.token not in script  # the secret is in its own metadata item


# ---------------------------------------------------------------- errors

QUOTA_MSG = "Quota 'CPUS' exceeded.  Limit: 24.0 in region us-central1."


def test_operation_quota_error() -> None:
    op = {"status": "DONE", "error": {"errors": [{"code": "QUOTA_EXCEEDED",
                                                   "message": QUOTA_MSG}]}}
    assert rq.operation_error(op, zone=ZONE) == "QUOTA_EXCEEDED CPUS in us-central1"


def test_quota_from_details_only() -> None:
    detail = {"quotaInfo": {"limitName": "SSD-TOTAL-GB-per-project-region",
                            "dimensions": {"region": "europe-west4"}}}
    assert rq.short_error("QUOTA_EXCEEDED", "quota", zone=ZONE, details=[detail]) == (
        "QUOTA_EXCEEDED SSD-TOTAL-GB in europe-west4")
    assert rq.short_error("QUOTA_EXCEEDED", "Quota 'CPUS_ALL_REGIONS' exceeded. "
                          "Limit: 32.0 globally.", zone=ZONE) == (
        "QUOTA_EXCEEDED CPUS_ALL_REGIONS globally")


def test_stockout() -> None:
    msg = ("The zone 'projects/p/zones/us-east1-b' does not have enough resources available "
           "to fulfill the request.")
    assert rq.short_error("ZONE_RESOURCE_POOL_EXHAUSTED", msg, zone=ZONE) == (
        "ZONE_RESOURCE_POOL_EXHAUSTED in us-east1-b")
    assert rq.short_error("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "no zone", zone=ZONE) == (
        "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS in us-central1-a")


def test_other_errors_group_without_names() -> None:
    a = rq.short_error("RESOURCE_NOT_READY", "The resource 'w-1' is not ready", zone=ZONE,
                       name="w-1")
    b = rq.short_error("RESOURCE_NOT_READY", "The resource 'w-2' is not ready", zone=ZONE,
                       name="w-2")
    assert a == b == "RESOURCE_NOT_READY: The resource '<name>' is not ready"
    assert len(rq.short_error("X", "y" * 500, zone=ZONE)) < 110
    assert rq.operation_error({"status": "DONE"}, zone=ZONE) is None


def _http(code: int, reason: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "errors": [
        {"message": message, "domain": "usageLimits", "reason": reason}]}}).encode()


def test_http_errors() -> None:
    assert rq.http_error(403, _http(403, "quotaExceeded", QUOTA_MSG), zone=ZONE) == (
        "QUOTA_EXCEEDED CPUS in us-central1")
    assert rq.http_error(400, _http(400, "invalid", "Invalid value for field "
                                    "'resource.machineType'"), zone=ZONE) == (
        "HTTP 400 invalid: Invalid value for field 'resource.machineType'")
    assert rq.http_error(502, b"<html>Bad Gateway</html>", zone=ZONE) == (
        "HTTP 502: <html>Bad Gateway</html>")


@pytest.mark.parametrize(("status", "reason", "transient"), [
    (429, "rateLimitExceeded", True), (500, "backendError", True), (503, "", True),
    (403, "rateLimitExceeded", True), (403, "userRateLimitExceeded", True),
    (403, "quotaExceeded", False), (403, "forbidden", False), (404, "notFound", False),
    (400, "invalid", False), (409, "alreadyExists", False),
])
def test_transient(status: int, reason: str, transient: bool) -> None:
    assert rq.is_transient(status, _http(status, reason, "m")) is transient


def test_alive() -> None:
    assert rq.is_alive({"status": "RUNNING"}) and rq.is_alive({"status": "PROVISIONING"})
    assert not rq.is_alive({"status": "TERMINATED"}) and not rq.is_alive({})
    assert rq.internal_address({"networkInterfaces": [{"networkIP": "10.0.0.5"}]}) == "10.0.0.5"
    assert rq.internal_address({}) is None


def test_gone_only_when_the_instance_is_named() -> None:
    gone = _http(404, "notFound", "The resource 'projects/p/zones/us-central1-a/instances/w1' "
                 "was not found")
    assert rq.is_gone(404, gone, ZONE, "w1")
    assert not rq.is_gone(404, gone, ZONE, "w")  # another instance's name
    assert not rq.is_gone(404, _http(404, "notFound", "The resource 'projects/p' was not "
                                     "found"), ZONE, "w1")
    assert not rq.is_gone(404, b"<html>Not Found</html>", ZONE, "w1")
