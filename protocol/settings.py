"""Settings: one TOML file, overridden key by key from ``ECLOUD_<TABLE>_<KEY>``.

Found as ``--settings PATH``, else ``$ECLOUD_SETTINGS``, else ``./ecloud.toml``
when present, else the built-in defaults. Loaded once into an explicit
:class:`Settings` object that is passed down; nothing reads it at import time.

Relative paths (``.ecloud/boss.db``, ``file://.ecloud/data``) are resolved
against the current directory when the settings are loaded, so that a worker
spawned elsewhere sees the same absolute places.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.errors import SettingsError


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BossSettings(_Table):
    database_url: str = "sqlite:///.ecloud/boss.db"
    listen: str = "127.0.0.1:7878"
    lease_seconds: float = Field(default=60.0, gt=0)
    reap_seconds: float = Field(default=5.0, gt=0)
    ssh_host: str = "127.0.0.1"
    ssh_port: int = 22
    ssh_user: str = "ecloud"
    authorized_keys: str = "~/.ssh/authorized_keys"
    ssh_host_key_file: str = "/etc/ssh/ssh_host_ed25519_key.pub"
    worker_key_file: str = ""
    max_push_bytes: int = Field(default=10_000_000_000, ge=1)

    @field_validator("listen")
    @classmethod
    def _loopback(cls, listen: str) -> str:
        host, _, port = listen.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1", "[::1]") or not port.isdigit():
            raise ValueError(
                f"listen {listen!r}: the boss only binds a loopback address "
                "(127.0.0.1:PORT); remote workers come through the SSH tunnel"
            )
        return listen

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class DatastoreSettings(_Table):
    default: str = "file://.ecloud/data"
    buckets: dict[str, str] = Field(default_factory=lambda: {"data": "file://.ecloud/data"})


class WorkerSettings(_Table):
    slots: int = Field(default=2, ge=1, le=1024)
    workdir: str = ".ecloud/work"
    cache_dir: str = ".ecloud/cache"
    cache_bytes: int = Field(default=10_000_000_000, ge=0)
    heartbeat_seconds: float = Field(default=1.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0)
    container_runtime: Literal["podman", "docker"] = "podman"
    container_args: list[str] = Field(default_factory=lambda: ["--runtime", "runc"])
    log_tail_bytes: int = Field(default=4096, ge=0)
    boss: str = ""  # tcp://127.0.0.1:PORT or ssh://USER@HOST[:SSHPORT]?port=PORT
    token_file: str = ""
    ssh_key: str = ""  # the worker's private key, for an ssh:// boss
    known_hosts: str = ""  # pins the boss's host key, for an ssh:// boss
    give_up_seconds: float = Field(default=3600.0, gt=0)


class ProviderSettings(_Table):
    default: Literal["local", "ssh", "gce"] = "local"


_GCE_LABEL_KEY = r"^[a-z][a-z0-9_-]{0,62}$"
_GCE_LABEL_VALUE = r"^[a-z0-9_-]{0,63}$"


class GceSettings(_Table):
    """The ``gce`` provider: Compute Engine instances (boss/providers/gce.py)."""

    project: str = ""  # empty: the project of the application-default credentials
    zone: str = "us-central1-a"
    machine_type: str = "e2-standard-2"
    image: str = "projects/debian-cloud/global/images/family/debian-12"
    network: str = "default"
    subnetwork: str = ""
    external_ip: bool = True
    service_account: str = "default"
    scopes: list[str] = Field(
        default_factory=lambda: ["https://www.googleapis.com/auth/cloud-platform"])
    labels: dict[str, str] = Field(default_factory=dict)
    spot: bool = False
    disk_gb: int = Field(default=20, ge=10, le=65536)
    api_endpoint: str = ""  # empty: the real API; tests point it at 127.0.0.1
    boss_label: str = Field(default="ecloud", pattern=_GCE_LABEL_VALUE, min_length=1)

    @field_validator("labels")
    @classmethod
    def _label_syntax(cls, labels: dict[str, str]) -> dict[str, str]:
        import re

        for key, value in labels.items():
            if not re.match(_GCE_LABEL_KEY, key) or not re.match(_GCE_LABEL_VALUE, value):
                raise ValueError(
                    f"label {key}={value!r}: Compute Engine label keys are 1-63 of a-z 0-9 _ - "
                    "starting with a letter, values 0-63 of a-z 0-9 _ -")
        return labels


_SSH_HOST = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*@)?(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])"
                       r"(?::[0-9]{1,5})?$")


class SshSettings(_Table):
    """The ``ssh`` provider: an existing pool of hosts (boss/providers/ssh.py)."""

    hosts: list[str] = Field(default_factory=list)  # "[USER@]HOST[:PORT]"
    key_file: str = ""  # the boss's key for logging in to the hosts; empty: agent, ~/.ssh/id_*
    known_hosts: str = "~/.ssh/known_hosts"  # pins the hosts' keys; unknown hosts are refused
    workers_per_host: int = Field(default=1, ge=1, le=1024)
    remote_dir: str = "~/.ecloud"  # "{host}" is replaced by the host's name
    python: str = "python3"
    install: Literal["upload", "none"] = "upload"
    worker_command: str = "worker"  # with install = "none"
    connect_seconds: float = Field(default=10.0, gt=0)
    command_seconds: float = Field(default=60.0, gt=0)

    @field_validator("hosts")
    @classmethod
    def _host_syntax(cls, hosts: list[str]) -> list[str]:
        for i, host in enumerate(hosts):
            if not _SSH_HOST.match(host):
                raise ValueError(f"hosts[{i}] = {host!r}: write [USER@]HOST[:PORT]")
        if len(set(hosts)) != len(hosts):
            raise ValueError("hosts: a host is listed twice")
        return hosts

    @field_validator("remote_dir")
    @classmethod
    def _remote_dir(cls, value: str) -> str:
        if not (value.startswith("/") or value == "~" or value.startswith("~/")):
            raise ValueError(f"remote_dir {value!r}: an absolute path or one under ~/")
        if any(ch in value for ch in "\n\0'\"$`\\"):
            raise ValueError(f"remote_dir {value!r}: no quotes, $, ` or backslashes please")
        return value.rstrip("/") or "/"


class EventsSettings(_Table):
    """Where events go besides the database (boss/amqp.py)."""

    amqp_url: str = ""  # amqp://USER:PASSWORD@HOST:5672/VHOST; empty: no AMQP sink
    amqp_exchange: str = "hyperflow.events"  # a topic exchange, hyperflow's routing keys


class CostSettings(_Table):
    """Prices per worker-hour, for `boss report` and `boss admin status` (boss/cost.py)."""

    currency: str = "USD"
    local: float = Field(default=0.0, ge=0)
    ssh: float = Field(default=0.0, ge=0)
    gce: dict[str, float] = Field(default_factory=lambda: {
        "e2-standard-2": 0.067, "e2-standard-4": 0.134, "e2-standard-8": 0.268,
        "n2-standard-2": 0.097, "n2-standard-4": 0.194, "n2-standard-8": 0.388})
    gce_spot: dict[str, float] = Field(default_factory=lambda: {
        "e2-standard-2": 0.022, "e2-standard-4": 0.044, "e2-standard-8": 0.088,
        "n2-standard-2": 0.024, "n2-standard-4": 0.047, "n2-standard-8": 0.094})


class AutoscaleSettings(_Table):
    min_workers: int = Field(default=0, ge=0)
    max_workers: int = Field(default=10, ge=0)
    idle_seconds: float = Field(default=60.0, ge=0)
    enabled: bool = True  # `boss serve` starts and stops workers itself
    boot_seconds: float = Field(default=600.0, gt=0)
    spot: bool = False
    tick_seconds: float = Field(default=2.0, gt=0)


class Settings(_Table):
    boss: BossSettings = Field(default_factory=BossSettings)
    datastore: DatastoreSettings = Field(default_factory=DatastoreSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    provider: ProviderSettings = Field(default_factory=ProviderSettings)
    autoscale: AutoscaleSettings = Field(default_factory=AutoscaleSettings)
    gce: GceSettings = Field(default_factory=GceSettings)
    ssh: SshSettings = Field(default_factory=SshSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    cost: CostSettings = Field(default_factory=CostSettings)
    source: str = "built-in defaults"

    def bucket_url(self, bucket: str) -> str | None:
        return self.datastore.buckets.get(bucket)


ENV_PREFIX = "ECLOUD_"
TABLES: dict[str, type[_Table]] = {
    "boss": BossSettings,
    "datastore": DatastoreSettings,
    "worker": WorkerSettings,
    "provider": ProviderSettings,
    "autoscale": AutoscaleSettings,
    "gce": GceSettings,
    "ssh": SshSettings,
    "events": EventsSettings,
    "cost": CostSettings,
}


def find_settings_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if environ.get("ECLOUD_SETTINGS"):
        return Path(environ["ECLOUD_SETTINGS"])
    here = Path("ecloud.toml")
    return here if here.is_file() else None


def load_settings(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Load settings from file + environment; errors name the file and key."""
    env = os.environ if environ is None else environ
    base = (cwd or Path.cwd()).resolve()
    file = find_settings_file(path, env)
    data: dict[str, Any] = {}
    source = "built-in defaults"
    if file is not None:
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"settings file {file} does not exist") from None
        except OSError as exc:  # a directory, no permission, ...
            raise SettingsError(f"settings file {file} cannot be read: "
                                f"{exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"settings file {file} is not valid TOML: {exc}") from None
        source = str(file)
    for table, model in TABLES.items():
        for key, field in model.model_fields.items():
            var = f"{ENV_PREFIX}{table.upper()}_{key.upper()}"
            if var in env:
                raw = env[var]
                value: Any = raw
                if field.annotation is not str and raw[:1] in "[{":
                    try:
                        value = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        raise SettingsError(f"{var}: not valid JSON: {exc}") from None
                data.setdefault(table, {})[key] = value
                source += f" + {var}"
    try:
        settings = Settings.model_validate({**data, "source": source})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (settings.example.toml lists every key)"
        raise SettingsError(f"{source}: [{loc}] {msg}") from None
    return absolutize(settings, base)


def absolute_url(url: str, base: Path) -> str:
    """Make a ``file://`` URL or a SQLite URL with a relative path absolute."""
    if url.startswith("file://"):
        path = url[len("file://") :]
        return "file://" + str((base / os.path.expanduser(path)).resolve())
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rest = url[len("sqlite:///") :]
        if rest and rest != ":memory:":
            return "sqlite:///" + str((base / rest).resolve())
    return url


_URL_PASSWORD = re.compile(r"^([A-Za-z][\w+.-]*://[^/?#@:]*):[^/?#@]*@")
_SECRET_QUERY = re.compile(r"(?i)([?&][^=&#]*(?:secret|password|passwd|token)[^=&#]*=)[^&#]*")


def hide_password(url: str) -> str:
    """A URL for display: its password, and query values named like a secret, as ``***``.

    Workers are sent the URL itself; people and logs see this.
    """
    return _SECRET_QUERY.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", url))


def absolutize(settings: Settings, base: Path) -> Settings:
    s = settings.model_copy(deep=True)
    s.boss.database_url = absolute_url(s.boss.database_url, base)
    s.datastore.default = absolute_url(s.datastore.default, base)
    s.datastore.buckets = {k: absolute_url(v, base) for k, v in s.datastore.buckets.items()}
    s.worker.workdir = str((base / os.path.expanduser(s.worker.workdir)).resolve())
    s.worker.cache_dir = str((base / os.path.expanduser(s.worker.cache_dir)).resolve())
    return s
