"""The ``boss`` commands that show a run: watch, events, logs, why, report, prune-events."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from boss import render
from boss.cli_app import _boss, _json, out
from boss.errors import UserError
from protocol.console import err


def watch(
    ctx: typer.Context,
    every: float = typer.Option(1.0, "--every", min=0.1, help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
) -> None:
    """Live dashboard: progress, rate and ETA, counts, workers and their tasks, failures."""
    boss = _boss(ctx)
    try:
        render.watch(out, boss.dashboard, every, once)
    except KeyboardInterrupt:
        pass


def events(
    ctx: typer.Context,
    task: str | None = typer.Option(None, "--task", help="Only this task's events."),
    since: str | None = typer.Option(None, "--since", help="Only events this recent: "
                                     "SECONDS, or 30s, 10m, 2h, 7d."),
    kind: list[str] = typer.Option([], "--kind", help="Only this kind (repeatable), "
                                   "e.g. job.finished."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events."),
    limit: int = typer.Option(1000, "--limit", min=1, help="At most this many (not "
                              "with --follow)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object a line."),
) -> None:
    """Events of the run (hyperflow's routing keys: job.ID.stage-in.finished, ...)."""
    import time

    boss = _boss(ctx)
    since_ts = time.time() - _seconds(since, "--since") if since else None
    after = 0

    def show(rows: list[dict[str, Any]]) -> None:
        for e in rows:
            out.print(json.dumps(e, sort_keys=True) if as_json else render.event_line(e),
                      markup=False, highlight=False)

    if not follow:
        show(boss.events(0, limit, task, since_ts, kind))
        return
    try:
        for _ in range(10**9):  # until Ctrl-C
            rows = boss.events(after, 1000, task, since_ts, kind)
            show(rows)
            if rows:
                after = rows[-1]["id"]
            else:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass


def logs(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task name."),
    attempt: int | None = typer.Option(None, "--attempt", min=1,
                                       help="Attempt number (default: the last)."),
    stderr: bool = typer.Option(False, "--stderr", help="Standard error, not output."),
) -> None:
    """Print a task's captured output (from the datastore; its tail when unreachable)."""
    got = _boss(ctx).logs(task, attempt, "stderr" if stderr else "stdout")
    if got.note:
        err.print(f"{got.note}; showing the last bytes kept in the database", markup=False)
    for title, text in got.parts:
        if len(got.parts) > 1:
            err.print(f"==> {task} attempt {got.attempt} {title} <==", markup=False)
        sys.stdout.write(text)
    sys.stdout.flush()
    if not got.parts:
        err.print(f"attempt {got.attempt} of {task} wrote nothing to {got.stream}",
                  markup=False)


def why(ctx: typer.Context, task: str = typer.Argument(..., help="Task name."),
        as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Why a task waits, why it is not running, why it ran again."""
    answer = _boss(ctx).why(task)
    if as_json:
        _json(answer)
        return
    out.print(f"{task}: " + answer["because"][0], markup=False)
    for line in answer["because"][1:]:
        out.print(line, markup=False)


def _seconds(value: str, option: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (value[:-1], value[-1]) if value[-1:] in units else (value, "s")
    try:
        return float(number) * units[unit]
    except ValueError:
        raise UserError(f"{option} {value!r}: write SECONDS or a number with s, m, h or d "
                        "(e.g. 10m)") from None


def prune_events(ctx: typer.Context, older_than: str = typer.Argument(
        ..., help="Age: SECONDS, or 30s, 10m, 2h, 7d.")) -> None:
    """Delete events older than this (the events table stays small)."""
    import time

    n = _boss(ctx).prune_events(time.time() - _seconds(older_than, "AGE"))
    out.print(n)
    err.print(f"deleted {n} events older than {older_than}", markup=False)


def report(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="The HTML file to write (e.g. run.html)."),
    as_json: bool = typer.Option(False, "--json",
                                 help="Print the summary's numbers as JSON, not the path."),
) -> None:
    """Write a self-contained HTML report: counts, makespan, cost, a timeline of the
    attempts per worker slot, failures and the slowest tasks."""
    from boss import report as reporting

    data = reporting.report_data(_boss(ctx))
    page = reporting.render_report(data)
    # written beside the target then renamed: a reader never sees half a page
    partial = file.with_name(file.name + ".partial")
    try:
        partial.write_text(page, encoding="utf-8")
        partial.replace(file)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise UserError(f"cannot write the report {file}: {exc.strerror or exc}") from exc
    if as_json:
        _json(reporting.summary_json(data))
    else:
        out.print(str(file), markup=False)
    s = data.summary
    err.print(f"report written to {file}: {s.total_tasks} tasks, {s.total_attempts} attempts, "
              f"cost {reporting.fmt_money(s.cost, s.currency)}", markup=False)


def register(app: typer.Typer) -> None:
    """Add the commands that show a run to the ``boss`` app."""
    app.command()(watch)
    app.command()(events)
    app.command()(logs)
    app.command()(why)
    app.command("report")(report)


def register_admin(admin: typer.Typer) -> None:
    """Add the ``boss admin`` commands about events."""
    admin.command("prune-events")(prune_events)
