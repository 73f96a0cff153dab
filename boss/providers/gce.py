"""The ``gce`` provider: workers as Compute Engine instances (google-api-python-client).

``create`` sends one ``instances.insert`` per worker (all of them first, then
waits for their zone operations, so Compute Engine works on them in parallel)
and reports each worker as :class:`Created` (reference
``zones/ZONE/instances/NAME``, address its internal IP) or :class:`Failed` with
a short groupable error (``QUOTA_EXCEEDED CPUS in us-central1``). With
``bulk_from=N``, N workers or more go in one ``instances.bulkInsert``; a bulk
request cannot carry per-instance metadata, so each created instance then gets
its own token with ``instances.setMetadata`` (the default start-up script waits
for it). ``delete`` treats an instance that is already gone as deleted;
``list`` finds this boss's instances by their ``ecloud-boss`` label.

The request bodies come from :mod:`boss.providers.gce_requests` (pure); this
module only sends them. ``dry_run=True`` prints them (one JSON object a line)
instead, and never builds a client or asks for credentials.

Transient failures (HTTP 429, 5xx, rate-limit 403s, broken connections) are
retried with tenacity: ``retry_attempts`` tries, exponential waits from
``retry_wait`` up to ``retry_wait_max`` seconds. Every zone operation is waited
for (``zoneOperations.wait``) at most until ``operation_seconds`` after the
batch started.

Credentials are the application-default ones (``google.auth.default()``)
unless ``credentials=`` is given (tests pass ``AnonymousCredentials()`` and an
``api_endpoint`` on 127.0.0.1).

    ProviderError (boss.providers)   configuration missing (credentials,
                                     project, boss host key), or delete/list
                                     failed; the message says what to do.
                                     ``create`` turns it into a Failed per worker
"""

from __future__ import annotations

import builtins
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from boss.providers import (
    Created,
    Failed,
    Instance,
    Provider,
    ProviderError,
    WorkerSpec,
    register,
)
from boss.providers import gce_requests as rq
from boss.providers.reach import Boot, boot_for
from boss.providers.reach import boss_url as reach_url
from protocol.settings import Settings

HTTP_TIMEOUT = 150.0  # seconds; above zoneOperations.wait's own ~120 s
MAX_WAITS = 1000  # zoneOperations.wait calls per operation, whatever the clock says
MAX_PAGES = 1000  # instances.list pages (500 instances each)
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

ScriptFor = Callable[[WorkerSpec], str]


class _Failure(Exception):
    """One call failed for good; ``summary`` is the short error for Failed."""

    def __init__(self, summary: str, status: int | None = None, content: bytes = b"") -> None:
        super().__init__(summary)
        self.summary = summary
        self.status = status
        self.content = content  # the HTTP error body, as received


def _startup_script(settings: Settings) -> ScriptFor:
    """`boss worker-script`'s script (pinned to this ecloud), the same for every worker."""
    from importlib.metadata import version

    from boss.startup import worker_script

    text = worker_script(settings, version("ecloud"))
    return lambda _spec: text


@register("gce")
class GceProvider(Provider):
    """Creates, deletes and lists this boss's Compute Engine workers."""

    name = "gce"

    def __init__(
        self,
        settings: Settings,
        *,
        boss_host_key: str | None = None,
        worker_key: str | None = None,
        boss_url: str | None = None,
        script_for: ScriptFor | None = None,
        credentials: Any = None,
        dry_run: bool = False,
        echo: Callable[[str], None] | None = None,
        retry_attempts: int = 5,
        retry_wait: float = 1.0,
        retry_wait_max: float = 30.0,
        operation_seconds: float = 300.0,
        poll_seconds: float = 2.0,
        bulk_from: int = 0,
        wait_for_delete: bool = False,
    ) -> None:
        """``boss_host_key``: the boss sshd's public host key line (default: read
        ``[boss] ssh_host_key_file``); ``worker_key``: the workers' SSH private key
        (default: ``[boss] worker_key_file``, may be empty); ``script_for``: the
        start-up script of a worker (default: `boss worker-script`'s).
        """
        self.settings = settings
        self.gce = settings.gce
        self.zone = self.gce.zone
        self._host_key = boss_host_key
        self._worker_key = worker_key
        b = settings.boss
        self.boss_url = boss_url or reach_url(b.ssh_user, b.ssh_host, b.ssh_port, b.port)
        self.script_for: ScriptFor = script_for or _startup_script(settings)
        self._credentials = credentials
        self.dry_run = dry_run
        self.echo: Callable[[str], None] = echo or print
        self.retry_attempts = max(1, retry_attempts)
        self.retry_wait = retry_wait
        self.retry_wait_max = retry_wait_max
        self.operation_seconds = operation_seconds
        self.poll_seconds = poll_seconds
        self.bulk_from = bulk_from
        self.wait_for_delete = wait_for_delete
        self._project = self.gce.project
        self._service: Any = None
        self._collections: dict[str, Any] = {}
        self._lock = threading.Lock()  # httplib2 connections are not thread-safe

    # ------------------------------------------------------------ plan (pure)

    def boot(self) -> Boot:
        """What every worker gets to reach this boss; ProviderError when not configured."""
        return boot_for(self.settings, "gce", host_key=self._host_key,
                        worker_key=self._worker_key, url=self.boss_url)

    def plan(self, specs: Sequence[WorkerSpec]) -> builtins.list[dict[str, Any]]:
        return [r.to_json() for r in self.requests(specs)]

    def requests(self, specs: Sequence[WorkerSpec], batch: str | None = None
                 ) -> builtins.list[rq.Request]:
        """The requests ``create`` sends first (one insert each, or one bulkInsert)."""
        boot = self.boot()
        project = self.project
        if self._bulk(specs):
            body = rq.bulk_insert_body(self.gce, self.zone, specs, self.script_for(specs[0]),
                                       boot, self._spot(specs[0]),
                                       batch or uuid.uuid4().hex[:12])
            return [rq.Request("instances.bulkInsert",
                               {"project": project, "zone": self.zone,
                                "requestId": str(uuid.uuid4())}, body)]
        return [rq.insert_request(project, self.zone,
                                  rq.instance_body(self.gce, self.zone, s, self.script_for(s),
                                                   boot, self._spot(s)),
                                  str(uuid.uuid4()))
                for s in specs]

    def _bulk(self, specs: Sequence[WorkerSpec]) -> bool:
        if not self.bulk_from or len(specs) < max(2, self.bulk_from):
            return False
        # one request has one set of properties: same script and spot choice for all
        first = specs[0]
        return all(self._spot(s) == self._spot(first)
                   and self.script_for(s) == self.script_for(first) for s in specs)

    def _spot(self, spec: WorkerSpec) -> bool:
        return spec.spot or self.gce.spot

    # ------------------------------------------------------------ the interface

    def create(self, specs: Sequence[WorkerSpec]) -> builtins.list[Created | Failed]:
        """Start one instance per spec. A configuration problem (no credentials, no
        project, no boss host key) fails every worker with the same message, so the
        service records it on their rows instead of leaving them provisioning."""
        if not specs:
            return []
        batch = uuid.uuid4().hex[:12]
        with self._lock:
            try:
                if not self.dry_run:
                    self.service()
                requests = self.requests(specs, batch)
            except ProviderError as exc:
                return [Failed(s.worker_id, str(exc)) for s in specs]
            if self.dry_run:
                for r in requests:
                    self.echo(json.dumps(r.to_json(), sort_keys=True))
                return [Failed(s.worker_id, "DRY_RUN: request printed, not sent")
                        for s in specs]
            if requests[0].method == "instances.bulkInsert":
                return self._create_bulk(specs, requests[0], batch)
            return self._create_each(specs, requests)

    def delete(self, reference: str) -> None:
        try:
            zone, name = rq.parse_reference(reference, self.zone)
        except ValueError as exc:
            raise ProviderError(f"gce: {exc}") from None
        with self._lock:
            request = rq.delete_request(self.project, zone, name, str(uuid.uuid4()))
            if self.dry_run:
                self.echo(json.dumps(request.to_json(), sort_keys=True))
                return
            try:
                op = self._send(request)
                if self.wait_for_delete:
                    final = self._wait(op, zone, time.monotonic() + self.operation_seconds)
            except _Failure as exc:
                if rq.is_gone(exc.status or 0, exc.content, zone, name):
                    return  # already gone (not: a wrong project or zone)
                raise ProviderError(f"gce: cannot delete instance {name} in {zone}: "
                                    f"{exc.summary}") from None
            if not self.wait_for_delete:
                return
        if final is None:
            raise ProviderError(f"gce: deleting instance {name} in {zone} did not finish "
                                f"within {self.operation_seconds:g} s; see `gcloud compute "
                                "operations list`")
        error = rq.operation_error(final, zone=zone, name=name)
        if error is not None and not error.startswith("RESOURCE_NOT_FOUND"):
            raise ProviderError(f"gce: cannot delete instance {name} in {zone}: {error}")

    def list(self) -> builtins.list[Instance]:
        return [Instance(rq.reference(str(i.get("zone", self.zone)).rsplit("/", 1)[-1],
                                      str(i["name"])),
                         str(i["name"]), rq.is_alive(i))
                for i in self._instances(rq.boss_filter(self.gce.boss_label))]

    def close(self) -> None:
        with self._lock:
            service, self._service = self._service, None
            self._collections.clear()
        if service is not None:
            service.close()

    # ------------------------------------------------------------ create

    def _create_each(self, specs: Sequence[WorkerSpec], requests: Sequence[rq.Request]
                     ) -> builtins.list[Created | Failed]:
        results: builtins.list[Created | Failed | None] = [None] * len(specs)
        started: builtins.list[tuple[int, str, dict[str, Any]]] = []
        for i, (spec, request) in enumerate(zip(specs, requests, strict=True)):
            name = str(request.body["name"]) if request.body else spec.name
            try:
                started.append((i, name, self._send(request)))
            except _Failure as exc:
                results[i] = Failed(spec.worker_id, exc.summary)
        deadline = time.monotonic() + self.operation_seconds
        for i, name, op in started:
            results[i] = self._finish(specs[i], name, op, deadline)
        return [r for r in results if r is not None]

    def _finish(self, spec: WorkerSpec, name: str, op: dict[str, Any], deadline: float,
                what: str = "instances.insert") -> Created | Failed:
        """Wait for ``op`` on instance ``name``; an instance we do not report as
        created is deleted (best effort), so that no worker runs unrecorded."""
        try:
            final = self._wait(op, self.zone, deadline)
        except _Failure as exc:
            self._abandon(name)
            return Failed(spec.worker_id, exc.summary)
        if final is None:
            self._abandon(name)
            return Failed(spec.worker_id, f"TIMEOUT waiting for {what}")
        error = rq.operation_error(final, zone=self.zone, name=name)
        if error is not None:
            if what != "instances.insert":  # a failed insert leaves no instance behind
                self._abandon(name)
            return Failed(spec.worker_id, error)
        return Created(spec.worker_id, rq.reference(self.zone, name), self._address(name))

    def _create_bulk(self, specs: Sequence[WorkerSpec], request: rq.Request, batch: str
                     ) -> builtins.list[Created | Failed]:
        deadline = time.monotonic() + self.operation_seconds
        try:
            op = self._send(request)
            final = self._wait(op, self.zone, deadline)
        except _Failure as exc:
            return [Failed(s.worker_id, exc.summary) for s in specs]
        error = None if final is None else rq.operation_error(final, zone=self.zone)
        try:
            made = {str(i["name"]): i for i in
                    self._instances(rq.boss_filter(self.gce.boss_label, batch), locked=True)}
        except ProviderError as exc:
            made, error = {}, error or str(exc)
        missing = error or ("TIMEOUT waiting for instances.bulkInsert" if final is None
                            else "NOT_CREATED by instances.bulkInsert")
        results: builtins.list[Created | Failed] = []
        pending: builtins.list[tuple[WorkerSpec, str, dict[str, Any]]] = []
        for spec in specs:
            name = rq.instance_name(spec)
            instance = made.get(name)
            if instance is None:
                results.append(Failed(spec.worker_id, missing))
                continue
            # the token and the worker's identity: the one thing bulkInsert cannot set
            items = {**rq.metadata_items(instance), **rq.worker_metadata(spec)}
            fingerprint = str(instance.get("metadata", {}).get("fingerprint", ""))
            try:
                pending.append((spec, name, self._send(rq.set_metadata_request(
                    self.project, self.zone, name, items, fingerprint, str(uuid.uuid4())))))
            except _Failure as exc:
                self._abandon(name)
                results.append(Failed(spec.worker_id, exc.summary))
        for spec, name, op in pending:
            results.append(self._finish(spec, name, op, deadline, "instances.setMetadata"))
        order = {s.worker_id: k for k, s in enumerate(specs)}
        return sorted(results, key=lambda r: order[r.worker_id])

    def _abandon(self, name: str) -> None:
        """Best effort: ask for the deletion of an instance we will not report as created."""
        try:
            self._send(rq.delete_request(self.project, self.zone, name, str(uuid.uuid4())))
        except _Failure:
            pass  # `list` still shows it (ecloud-boss label), for orphan clean-up

    def _address(self, name: str) -> str | None:
        try:
            return rq.internal_address(self._send(rq.get_request(self.project, self.zone,
                                                                 name)))
        except _Failure:
            return None  # the worker still comes up; only its address is unknown

    # ------------------------------------------------------------ operations, lists

    def _wait(self, op: dict[str, Any], zone: str, deadline: float) -> dict[str, Any] | None:
        """The operation once DONE, or None if the deadline passed first."""
        for _ in range(MAX_WAITS):
            if op.get("status") == "DONE":
                return op
            if time.monotonic() >= deadline:
                return None
            waited = time.monotonic()
            op = self._send(rq.wait_request(self.project, zone, str(op["name"])))
            if op.get("status") != "DONE" and time.monotonic() - waited < self.poll_seconds:
                # wait returned early without news: do not spin on it
                time.sleep(min(self.poll_seconds, max(0.0, deadline - time.monotonic())))
        return None

    def _instances(self, flt: str, locked: bool = False) -> builtins.list[dict[str, Any]]:
        if self.dry_run:
            self.echo(json.dumps(rq.list_request(self.project, self.zone, flt).to_json(),
                                 sort_keys=True))
            return []
        found: builtins.list[dict[str, Any]] = []
        token: str | None = None
        if not locked:
            self._lock.acquire()
        try:
            for _ in range(MAX_PAGES):
                try:
                    page = self._send(rq.list_request(self.project, self.zone, flt, token))
                except _Failure as exc:
                    raise ProviderError(f"gce: cannot list instances in {self.zone}: "
                                        f"{exc.summary}") from None
                found.extend(page.get("items", []) or [])
                token = page.get("nextPageToken")
                if not token:
                    break
        finally:
            if not locked:
                self._lock.release()
        return found

    # ------------------------------------------------------------ sending

    def _send(self, request: rq.Request) -> dict[str, Any]:
        """Execute one request, retrying transient failures; raise _Failure otherwise."""
        from google.auth.exceptions import GoogleAuthError
        from googleapiclient.errors import HttpError
        from httplib2 import HttpLib2Error  # type: ignore[import-untyped]

        collection, verb = request.method.split(".")
        name = request.params.get("instance")

        def once() -> dict[str, Any]:
            method = getattr(self._collection(collection), verb)
            kwargs: dict[str, Any] = dict(request.params)
            if request.body is not None:
                kwargs["body"] = request.body
            result: dict[str, Any] = method(**kwargs).execute(num_retries=0)
            return result

        def transient(exc: BaseException) -> bool:
            if isinstance(exc, HttpError):
                return rq.is_transient(int(exc.resp.status), exc.content)
            return isinstance(exc, (ConnectionError, TimeoutError, OSError))

        retrying = Retrying(
            stop=stop_after_attempt(self.retry_attempts),
            wait=wait_exponential(multiplier=self.retry_wait, max=self.retry_wait_max),
            retry=retry_if_exception(transient), reraise=True)
        try:
            return retrying(once)
        except HttpError as exc:
            status = int(exc.resp.status)
            raise _Failure(rq.http_error(status, exc.content, zone=self.zone, name=name),
                           status, exc.content) from exc
        except GoogleAuthError as exc:
            raise _Failure(f"AUTH_ERROR: {exc}"[:120]) from exc
        except (OSError, HttpLib2Error) as exc:
            raise _Failure(f"CONNECTION_ERROR: {exc}"[:120]) from exc

    def _collection(self, name: str) -> Any:
        # building a collection makes all its methods from the discovery document
        # (~30 ms for instances): once per client, not once per call
        if name not in self._collections:
            self._collections[name] = getattr(self.service(), name)()
        return self._collections[name]

    @property
    def project(self) -> str:
        if not self._project:
            if self.dry_run:
                return "PROJECT"
            self.service()  # application-default credentials name one
        return self._project

    def service(self) -> Any:
        """The Compute Engine client (built on first use, from the packaged discovery doc)."""
        if self._service is None:
            self._service = self._build()
        return self._service

    def _build(self) -> Any:
        import google.auth
        import google_auth_httplib2  # type: ignore[import-untyped]
        import httplib2
        from google.auth.exceptions import DefaultCredentialsError
        from googleapiclient.discovery import build

        credentials = self._credentials
        if credentials is None:
            try:
                credentials, project = google.auth.default(scopes=[
                    "https://www.googleapis.com/auth/cloud-platform"])
            except DefaultCredentialsError as exc:
                raise ProviderError(
                    "gce: no Google credentials: run `gcloud auth application-default "
                    "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account "
                    f"key file ({exc})") from None
            self._project = self._project or (project or "")
        if not self._project:
            raise ProviderError("gce: no project: set [gce] project (ECLOUD_GCE_PROJECT)")
        endpoint = self.gce.api_endpoint
        local = urlsplit(endpoint).hostname in _LOOPBACK if endpoint else False
        # a proxy from the environment must not see a loopback endpoint's traffic
        http = httplib2.Http(timeout=HTTP_TIMEOUT,
                             **({"proxy_info": None} if local else {}))
        return build("compute", "v1", static_discovery=True, cache_discovery=False,
                     http=google_auth_httplib2.AuthorizedHttp(credentials, http=http),
                     client_options={"api_endpoint": endpoint} if endpoint else None)


