"""The ``local`` provider: workers as subprocesses of this machine (the default).

Each worker is ``python -m worker.cli run --boss tcp://127.0.0.1:PORT --burst``
in its own session (so stopping it reaches its commands too), with its token
in a 0600 file under ``<workdir>/../workers/``. The reference is the pid. A
local worker talks to the boss directly: no SSH, the port is on loopback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from boss.providers import Created, Failed, Instance, Provider, WorkerSpec, register
from protocol.settings import Settings

GRACE_SECONDS = 10.0  # after SIGTERM, before SIGKILL: time to finish and say goodbye


@register("local")
class LocalProvider(Provider):
    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = Path(settings.worker.workdir).parent / "workers"
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def _url(self) -> str:
        port = self.settings.boss.listen.rpartition(":")[2]
        return f"tcp://127.0.0.1:{port}"

    def _launch(self, spec: WorkerSpec) -> tuple[list[str], dict[str, str]]:
        """The worker's argv and the environment it adds (the boss's [worker] tuning)."""
        token = self.root / f"{spec.name}.token"
        w = self.settings.worker
        env = {"ECLOUD_WORKER_WORKDIR": w.workdir,
               "ECLOUD_WORKER_CACHE_DIR": w.cache_dir,
               "ECLOUD_WORKER_CACHE_BYTES": str(w.cache_bytes),
               "ECLOUD_WORKER_CONTAINER_RUNTIME": w.container_runtime,
               "ECLOUD_WORKER_CONTAINER_ARGS": _json_list(w.container_args)}
        argv = [sys.executable, "-m", "worker.cli", "run", "--boss", self._url(),
                "--token-file", str(token), "--slots", str(spec.slots), "--burst"]
        return argv, env

    def plan(self, specs: Sequence[WorkerSpec]) -> list[dict[str, Any]]:
        return [{"worker": spec.name, "argv": argv, "env": env, "cwd": str(self.root)}
                for spec in specs for argv, env in [self._launch(spec)]]

    def create(self, specs: Sequence[WorkerSpec]) -> list[Created | Failed]:
        out: list[Created | Failed] = []
        self.root.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            token = self.root / f"{spec.name}.token"
            log = self.root / f"{spec.name}.log"
            argv, extra = self._launch(spec)
            try:
                fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(spec.token + "\n")
                env = {k: v for k, v in os.environ.items() if k != "ECLOUD_SETTINGS"}
                env.update(extra)
                with log.open("ab") as logf:
                    proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                        start_new_session=True, cwd=str(self.root))
            except OSError as exc:
                out.append(Failed(spec.worker_id, f"cannot start a local worker: {exc}"))
                continue
            self._children[proc.pid] = proc
            out.append(Created(spec.worker_id, str(proc.pid), "127.0.0.1"))
        return out

    def delete(self, reference: str) -> None:
        try:
            pid = int(reference)
        except ValueError:
            return
        if not self._is_ours(pid):
            return  # gone already, or the pid was reused by something else
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline and self._is_ours(pid):
            self._reap(pid)
            time.sleep(0.05)
        if self._is_ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self._reap(pid)

    def list(self) -> list[Instance]:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            pid = int(proc.name)
            if self._is_ours(pid):
                found.append(Instance(str(pid), _token_name(pid) or str(pid), True))
        return found

    def reap(self) -> None:
        """Collect exited children (no zombies while the boss runs)."""
        for pid in list(self._children):
            self._reap(pid)

    def close(self) -> None:
        """Wait for the workers started here to exit (they were told to); kill stragglers."""
        for pid, proc in list(self._children.items()):
            try:
                proc.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                proc.wait(timeout=GRACE_SECONDS)
            del self._children[pid]

    def _reap(self, pid: int) -> None:
        proc = self._children.get(pid)
        if proc is not None and proc.poll() is not None:
            del self._children[pid]

    def _is_ours(self, pid: int) -> bool:
        """A live `worker run` with a token file under this boss's workers directory."""
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state == "Z":
            self._reap(pid)
            return False
        argv = raw.split(b"\0")
        return b"worker.cli" in argv and any(
            a.startswith(str(self.root).encode() + b"/") for a in argv)


def _token_name(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for a in argv:
        if a.endswith(b".token"):
            return Path(a.decode(errors="replace")).stem
    return None


def _json_list(values: list[str]) -> str:
    import json

    return json.dumps(values)
