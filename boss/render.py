"""Rich renderings of service results, for the CLI (no logic, no queries)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

STATE_STYLE = {
    "waiting": "dim", "ready": "cyan", "running": "yellow", "succeeded": "green",
    "failed": "red", "upstream_failed": "magenta", "cancelled": "dim red",
}


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _state(s: str) -> str:
    style = STATE_STYLE.get(s)
    # an unstyled state (an attempt's "timeout", "lost") as "[]x[/]" is a MarkupError
    return f"[{style}]{escape(s)}[/]" if style else escape(s)


def _text(value: str | None, limit: int | None = None) -> str:
    """User data (names, reasons, URLs, errors) for a markup string: never read as markup."""
    return escape((value or "")[:limit])


def tasks_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "name", "state", "priority", "tries", "updated", "reason")
    for r in rows:
        table.add_row(str(r["id"]), _text(r["name"]), _state(r["state"]), str(r["priority"]),
                      f"{r['tries']}/{r['max_tries']}" + (f" +{r['lost']} lost" if r["lost"]
                                                          else ""),
                      _ago(r["updated_at"]), _text(r["reason"], 60))
    return table


def task_detail(out: Console, d: dict[str, Any]) -> None:
    out.print(f"[bold]{_text(d['name'])}[/] (id {d['id']}): {_state(d['state'])}  "
              f"priority {d['priority']}  tries {d['tries']}/{d['max_tries']}  "
              f"lost {d['lost']}")
    if d["reason"]:
        out.print(f"reason: {d['reason']}", markup=False)
    if d["parents"]:
        out.print("after: " + ", ".join(f"{p['name']} ({p['state']})" for p in d["parents"]),
                  markup=False)
    if d["children"]:
        out.print("before: " + ", ".join(c["name"] for c in d["children"]), markup=False)
    out.print("document:")
    out.print_json(json.dumps(d["document"]))
    if not d["attempts"]:
        return
    table = Table("attempt", "#", "worker", "state", "started", "wall s", "exit", "reason",
                  title="attempts")
    for a in d["attempts"]:
        wall = a["metrics"].get("wall")
        table.add_row(str(a["id"]), str(a["number"]), str(a["worker_id"] or "-"),
                      _state(a["state"]), _ago(a["started_at"]),
                      f"{wall:.2f}" if wall is not None else "-",
                      "-" if a["exit_status"] is None else str(a["exit_status"]),
                      _text(a["reason"], 60))
    out.print(table)
    last = d["attempts"][-1]
    if last.get("stderr_tail"):
        out.print("stderr (last lines):")
        out.print(last["stderr_tail"], markup=False, highlight=False)


def status(out: Console, d: dict[str, Any]) -> None:
    counts = d["tasks"]
    total = sum(counts.values())
    table = Table("state", "tasks", title=f"tasks ({total})")
    for state, n in counts.items():
        table.add_row(_state(state), str(n))
    out.print(table)
    wt = Table("state", "workers", title="workers")
    for state, n in sorted(d["workers"].items()):
        wt.add_row(_text(state), str(n))
    out.print(wt)
    for e in d["worker_errors"]:
        out.print(f"[red]{e['count']} workers not created:[/] {_text(e['error'])}")
    c = d["cost"]
    unpriced = (f" ({c['unpriced_workers']} worker(s) without a price, see [cost])"
                if c["unpriced_workers"] else "")
    out.print(f"VM time {c['vm_seconds'] / 3600:.2f} h, cost {c['cost']:.2f} "
              f"{_text(c['currency'])}{unpriced}", markup=False)
    if d["context"]:
        ct = Table("key", "value", title="context")
        for k, v in d["context"].items():
            ct.add_row(_text(k), _text(v))
        out.print(ct)
    out.print(f"database: {d['database']}", markup=False)


def workers_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "name", "provider", "state", "address", "slots", "last seen",
                  "running", "tasks", "error")
    for w in rows:
        table.add_row(str(w["id"]), _text(w["name"]), _text(w["provider"]), _text(w["state"]),
                      _text(w["address"] or w["reference"] or "-"), str(w["slots"]),
                      _ago(w["last_seen"]), str(w["running"]), _text(", ".join(w["tasks"])),
                      _text(w["error"], 50))
    return table


ACTIVE = ("waiting", "ready", "running")


def _left(counts: dict[str, int]) -> int:
    """Tasks that are not finished yet (waiting, ready or running)."""
    return sum(counts.get(k, 0) for k in ACTIVE)


def follow(console: Console, progress: Callable[[], dict[str, Any]], every: float = 0.5,
           limit: float = 30 * 24 * 3600.0) -> dict[str, int]:
    """Show live progress until no task is waiting, ready or running; return the counts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    deadline = time.monotonic() + limit
    with Progress(*columns, console=console, transient=False) as bar:
        job = bar.add_task("tasks", total=None)
        while True:
            s = progress()
            counts: dict[str, int] = s["tasks"]
            total = sum(counts.values())
            done = total - _left(counts)
            parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v)
            live = sum(v for k, v in s["workers"].items() if k in ("idle", "busy"))
            bar.update(job, total=total, completed=done,
                       description=f"{parts} | {live} worker(s)")
            if done == total or time.monotonic() > deadline:
                return counts
            time.sleep(every)


# --- observing a run -----------------------------------------------------------------

class Rate:
    """Tasks finished per second over the last ``window`` seconds, from successive counts."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self.samples: list[tuple[float, int]] = []

    def add(self, t: float, done: int) -> float | None:
        self.samples.append((t, done))
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window:
            self.samples.pop(0)
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def dashboard(d: dict[str, Any], rate: float | None) -> Any:
    """One frame of `boss watch`: progress, counts, workers, latest failures."""
    from rich.console import Group

    counts: dict[str, int] = d["tasks"]
    total = sum(counts.values())
    left = _left(counts)
    done = total - left
    pace = "-" if rate is None else f"{rate:.1f} tasks/s"
    eta = (_duration(left / rate) if rate and left else ("done" if not left else "-"))
    head = (f"[bold]{done}/{total}[/] done  {pace}  ETA {eta}  |  "
            + "  ".join(_state(k) + f" {v}" for k, v in counts.items() if v))
    filled = round(60 * done / total) if total else 0
    parts: list[Any] = [head, f"[green]{'━' * filled}[/][dim]{'━' * (60 - filled)}[/]"]
    wt = Table("worker", "provider", "state", "address", "slots", "last seen", "tasks",
               title=f"workers ({len(d['workers'])})")
    for w in d["workers"][:30]:
        wt.add_row(_text(w["name"]), _text(w["provider"]), _text(w["state"]),
                   _text(w["address"] or "-"), f"{w['running']}/{w['slots']}",
                   _ago(w["last_seen"]), _text(", ".join(w["tasks"]), 60))
    parts.append(wt)
    for e in d["worker_errors"]:
        parts.append(f"[red]{e['count']} workers not created:[/] {_text(e['error'])}")
    if d["failures"]:
        ft = Table("task", "attempt", "when", "exit", "reason", title="latest failures")
        for f in d["failures"]:
            ft.add_row(_text(f["name"]), str(f["number"]), _ago(f["finished_at"]),
                       "-" if f["exit_status"] is None else str(f["exit_status"]),
                       _text(f["reason"], 80))
        parts.append(ft)
    return Group(*parts)


def watch(console: Console, fetch: Callable[[], dict[str, Any]], every: float = 1.0,
          once: bool = False, limit: float = 30 * 24 * 3600.0) -> None:
    """Refresh the dashboard every ``every`` seconds until Ctrl-C (or once)."""
    from rich.live import Live

    rate = Rate()
    if once:
        console.print(dashboard(fetch(), None))
        return
    deadline = time.monotonic() + limit
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while time.monotonic() < deadline:
            d = fetch()
            counts = d["tasks"]
            done = sum(counts.values()) - _left(counts)
            live.update(dashboard(d, rate.add(time.monotonic(), done)), refresh=True)
            time.sleep(every)


def event_line(e: dict[str, Any]) -> str:
    """One event as a log line: time, routing key, task, worker, data."""
    when = time.strftime("%H:%M:%S", time.localtime(e["ts"])) + f".{int(e['ts'] % 1 * 1000):03d}"
    who = []
    if e.get("task"):
        who.append(f"task={e['task']}")
    if e.get("attempt_id"):
        who.append(f"attempt={e['attempt_id']}")
    if e.get("worker_id"):
        who.append(f"worker={e['worker_id']}")
    data = json.dumps(e["data"], sort_keys=True) if e["data"] else ""
    return " ".join([when, e["key"], *who, data]).rstrip()
