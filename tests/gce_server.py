"""A fake Compute Engine API on 127.0.0.1, for the ``gce`` provider's tests.

There is no Compute Engine emulator (FACTS.md), so this answers the REST paths
the provider uses, with the real JSON shapes (Operation, Instance,
InstanceList, Google API error bodies), through the real client library:

    POST   projects/P/zones/Z/instances                      insert
    POST   projects/P/zones/Z/instances/bulkInsert           bulkInsert
    GET    projects/P/zones/Z/instances?filter=&pageToken=   list (labels.K = "V" clauses)
    GET    projects/P/zones/Z/instances/NAME                 get
    DELETE projects/P/zones/Z/instances/NAME                 delete
    POST   projects/P/zones/Z/instances/NAME/setMetadata     setMetadata (fingerprint checked)
    GET    projects/P/zones/Z/operations/OP                  zoneOperations.get
    POST   projects/P/zones/Z/operations/OP/wait             zoneOperations.wait

Knobs: ``quota`` (at most this many instances; more fail with QUOTA_EXCEEDED
CPUS, as an HTTP 403 or, with ``quota_in_operation``, in the operation),
``stockout`` (instance names whose insert operation fails with
ZONE_RESOURCE_POOL_EXHAUSTED), ``fail_first`` (the first N requests get
``fail_status``, 503 by default), ``op_polls`` (get/wait calls before an
operation is DONE), ``page_size`` (instances per list page at most), ``zones``
(the zones that exist; others answer 404).
Every request is recorded in ``calls``; a ``requestId`` seen before returns
its first operation, as the real API does.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.httpd import serving_http

_PREFIX = "/compute/v1/"
_ROUTE = re.compile(r"^projects/([^/]+)/zones/([^/]+)/(instances|operations)(?:/([^/]+))?"
                    r"(?:/(setMetadata|wait))?$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_CLAUSE = re.compile(r'labels\.([a-z0-9_-]+)\s*=\s*"([^"]*)"')


@dataclass
class Call:
    method: str  # HTTP method
    path: str  # after /compute/v1/
    query: dict[str, str]
    body: Any


@dataclass
class FakeCompute:
    quota: int | None = None
    quota_in_operation: bool = False
    stockout: set[str] = field(default_factory=set)
    fail_first: int = 0
    fail_status: int = 503
    op_polls: int = 1
    page_size: int = 500
    zones: frozenset[str] = frozenset({"us-central1-a", "us-central1-b", "europe-west1-b"})
    instances: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    failures_served: int = 0
    _polls_left: dict[str, int] = field(default_factory=dict)
    _request_ids: dict[str, str] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1000))
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    # ------------------------------------------------------------ request dispatch

    def handle(self, method: str, raw_path: str, raw_body: bytes) -> tuple[int, Any]:
        parts = urlsplit(raw_path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        body = json.loads(raw_body) if raw_body else None
        path = parts.path.removeprefix(_PREFIX)
        with self.lock:
            self.calls.append(Call(method, path, query, body))
            if self.failures_served < self.fail_first:
                self.failures_served += 1
                return self.fail_status, _error(self.fail_status, "backendError",
                                                "The service is currently unavailable.")
            m = _ROUTE.match(path)
            if not parts.path.startswith(_PREFIX) or m is None:
                return 404, _error(404, "notFound", f"no such path {parts.path}")
            project, zone, kind, name, action = m.groups()
            if zone not in self.zones:
                return 404, _error(404, "notFound", f"The resource 'projects/{project}/zones/"
                                                    f"{zone}' was not found")
            request_id = query.get("requestId")
            if request_id and request_id in self._request_ids and method != "GET":
                return 200, self.operations[self._request_ids[request_id]]
            status, answer = self._route(method, project, zone, kind, name, action, query, body)
            if request_id and status == 200 and answer.get("kind") == "compute#operation":
                self._request_ids[request_id] = answer["name"]
            return status, answer

    def _route(self, method: str, project: str, zone: str, kind: str, name: str | None,
               action: str | None, query: dict[str, str], body: Any) -> tuple[int, Any]:
        if kind == "operations" and name:
            return self._operation(name, wait=(method == "POST" and action == "wait"))
        if method == "POST" and name is None:
            return self._insert(project, zone, body)
        if method == "POST" and name == "bulkInsert":
            return self._bulk_insert(project, zone, body)
        if method == "GET" and name is None:
            return self._list(project, zone, query)
        if name is None:
            return 405, _error(405, "badRequest", "method not allowed")
        key = (project, zone, name)
        instance = self.instances.get(key)
        if instance is None:
            return 404, _error(404, "notFound", f"The resource 'projects/{project}/zones/"
                                                f"{zone}/instances/{name}' was not found")
        if method == "GET" and action is None:
            return 200, instance
        if method == "DELETE" and action is None:
            del self.instances[key]
            return 200, self._new_op(project, zone, "delete", name)
        if method == "POST" and action == "setMetadata":
            return self._set_metadata(project, zone, instance, body)
        return 405, _error(405, "badRequest", "method not allowed")

    # ------------------------------------------------------------ instances

    def _check(self, body: Any) -> str | None:
        """The first reason the real API would answer 400, or None."""
        if not isinstance(body, dict):
            return "Required 'resource', body missing"
        if not _NAME.match(str(body.get("name", ""))):
            return f"Invalid value for field 'resource.name': '{body.get('name')}'"
        if not body.get("machineType"):
            return "Invalid value for field 'resource.machineType': ''"
        disks = body.get("disks") or []
        if not any(d.get("boot") and d.get("initializeParams", {}).get("sourceImage")
                   for d in disks):
            return "Invalid value for field 'resource.disks': no boot disk with a source image"
        if not body.get("networkInterfaces"):
            return "Invalid value for field 'resource.networkInterfaces': ''"
        for key in body.get("labels", {}):
            if not re.match(r"^[a-z][a-z0-9_-]{0,62}$", key):
                return f"Invalid value for field 'resource.labels': '{key}'"
        return None

    def _over_quota(self) -> bool:
        return self.quota is not None and len(self.instances) >= self.quota

    def _insert(self, project: str, zone: str, body: Any) -> tuple[int, Any]:
        problem = self._check(body)
        if problem:
            return 400, _error(400, "invalid", problem)
        name = body["name"]
        if (project, zone, name) in self.instances:
            return 409, _error(409, "alreadyExists", f"The resource 'projects/{project}/zones/"
                                                     f"{zone}/instances/{name}' already exists")
        if self._over_quota() and not self.quota_in_operation:
            return 403, _error(403, "quotaExceeded", _QUOTA_MESSAGE)
        op = self._new_op(project, zone, "insert", name)
        if self._over_quota():
            op["error"] = {"errors": [_QUOTA_ERROR]}
        elif name in self.stockout:
            op["error"] = {"errors": [_stockout(project, zone)]}
        else:
            self._make(project, zone, name, body)
        return 200, op

    def _make(self, project: str, zone: str, name: str, props: dict[str, Any]) -> None:
        number = next(self._ids)
        metadata = dict(props.get("metadata") or {})
        metadata["fingerprint"] = _fingerprint(metadata.get("items", []))
        metadata["kind"] = "compute#metadata"
        nics = [dict(n, name=f"nic{i}", networkIP=f"10.128.{number // 256 % 256}.{number % 256}")
                for i, n in enumerate(props.get("networkInterfaces", []))]
        self.instances[(project, zone, name)] = {
            **props, "kind": "compute#instance", "id": str(number), "name": name,
            "zone": f"{self.url}projects/{project}/zones/{zone}", "status": "RUNNING",
            "selfLink": f"{self.url}projects/{project}/zones/{zone}/instances/{name}",
            "metadata": metadata, "networkInterfaces": nics,
        }

    def _bulk_insert(self, project: str, zone: str, body: Any) -> tuple[int, Any]:
        props = dict(body.get("instanceProperties") or {})
        names = list(body.get("perInstanceProperties") or {})
        count, min_count = int(body.get("count", len(names))), int(body.get("minCount", 1))
        if len(names) != count:
            return 400, _error(400, "invalid", "count does not match perInstanceProperties")
        made: list[str] = []
        errors: list[dict[str, Any]] = []
        for name in names:
            if self._over_quota():
                errors.append(_QUOTA_ERROR)
            elif name in self.stockout:
                errors.append(_stockout(project, zone))
            else:
                self._make(project, zone, name, {**props, "name": name})
                made.append(name)
        if len(made) < min_count:
            for name in made:
                del self.instances[(project, zone, name)]
            made = []
        op = self._new_op(project, zone, "bulkInsert", None)
        op["instancesBulkInsertOperationMetadata"] = {"perLocationStatus": {f"zones/{zone}": {
            "status": "DONE" if made else "FAILED", "targetVmCount": count,
            "createdVmCount": len(made), "failedToCreateVmCount": count - len(made)}}}
        if errors:
            op["error"] = {"errors": errors[:1]}
        return 200, op

    def _list(self, project: str, zone: str, query: dict[str, str]) -> tuple[int, Any]:
        wanted = _CLAUSE.findall(query.get("filter", ""))
        found = [i for (p, z, _), i in sorted(self.instances.items())
                 if p == project and z == zone
                 and all(i.get("labels", {}).get(k) == v for k, v in wanted)]
        size = min(self.page_size, int(query.get("maxResults", 500)))
        start = int(query.get("pageToken", "0") or 0)
        page: dict[str, Any] = {"kind": "compute#instanceList",
                                "id": f"projects/{project}/zones/{zone}/instances",
                                "items": found[start:start + size]}
        if start + size < len(found):
            page["nextPageToken"] = str(start + size)
        return 200, page

    def _set_metadata(self, project: str, zone: str, instance: dict[str, Any], body: Any
                      ) -> tuple[int, Any]:
        if body.get("fingerprint") != instance["metadata"]["fingerprint"]:
            return 412, _error(412, "conditionNotMet",
                               "Supplied fingerprint does not match current metadata "
                               "fingerprint.")
        items = body.get("items", [])
        instance["metadata"] = {"kind": "compute#metadata", "items": items,
                                "fingerprint": _fingerprint(items)}
        return 200, self._new_op(project, zone, "setMetadata", instance["name"])

    # ------------------------------------------------------------ operations

    def _new_op(self, project: str, zone: str, kind: str, target: str | None) -> dict[str, Any]:
        name = f"operation-{next(self._ids)}-{kind}"
        base = f"{self.url}projects/{project}/zones/{zone}"
        op = {"kind": "compute#operation", "id": name.split("-")[1], "name": name,
              "zone": base, "operationType": kind, "status": "RUNNING", "progress": 0,
              "insertTime": "2026-01-01T00:00:00.000-00:00",
              "selfLink": f"{base}/operations/{name}",
              "targetLink": f"{base}/instances/{target}" if target else base}
        self.operations[name] = op
        self._polls_left[name] = self.op_polls
        if self.op_polls <= 0:
            self._done(op)
        return op

    def _done(self, op: dict[str, Any]) -> None:
        op["status"], op["progress"] = "DONE", 100
        op["endTime"] = "2026-01-01T00:00:01.000-00:00"
        if "error" in op:
            op["httpErrorStatusCode"], op["httpErrorMessage"] = 403, "FORBIDDEN"

    def _operation(self, name: str, wait: bool) -> tuple[int, Any]:
        op = self.operations.get(name)
        if op is None:
            return 404, _error(404, "notFound", f"The resource 'operations/{name}' was not found")
        self._polls_left[name] -= 1
        if self._polls_left[name] <= 0 and op["status"] != "DONE":
            self._done(op)
        return 200, op

    # ------------------------------------------------------------ helpers for tests

    def add_instance(self, project: str, zone: str, name: str, labels: dict[str, str],
                     status: str = "RUNNING") -> None:
        """An instance made by someone else (another boss, a person)."""
        with self.lock:
            self._make(project, zone, name, {"name": name, "labels": labels})
            self.instances[(project, zone, name)]["status"] = status

    def bodies(self, path_end: str = "/instances") -> list[Any]:
        """Bodies of the POSTs whose path ends so (default: instances.insert)."""
        with self.lock:
            return [c.body for c in self.calls if c.method == "POST"
                    and c.path.endswith(path_end)]


_QUOTA_MESSAGE = "Quota 'CPUS' exceeded.  Limit: 24.0 in region us-central1."
_QUOTA_ERROR = {
    "code": "QUOTA_EXCEEDED", "message": _QUOTA_MESSAGE,
    "errorDetails": [{"quotaInfo": {"metricName": "compute.googleapis.com/cpus",
                                    "limitName": "CPUS-per-project-region",
                                    "dimensions": {"region": "us-central1"}, "limit": 24}}],
}


def _stockout(project: str, zone: str) -> dict[str, Any]:
    return {"code": "ZONE_RESOURCE_POOL_EXHAUSTED",
            "message": f"The zone 'projects/{project}/zones/{zone}' does not have enough "
                       "resources available to fulfill the request.  Try a different zone, "
                       "or try again later."}


def _error(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message,
                      "errors": [{"message": message, "domain": "global", "reason": reason}]}}


def _fingerprint(items: Any) -> str:
    digest = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).digest()[:8]
    return base64.b64encode(digest).decode()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeCompute  # set on the subclass made per server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every answer waits ~40 ms for a delayed ACK

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, answer = self.fake.handle(self.command, self.path, raw)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet tests


@contextmanager
def serve(fake: FakeCompute | None = None) -> Iterator[FakeCompute]:
    """Run ``fake`` on 127.0.0.1 (a free port); ``fake.url`` is the api_endpoint."""
    fake = fake or FakeCompute()
    handler = type("Handler", (_Handler,), {"fake": fake})
    with serving_http(handler) as server:
        fake.url = f"http://127.0.0.1:{server.server_address[1]}{_PREFIX}"
        yield fake
