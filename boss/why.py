"""`boss why TASK`: why a task waits, why it does not run, why it ran again (pure).

:func:`explain` turns what the database says about one task (the dict of
`boss show`, plus a few counts gathered by the service) into sentences. It
does no I/O, so every waiting reason is table-tested.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_ACTIVE_WORKERS = ("idle", "busy")


@dataclass(frozen=True)
class Situation:
    """What besides the task itself decides whether it runs."""

    queue_ahead: int = 0  # ready tasks a worker takes first
    workers: Mapping[str, int] = field(default_factory=dict)  # state -> count
    free_slots: int = 0  # on idle and busy workers
    worker_errors: Sequence[Mapping[str, Any]] = ()  # {"error", "count"}
    failed_ancestors: Sequence[Mapping[str, Any]] = ()  # {"name", "state", "reason"}
    autoscale: bool = True
    max_workers: int = 0
    now: float = field(default_factory=time.time)


def explain(task: Mapping[str, Any], s: Situation) -> list[str]:
    """Sentences, most important first."""
    state = task["state"]
    lines = _BY_STATE.get(state, _other)(task, s)
    return lines + _history(task)


def _waiting(task: Mapping[str, Any], s: Situation) -> list[str]:
    parents = task["parents"]
    open_ = [p for p in parents if p["state"] != "succeeded"]
    if not open_:
        return ["waiting, yet every parent succeeded: it becomes ready at the next release"]
    shown = ", ".join(f"{p['name']} ({p['state']})" for p in open_[:10])
    more = f" and {len(open_) - 10} more" if len(open_) > 10 else ""
    return [f"waiting for {len(open_)} of {len(parents)} parent(s): {shown}{more}"]


def _ready(task: Mapping[str, Any], s: Situation) -> list[str]:
    live = sum(s.workers.get(k, 0) for k in _ACTIVE_WORKERS)
    starting = s.workers.get("provisioning", 0)
    lines = [f"ready; {s.queue_ahead} ready task(s) go first (higher priority or pushed "
             "earlier)" if s.queue_ahead else "ready, and next in the queue"]
    if live == 0 and starting:
        lines.append(f"no worker is running yet: {starting} starting")
    elif live == 0:
        if s.autoscale and s.max_workers > 0:
            lines.append("no worker is running: `boss serve` starts them (autoscale, at most "
                         f"{s.max_workers})")
        else:
            lines.append("no worker is running: start `boss serve` with autoscale, or "
                         "`boss instantiate-worker N`")
    elif s.free_slots == 0:
        lines.append(f"every slot of the {live} worker(s) is busy")
    else:
        lines.append(f"{s.free_slots} slot(s) free on {live} worker(s): it is taken at "
                     "their next pop")
    if s.worker_errors:
        errors = "; ".join(f"{e['count']} x {e['error']}" for e in s.worker_errors[:3])
        lines.append(f"workers that could not be created: {errors}")
    return lines


def _running(task: Mapping[str, Any], s: Situation) -> list[str]:
    a = task["attempts"][-1] if task["attempts"] else None
    if a is None:
        return ["running"]
    since = max(0.0, s.now - a["started_at"])
    lease = a["lease_expires_at"] - s.now
    return [f"running: attempt {a['number']} on worker {a['worker_id']} for {since:.0f} s "
            f"(lease {'expires in ' + format(lease, '.0f') + ' s' if lease >= 0 else 'expired'})"]


def _failed(task: Mapping[str, Any], s: Situation) -> list[str]:
    tries = f"{task['tries']} of {task['max_tries']} tries spent"
    return [f"failed: {task['reason'] or 'no reason recorded'} ({tries}); "
            "`boss retry` puts it back"]


def _upstream(task: Mapping[str, Any], s: Situation) -> list[str]:
    if not s.failed_ancestors:
        return ["upstream_failed: a task upstream failed or was cancelled"]
    names = ", ".join(f"{a['name']} ({a['state']}: {a['reason'] or 'no reason'})"
                      for a in s.failed_ancestors)
    return [f"upstream_failed because of {names}; `boss retry` of those brings it back"]


def _other(task: Mapping[str, Any], s: Situation) -> list[str]:
    return [str(task["state"])]


_BY_STATE = {"waiting": _waiting, "ready": _ready, "running": _running, "failed": _failed,
             "upstream_failed": _upstream}


def _history(task: Mapping[str, Any]) -> list[str]:
    attempts = task["attempts"]
    if len(attempts) < 2 and not any(a["state"] != "running" and a["state"] != "succeeded"
                                     for a in attempts):
        return []
    out = [f"ran {len(attempts)} time(s):"]
    for a in attempts[-20:]:
        why = a["reason"] or (f"exit {a['exit_status']}" if a["exit_status"] else "")
        out.append(f"  attempt {a['number']} on worker {a['worker_id']}: {a['state']}"
                   + (f" ({why})" if why else ""))
    if task["lost"]:
        out.append(f"  {task['lost']} attempt(s) lost with their worker; they do not spend "
                   "the task's retries")
    return out
