"""The ``worker`` command: parse, build the client and the daemon, run. Nothing else.

Log lines go to stderr; the one summary line at the end goes to stdout.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import typer

from protocol.console import err, load_settings_option, main_for
from protocol.errors import ProtocolError, SettingsError
from protocol.settings import Settings
from worker.attempt import AttemptEnv
from worker.cache import Cache
from worker.client import BossClient
from worker.daemon import Worker
from worker.errors import WorkerError
from worker.transport import TransportRefused, transport_from_url

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, add_completion=False,
                  help="ecloud worker: pull tasks from a boss and run them.")


app.callback()(load_settings_option)


_BOSS = typer.Option(None, "--boss", help="tcp://127.0.0.1:PORT (boss on this machine) or "
                     "ssh://USER@HOST[:SSHPORT]?port=PORT ([worker] boss).")
_TOKEN = typer.Option(None, "--token-file", help="File holding this worker's token "
                      "(from `boss admin add-worker`; [worker] token_file).")
_KEY = typer.Option(None, "--key", help="The worker's SSH private key, for ssh:// "
                    "([worker] ssh_key).")
_KNOWN = typer.Option(None, "--known-hosts", help="known_hosts file pinning the boss's host "
                      "key, for ssh:// ([worker] known_hosts).")


def _client(settings: Settings, boss: str | None, token_file: Path | None, key: Path | None,
            known_hosts: Path | None, slots: int, stop: threading.Event) -> BossClient:
    w = settings.worker
    url = boss or w.boss
    if not url:
        raise SettingsError("no boss to connect to: give --boss URL (or [worker] boss)")
    token_path = token_file or (Path(w.token_file) if w.token_file else None)
    if token_path is None:
        raise SettingsError("no token: give --token-file FILE (or [worker] token_file)")
    try:
        token = token_path.expanduser().read_text().strip()
    except OSError as exc:
        raise SettingsError(f"cannot read the token file {token_path}: {exc.strerror}") from None
    if not token:
        raise SettingsError(f"the token file {token_path} is empty")
    transport = transport_from_url(
        url, key_path=key or (w.ssh_key or None),
        known_hosts=known_hosts or (w.known_hosts or None))
    return BossClient(transport, token, slots=slots, give_up_after=w.give_up_seconds,
                      stop=stop)


@app.command()
def run(
    ctx: typer.Context,
    boss: str | None = _BOSS,
    token_file: Path | None = _TOKEN,
    key: Path | None = _KEY,
    known_hosts: Path | None = _KNOWN,
    slots: int | None = typer.Option(None, "--slots", min=1, max=1024,
                                     help="Tasks run at once ([worker] slots)."),
    burst: bool = typer.Option(False, "--burst", help="Leave when the queue is drained "
                               "(nothing waiting, ready or running)."),
    max_idle: float | None = typer.Option(None, "--max-idle", min=0, help="Leave after this "
                                          "many seconds without a task."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Pull tasks from the boss and run them (until stopped, or see --burst, --max-idle).

    Ctrl-C (or SIGTERM) once: finish the running tasks, take no new ones.
    Twice: cancel the running tasks too. Either way the worker says goodbye.
    """
    settings: Settings = ctx.obj["settings"]
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    n = slots or settings.worker.slots
    stop = threading.Event()
    client = _client(settings, boss, token_file, key, known_hosts, n, stop)
    w = settings.worker
    env = AttemptEnv(workdir_root=Path(w.workdir), buckets={}, default_url="",
                     cache=Cache(w.cache_dir, w.cache_bytes) if w.cache_bytes else None,
                     settings=w)
    daemon = Worker(client, env, n, burst=burst, max_idle=max_idle)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        cancel = stop.is_set()
        stop.set()
        err.print("cancelling the running tasks" if cancel else
                  "finishing the running tasks, taking no new ones (again to cancel them)")
        daemon.stop(cancel=cancel)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    summary = daemon.run()
    typer.echo(json.dumps({"ran": summary.ran, "succeeded": summary.succeeded,
                           "failed": summary.failed, "refused": summary.refused,
                           "reason": summary.reason}))


@app.command()
def check(
    ctx: typer.Context,
    boss: str | None = _BOSS,
    token_file: Path | None = _TOKEN,
    key: Path | None = _KEY,
    known_hosts: Path | None = _KNOWN,
) -> None:
    """Connect to the boss, say hello, print what it answered, and leave."""
    settings: Settings = ctx.obj["settings"]
    stop = threading.Event()
    stop.set()  # one try, no reconnect loop
    client = _client(settings, boss, token_file, key, known_hosts, settings.worker.slots, stop)
    try:
        welcome = client.hello()
    finally:
        client.close()
    info: dict[str, Any] = {"worker_id": welcome.worker_id, "name": welcome.name,
                            "lease_seconds": welcome.lease_seconds,
                            "heartbeat_seconds": welcome.heartbeat_seconds,
                            "buckets": welcome.buckets}
    typer.echo(json.dumps(info))


main = main_for(app, (SettingsError, TransportRefused, WorkerError, ProtocolError), "worker")

if __name__ == "__main__":
    main()
