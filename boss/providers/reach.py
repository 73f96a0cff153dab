"""How a remote worker reaches this boss: its URL, the pinned host key, its SSH key.

Every provider whose workers run on other machines (``ssh``, ``gce``) hands
each worker the same three things, built here from the ``[boss]`` settings:

- ``boss_url``: ``ssh://USER@HOST:SSHPORT?port=RPCPORT`` (``[boss] ssh_user``,
  ``ssh_host``, ``ssh_port`` and the port of ``listen``), what ``worker run
  --boss`` takes;
- ``known_hosts``: one known_hosts line pinning the boss machine's sshd host key
  (``[boss] ssh_host_key_file``), so a worker never trusts on first use;
- ``worker_key``: the workers' SSH private key (``[boss] worker_key_file``, see
  `boss admin authorize-worker-key`); empty when the hosts already hold it.

    ProviderError (boss.providers)   a file cannot be read or holds no key
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from boss.providers import ProviderError
from protocol.settings import Settings

_HOST_KEY_TYPES = ("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-")


@dataclass(frozen=True)
class Boot:
    """What every worker needs to reach this boss."""

    boss_url: str
    known_hosts: str
    worker_key: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


def boss_url(ssh_user: str, ssh_host: str, ssh_port: int, rpc_port: int) -> str:
    """``ssh://USER@HOST:SSHPORT?port=RPCPORT``: what ``worker run --boss`` takes."""
    return f"ssh://{ssh_user}@{ssh_host}:{ssh_port}?port={rpc_port}"


def known_hosts_line(host: str, port: int, host_key: str) -> str:
    """The known_hosts line pinning ``host_key`` (an sshd ``.pub``: TYPE BASE64 [comment]).

    A ready known_hosts line (``HOSTS TYPE BASE64``) is kept as it is.
    """
    fields = host_key.split()
    if len(fields) >= 3 and fields[1].startswith(_HOST_KEY_TYPES):
        return " ".join(fields[:3])
    if len(fields) < 2 or not fields[0].startswith(_HOST_KEY_TYPES):
        raise ValueError("the boss host key must be an SSH public key line "
                         "(TYPE BASE64 [comment], as in /etc/ssh/ssh_host_ed25519_key.pub)")
    where = host if port == 22 else f"[{host}]:{port}"
    return f"{where} {fields[0]} {fields[1]}"


def read_file(provider: str, path: str, key: str, what: str) -> str:
    """The stripped text of a settings-named file; ProviderError naming the key if unusable."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ProviderError(f"{provider}: cannot read {what} from {path} ({key}): "
                            f"{exc.strerror or exc}") from None
    if not text:
        raise ProviderError(f"{provider}: {path} ({key}) is empty; it should hold {what}")
    return text


def boot_for(settings: Settings, provider: str, *, host_key: str | None = None,
             worker_key: str | None = None, url: str | None = None) -> Boot:
    """The :class:`Boot` of this boss's workers; arguments override the settings' files."""
    b = settings.boss
    if host_key is None:
        host_key = read_file(provider, b.ssh_host_key_file, "[boss] ssh_host_key_file",
                             "the boss machine's sshd public host key (its .pub file)")
    if worker_key is None:
        worker_key = (read_file(provider, b.worker_key_file, "[boss] worker_key_file",
                                "the workers' SSH private key")
                      if b.worker_key_file else "")
    try:
        known = known_hosts_line(b.ssh_host, b.ssh_port, host_key)
    except ValueError as exc:
        raise ProviderError(f"{provider}: {exc}") from None
    return Boot(boss_url=url or boss_url(b.ssh_user, b.ssh_host, b.ssh_port, b.port),
                known_hosts=known, worker_key=worker_key)
