"""`boss logs TASK`: a task's captured output, from the datastore or the database.

Workers upload each command's non-empty stdout and stderr to the default
bucket as ``ecloud-logs/<task>/<attempt id>/<step>.stdout|stderr`` (see
:func:`worker.attempt.log_prefix`). When that is unreachable, or holds
nothing, the last bytes kept in the attempt's row (``[worker] log_tail_bytes``)
are shown instead, and the caller is told so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from boss.errors import NotFound
from protocol.document import RemotePath
from protocol.errors import ProtocolError
from worker.attempt import log_prefix
from worker.datastore import Datastore
from worker.errors import WorkerError

MAX_BYTES = 64 * 1024 * 1024  # per file; a log bigger than this is cut, and says so


@dataclass(frozen=True)
class Logs:
    attempt: int  # the attempt's number
    stream: str  # "stdout" or "stderr"
    parts: list[tuple[str, str]]  # (title, text), one per command
    source: str  # where they came from: the datastore location, or "database"
    note: str = ""  # why the database tail was used


def pick_attempt(task: Mapping[str, Any], number: int | None) -> Mapping[str, Any]:
    attempts = task["attempts"]
    if not attempts:
        raise NotFound(f"task {task['name']!r} has not run yet ({task['state']})")
    if number is None:
        return attempts[-1]  # type: ignore[no-any-return]
    for a in attempts:
        if a["number"] == number:
            return a  # type: ignore[no-any-return]
    raise NotFound(f"task {task['name']!r} has no attempt {number} "
                   f"(it has {', '.join(str(a['number']) for a in attempts)})")


def fetch(task: Mapping[str, Any], attempt: Mapping[str, Any], stream: str,
          buckets: Mapping[str, str], default_url: str) -> Logs:
    """The attempt's logs from the datastore, else its tail from the database."""
    prefix = log_prefix(task["name"], attempt["id"])
    note = ""
    try:
        with Datastore(buckets, default_url) as store:
            fs, root = store.resolve(RemotePath("default", prefix))
            names = sorted((p for p in _listing(fs, root) if p.endswith("." + stream)),
                           key=_step_number)
            parts = [(f"command {_step_number(p)}", _read(fs, p)) for p in names]
        if parts:
            return Logs(attempt["number"], stream, parts, f"{default_url}/{prefix}")
        note = f"no {stream} log in the datastore ({prefix})"
    except (WorkerError, ProtocolError, OSError) as exc:
        note = f"the datastore could not be read: {exc}"
    tail = attempt.get(f"{stream}_tail") or ""
    return Logs(attempt["number"], stream, [("last bytes", tail)] if tail else [], "database",
                note)


def _listing(fs: Any, root: str) -> list[str]:
    try:
        return [str(p) for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []


def _step_number(path: str) -> int:
    stem = path.rsplit("/", 1)[-1].split(".", 1)[0]
    return int(stem) if stem.isdigit() else 0


def _read(fs: Any, path: str) -> str:
    with fs.open(path, "rb") as f:
        data: bytes = f.read(MAX_BYTES + 1)
    text = data[:MAX_BYTES].decode("utf-8", errors="replace")
    if len(data) > MAX_BYTES:
        text += f"\n[cut at {MAX_BYTES} bytes; the whole log is at {path}]\n"
    return text
