"""Providers: what creates and deletes workers (local processes, SSH hosts, Compute Engine).

One interface, :class:`Provider`, and one implementation per kind, found by
name in :data:`PROVIDERS` (the settings' ``[provider] default`` or a
``--provider`` option). The autoscaler and the CLI speak only to the
interface. A provider never touches the database: the service records what
it reports (the worker's reference, or the error that stopped its creation).

    ProviderError (BossError)   a provider call failed; the message names the
                                provider and what to do
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from boss.errors import BossError
from protocol.settings import Settings


class ProviderError(BossError):
    """A provider could not create, delete or list workers."""


@dataclass(frozen=True)
class WorkerSpec:
    """One worker to create: the row already exists (state ``provisioning``)."""

    worker_id: int
    name: str
    token: str  # the worker's secret; only its hash is in the database
    slots: int
    spot: bool = False


DRY_RUN_TOKEN = "<token: generated when the worker is created>"


@dataclass(frozen=True)
class Created:
    """A worker the provider started: ``reference`` finds it again (pid, host, instance)."""

    worker_id: int
    reference: str
    address: str | None = None


@dataclass(frozen=True)
class Failed:
    """A worker the provider could not start; ``error`` is shown in `boss admin status`."""

    worker_id: int
    error: str  # short and groupable, e.g. "QUOTA_EXCEEDED CPUS in us-central1"


@dataclass(frozen=True)
class Instance:
    """Something the provider runs for this boss (to find orphans)."""

    reference: str
    name: str
    alive: bool


class Provider(ABC):
    """Creates, deletes and lists this boss's workers."""

    name: str

    @abstractmethod
    def create(self, specs: Sequence[WorkerSpec]) -> list[Created | Failed]:
        """Start one worker per spec; never raise for one worker's failure."""

    @abstractmethod
    def delete(self, reference: str) -> None:
        """Stop and remove a worker; deleting one that is already gone is not an error."""

    @abstractmethod
    def plan(self, specs: Sequence[WorkerSpec]) -> list[dict[str, Any]]:
        """What ``create(specs)`` would send or run, as JSON objects; starts nothing.

        Secrets are not in it: a spec's token is a placeholder at this point.
        """

    @abstractmethod
    def list(self) -> list[Instance]:
        """The workers this provider runs for this boss."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release what the provider holds (processes are not stopped by this)."""


ProviderFactory = Callable[[Settings], Provider]
PROVIDERS: dict[str, ProviderFactory] = {}


def register(name: str) -> Callable[[ProviderFactory], ProviderFactory]:
    def add(factory: ProviderFactory) -> ProviderFactory:
        PROVIDERS[name] = factory
        return factory
    return add


def dry_run(provider: Provider, n: int, slots: int, spot: bool = False) -> list[dict[str, Any]]:
    """``provider.plan`` of ``n`` workers that are not registered (no row, no token)."""
    import secrets

    plan = provider.plan([WorkerSpec(-i, f"{provider.name}-{secrets.token_hex(4)}",
                                     DRY_RUN_TOKEN, slots, spot) for i in range(1, n + 1)])
    # printed for people to read (and kept in CI logs): the workers' key is not shown
    return [_hide_private_keys(item) for item in plan]


_PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?"
                          r"-----END \1PRIVATE KEY-----", re.DOTALL)
HIDDEN_KEY = "<the workers' SSH private key ([boss] worker_key_file), not shown>"


def _hide_private_keys(value: Any) -> Any:
    if isinstance(value, str):
        return _PRIVATE_KEY.sub(HIDDEN_KEY, value)
    if isinstance(value, dict):
        return {k: _hide_private_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hide_private_keys(v) for v in value]
    return value


def provider_for(settings: Settings, name: str | None = None) -> Provider:
    """The provider named (default: ``[provider] default``); imported on first use."""
    import importlib

    wanted = name or settings.provider.default
    if wanted not in PROVIDERS:
        try:
            importlib.import_module(f"boss.providers.{wanted}")
        except ModuleNotFoundError:
            pass
    factory = PROVIDERS.get(wanted)
    if factory is None:
        raise ProviderError(f"unknown provider {wanted!r}: one of local, ssh, gce")
    return factory(settings)
