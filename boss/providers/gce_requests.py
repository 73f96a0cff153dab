"""Compute Engine requests and error summaries for the ``gce`` provider: pure functions.

Everything :mod:`boss.providers.gce` sends is built here as a :class:`Request`
(the client method, its URL parameters and its JSON body) and sent there, so
that a dry run is only "build, print" and the shapes are unit-tested without a
network (dsub builds its Batch request in one function and sends it in
another). Nothing here imports the Google client.

What a worker instance carries:

- labels ``ecloud-boss`` (``[gce] boss_label``: which boss owns it; ``list``
  filters on it), ``ecloud-worker-id`` and ``ecloud-worker``, plus
  ``[gce] labels``;
- metadata ``startup-script`` (run by the guest agent at boot), ``ecloud-token``
  (the worker's secret), ``ecloud-boss-host-key`` (a known_hosts line pinning the
  boss's SSH host key), ``ecloud-boss`` (the boss URL for ``worker run --boss``),
  ``ecloud-worker-id``, ``ecloud-worker-name``, ``ecloud-slots`` and, when
  configured, ``ecloud-worker-key`` (the worker's SSH private key). These are the
  attribute names boss/startup.py's script reads.

Errors are summarised into short strings that group well in ``boss admin
status``: ``QUOTA_EXCEEDED CPUS in us-central1``, ``ZONE_RESOURCE_POOL_EXHAUSTED
in us-central1-a``, ``HTTP 400 invalid: ...``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from boss.providers import WorkerSpec
from boss.providers.reach import Boot
from protocol.settings import GceSettings

LABEL_BOSS = "ecloud-boss"
LABEL_WORKER_ID = "ecloud-worker-id"
LABEL_WORKER = "ecloud-worker"
LABEL_BATCH = "ecloud-batch"  # one bulkInsert request: finds what it created

META_SCRIPT = "startup-script"
META_TOKEN = "ecloud-token"
META_KNOWN_HOSTS = "ecloud-boss-host-key"
META_BOSS = "ecloud-boss"
META_WORKER_ID = "ecloud-worker-id"
META_WORKER_NAME = "ecloud-worker-name"
META_SLOTS = "ecloud-slots"
META_WORKER_KEY = "ecloud-worker-key"

ALIVE = frozenset({"PROVISIONING", "STAGING", "RUNNING", "REPAIRING"})
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_MAX_DETAIL = 100

DEFAULT_STARTUP_SCRIPT = r"""#!/bin/bash
# ecloud worker start-up (the gce provider's minimal default).
# Reads this worker's settings from the instance metadata and runs `worker run`;
# the image must have ecloud's `worker` command installed. Re-run it with tracing
# to see why a worker does not come up: sudo bash -x /var/lib/ecloud/startup.sh
set -euo pipefail
md() {
  curl -fsS -H 'Metadata-Flavor: Google' \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}
dir=/var/lib/ecloud
install -d -m 700 "$dir"
umask 077
md startup-script > "$dir/startup.sh" || true
# a worker made by a bulk request gets its token a little after boot
for _ in $(seq 300); do
  md ecloud-token > "$dir/token" 2>/dev/null && break
  sleep 2
done
test -s "$dir/token"
md ecloud-boss-host-key > "$dir/known_hosts"
args=(--boss "$(md ecloud-boss)" --token-file "$dir/token" --known-hosts "$dir/known_hosts"
      --slots "$(md ecloud-slots)")
if md ecloud-worker-key > "$dir/worker_key" 2>/dev/null; then
  args+=(--key "$dir/worker_key")
fi
export ECLOUD_WORKER_WORKDIR="$dir/work" ECLOUD_WORKER_CACHE_DIR="$dir/cache"
exec worker run "${args[@]}"
"""


def default_script(spec: WorkerSpec) -> str:
    """The start-up script for every worker: the same text, settings come from metadata."""
    return DEFAULT_STARTUP_SCRIPT


@dataclass(frozen=True)
class Request:
    """One Compute Engine call: ``method`` is ``collection.verb`` of the client."""

    method: str
    params: Mapping[str, str]
    body: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, **self.params}
        if self.body is not None:
            out["body"] = self.body
        return out


# ---------------------------------------------------------------- names and URLs

def instance_name(spec: WorkerSpec) -> str:
    """The instance name: the worker's name when Compute Engine accepts it, else derived."""
    if _NAME.match(spec.name):
        return spec.name
    slug = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")
    name = f"ecloud-{spec.worker_id}-{slug}"[:63].rstrip("-")
    return name


def label_value(text: str) -> str:
    """Lower case, only a-z 0-9 _ -, at most 63 characters (Compute Engine's rule)."""
    return re.sub(r"[^a-z0-9_-]", "_", text.lower())[:63]


def region_of(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


def reference(zone: str, name: str) -> str:
    """A worker's reference: the instance's partial URL, so delete finds the zone again."""
    return f"zones/{zone}/instances/{name}"


def parse_reference(ref: str, default_zone: str) -> tuple[str, str]:
    """(zone, name) of a reference, a self link, or a bare instance name."""
    m = re.search(r"zones/([^/]+)/instances/([^/?#]+)$", ref.strip())
    if m:
        return m.group(1), m.group(2)
    if not ref.strip() or "/" in ref:
        raise ValueError(f"not a Compute Engine instance reference: {ref!r}")
    return default_zone, ref.strip()


def _url(value: str, prefix: str) -> str:
    """A bare name becomes ``prefix/name``; URLs (with a ``/``) are kept as given."""
    return value if "/" in value else f"{prefix}/{value}"


def boss_filter(boss_label: str, batch: str | None = None) -> str:
    """The ``instances.list`` filter for this boss's workers (of one bulk batch)."""
    clauses = [f'(labels.{LABEL_BOSS} = "{boss_label}")']
    if batch is not None:
        clauses.append(f'(labels.{LABEL_BATCH} = "{batch}")')
    return " AND ".join(clauses)


# ---------------------------------------------------------------- bodies

def labels_for(gce: GceSettings, spec: WorkerSpec | None, batch: str | None = None
               ) -> dict[str, str]:
    labels = dict(gce.labels)
    labels[LABEL_BOSS] = gce.boss_label
    if spec is not None:
        labels[LABEL_WORKER_ID] = str(spec.worker_id)
        labels[LABEL_WORKER] = label_value(spec.name)
    if batch is not None:
        labels[LABEL_BATCH] = label_value(batch)
    return labels


def shared_metadata(script: str, boot: Boot) -> dict[str, str]:
    """Metadata every worker of this boss gets (no secrets of one worker)."""
    items = {META_SCRIPT: script, META_KNOWN_HOSTS: boot.known_hosts, META_BOSS: boot.boss_url}
    if boot.worker_key:
        items[META_WORKER_KEY] = boot.worker_key
    items.update(boot.extra)
    return items


def worker_metadata(spec: WorkerSpec) -> dict[str, str]:
    """Metadata of one worker: who it is and its token."""
    return {META_TOKEN: spec.token, META_WORKER_ID: str(spec.worker_id),
            META_WORKER_NAME: spec.name, META_SLOTS: str(spec.slots)}


def metadata_body(items: Mapping[str, str], fingerprint: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"items": [{"key": k, "value": v} for k, v in items.items()]}
    if fingerprint is not None:
        body["fingerprint"] = fingerprint
    return body


def scheduling(spot: bool) -> dict[str, Any]:
    """Spot: Compute Engine may reclaim it at any time; it is then deleted, not stopped."""
    if spot:
        return {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
                "onHostMaintenance": "TERMINATE", "automaticRestart": False}
    return {"provisioningModel": "STANDARD", "onHostMaintenance": "MIGRATE",
            "automaticRestart": True}


def _properties(gce: GceSettings, zone: str, labels: Mapping[str, str],
                metadata: Mapping[str, str], spot: bool, *, bulk: bool) -> dict[str, Any]:
    """What an Instance and a bulk request's InstanceProperties have in common."""
    nic: dict[str, Any] = {"network": _url(gce.network, "global/networks")}
    if gce.subnetwork:
        nic["subnetwork"] = _url(gce.subnetwork, f"regions/{region_of(zone)}/subnetworks")
    if gce.external_ip:
        nic["accessConfigs"] = [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]
    accounts = ([{"email": gce.service_account, "scopes": list(gce.scopes)}]
                if gce.service_account else [])
    return {
        # InstanceProperties takes a machine type name, Instance a URL
        "machineType": (gce.machine_type.rsplit("/", 1)[-1] if bulk
                        else _url(gce.machine_type, f"zones/{zone}/machineTypes")),
        "labels": dict(labels),
        "metadata": metadata_body(metadata),
        "disks": [{"boot": True, "autoDelete": True, "type": "PERSISTENT",
                   "initializeParams": {"sourceImage": gce.image,
                                        "diskSizeGb": str(gce.disk_gb)}}],
        "networkInterfaces": [nic],
        "serviceAccounts": accounts,
        "scheduling": scheduling(spot),
    }


def instance_body(gce: GceSettings, zone: str, spec: WorkerSpec, script: str, boot: Boot,
                  spot: bool) -> dict[str, Any]:
    """The ``instances.insert`` body for one worker."""
    name = instance_name(spec)
    metadata = {**shared_metadata(script, boot), **worker_metadata(spec)}
    return {"name": name,
            "description": f"ecloud worker {spec.name} (id {spec.worker_id}) "
                           f"of boss {gce.boss_label}",
            **_properties(gce, zone, labels_for(gce, spec), metadata, spot, bulk=False)}


def insert_request(project: str, zone: str, body: Mapping[str, Any], request_id: str
                   ) -> Request:
    # requestId makes a retried insert idempotent: Compute Engine answers a repeat
    # with the first request's operation instead of creating a second instance
    return Request("instances.insert",
                   {"project": project, "zone": zone, "requestId": request_id}, body)


def bulk_insert_body(gce: GceSettings, zone: str, specs: Sequence[WorkerSpec], script: str,
                     boot: Boot, spot: bool, batch: str) -> dict[str, Any]:
    """The ``instances.bulkInsert`` body: one name per worker, common properties.

    A bulk request cannot give instances different metadata or labels, so the
    tokens are not in it: each instance gets its own with ``setMetadata``
    afterwards (the start-up script waits for it). ``minCount`` 1: keep what
    could be created and report the rest.
    """
    return {"count": str(len(specs)), "minCount": "1",
            "perInstanceProperties": {instance_name(s): {} for s in specs},
            "instanceProperties": _properties(gce, zone, labels_for(gce, None, batch),
                                              shared_metadata(script, boot), spot,
                                              bulk=True)}


def list_request(project: str, zone: str, flt: str, page_token: str | None = None,
                 max_results: int = 500) -> Request:
    params = {"project": project, "zone": zone, "filter": flt, "maxResults": str(max_results)}
    if page_token:
        params["pageToken"] = page_token
    return Request("instances.list", params)


def delete_request(project: str, zone: str, name: str, request_id: str) -> Request:
    return Request("instances.delete",
                   {"project": project, "zone": zone, "instance": name, "requestId": request_id})


def get_request(project: str, zone: str, name: str) -> Request:
    return Request("instances.get", {"project": project, "zone": zone, "instance": name})


def wait_request(project: str, zone: str, operation: str) -> Request:
    return Request("zoneOperations.wait",
                   {"project": project, "zone": zone, "operation": operation})


def set_metadata_request(project: str, zone: str, name: str, items: Mapping[str, str],
                         fingerprint: str, request_id: str) -> Request:
    return Request("instances.setMetadata",
                   {"project": project, "zone": zone, "instance": name,
                    "requestId": request_id}, metadata_body(items, fingerprint))


# ---------------------------------------------------------------- answers

def metadata_items(instance: Mapping[str, Any]) -> dict[str, str]:
    """An instance's metadata as a dict."""
    items = instance.get("metadata", {}).get("items", []) or []
    return {str(i.get("key")): str(i.get("value", "")) for i in items}


def internal_address(instance: Mapping[str, Any]) -> str | None:
    for nic in instance.get("networkInterfaces", []) or []:
        ip = nic.get("networkIP")
        if ip:
            return str(ip)
    return None


def is_alive(instance: Mapping[str, Any]) -> bool:
    return instance.get("status") in ALIVE


# ---------------------------------------------------------------- errors

_QUOTA = re.compile(r"Quota '([^']+)' exceeded\.\s*Limit:\s*[\d.]+\s*"
                    r"(?:in (?:region|zone) ([\w-]+)|(globally))?")
_ZONE = re.compile(r"zones/([a-z0-9-]+)|zone '([a-z0-9-]+)'")


def short_error(code: str, message: str, *, zone: str, name: str | None = None,
                details: Iterable[Mapping[str, Any]] = ()) -> str:
    """One error as a short, groupable string (no instance names, no limits)."""
    code = code or "ERROR"
    if code == "QUOTA_EXCEEDED" or code == "quotaExceeded":
        return _quota(message, details)
    if code.startswith("ZONE_RESOURCE_POOL_EXHAUSTED"):
        m = _ZONE.search(message)
        where = (m.group(1) or m.group(2)) if m else zone
        return f"{code} in {where}"
    text = " ".join(message.split())
    if name:
        text = text.replace(name, "<name>")
    if len(text) > _MAX_DETAIL:
        text = text[: _MAX_DETAIL - 1] + "…"
    return f"{code}: {text}" if text else code


def _quota(message: str, details: Iterable[Mapping[str, Any]]) -> str:
    m = _QUOTA.search(message)
    if m:
        metric, where, globally = m.groups()
        if where:
            return f"QUOTA_EXCEEDED {metric} in {where}"
        return f"QUOTA_EXCEEDED {metric} globally" if globally else f"QUOTA_EXCEEDED {metric}"
    for detail in details:
        info = detail.get("quotaInfo")
        if isinstance(info, Mapping):
            metric = str(info.get("limitName") or info.get("metricName") or "")
            metric = metric.split("-per-")[0].rsplit("/", 1)[-1].upper()
            dims = info.get("dimensions") or {}
            where = dims.get("region") or dims.get("zone")
            return f"QUOTA_EXCEEDED {metric} in {where}" if where else f"QUOTA_EXCEEDED {metric}"
    return "QUOTA_EXCEEDED"


def operation_error(op: Mapping[str, Any], *, zone: str, name: str | None = None
                    ) -> str | None:
    """The short error of a finished operation, or None when it succeeded."""
    errors = (op.get("error") or {}).get("errors") or []
    if not errors:
        if op.get("httpErrorStatusCode") and int(op["httpErrorStatusCode"]) >= 400:
            return short_error(f"HTTP {op['httpErrorStatusCode']}",
                               str(op.get("httpErrorMessage", "")), zone=zone, name=name)
        return None
    first = errors[0]
    return short_error(str(first.get("code", "")), str(first.get("message", "")), zone=zone,
                       name=name, details=first.get("errorDetails") or ())


def _http_error_parts(content: bytes | str) -> tuple[str, str, str]:
    """(reason, message, status) of a Google API error body; empty when unparseable."""
    try:
        data = json.loads(content)
        err = data["error"]
        reasons = [e.get("reason", "") for e in err.get("errors", []) or []]
        return (reasons[0] if reasons else "", str(err.get("message", "")),
                str(err.get("status", "")))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = content.decode(errors="replace") if isinstance(content, bytes) else content
        return "", text.strip(), ""


_RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})


def is_transient(status: int, content: bytes | str) -> bool:
    """Worth retrying: 429, 5xx, and the 403s that mean "too many requests"."""
    if status == 429 or status >= 500:
        return True
    return status == 403 and _http_error_parts(content)[0] in _RATE_REASONS


def is_gone(status: int, content: bytes | str, zone: str, name: str) -> bool:
    """A 404 that names the instance itself (a missing project or zone is also a 404)."""
    _, message, _ = _http_error_parts(content)
    return status == 404 and f"zones/{zone}/instances/{name}'" in message


def http_error(status: int, content: bytes | str, *, zone: str, name: str | None = None
               ) -> str:
    """An HTTP error answer as a short string (quota and stockout as in operations)."""
    reason, message, _ = _http_error_parts(content)
    if reason == "quotaExceeded" or "QUOTA_EXCEEDED" in message:
        return _quota(message, ())
    if "ZONE_RESOURCE_POOL_EXHAUSTED" in message or "resourcePoolExhausted" in reason:
        return short_error("ZONE_RESOURCE_POOL_EXHAUSTED", message, zone=zone)
    return short_error(f"HTTP {status} {reason}".strip(), message, zone=zone, name=name)
