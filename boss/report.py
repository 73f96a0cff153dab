"""``boss report``: one self-contained HTML page about a run.

:func:`report_data` reads what the page needs through the boss's store
(boss/store/report_reads.py) into plain dataclasses; :func:`render_report`
turns them into HTML and is pure, so it is tested without a database.

The page has no script, no font and no request of its own: inline CSS and a
hand-written SVG timeline (a few hundred bytes per attempt; a charting
library would weigh megabytes). Every string that came from a user or a
worker (task names, reasons, stderr) is HTML-escaped where it is written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from html import escape
from typing import TYPE_CHECKING, Any

from boss import cost
from boss.store import reads
from boss.store import report_reads as rr

if TYPE_CHECKING:
    from boss.service import Boss

MAX_BARS = 20_000  # ~400 bytes each with its tooltip: a capped page stays under 8 MB
MAX_FAILURES = 200
MAX_WORKERS = 1_000
SLOWEST = 10
STDERR_LINES = 10


@dataclass(frozen=True)
class Summary:
    generated_at: float
    database: str
    currency: str
    tasks: dict[str, int]
    total_tasks: int
    tasks_run: int
    attempts: dict[str, int]
    total_attempts: int
    first_start: float | None
    last_end: float | None
    makespan: float
    workers: int
    vm_seconds: float
    cost: float  # of the priced workers; see unpriced_workers
    unpriced_workers: int
    busy_seconds: float
    attempt_cost: float
    cost_per_task: float | None  # attempt cost / tasks that ran
    bars_shown: int
    failures_total: int


@dataclass(frozen=True)
class WorkerLine:
    id: int
    name: str
    provider: str
    state: str
    slots: int
    attempts: int
    vm_seconds: float
    per_hour: float | None
    cost: float | None


@dataclass(frozen=True)
class Bar:
    """One attempt on the timeline; ``end`` is the report's time for a running one."""

    attempt_id: int
    task: str
    number: int
    worker_id: int | None
    state: str
    start: float
    end: float
    exit_status: int | None
    reason: str | None
    stage_in: float | None
    stage_out: float | None
    wall: float | None


@dataclass(frozen=True)
class Failure:
    task: str
    number: int
    state: str
    worker: str
    finished_at: float | None
    exit_status: int | None
    reason: str | None
    stderr_tail: str | None


@dataclass(frozen=True)
class SlowTask:
    name: str
    state: str
    attempts: int
    longest: float
    total: float
    cost: float | None


@dataclass(frozen=True)
class ReportData:
    summary: Summary
    workers: list[WorkerLine]
    bars: list[Bar]
    failures: list[Failure]
    slowest: list[SlowTask]


def summary_json(data: ReportData) -> dict[str, Any]:
    """The numbers of the summary, for ``boss report --json``."""
    return asdict(data.summary)


# --- loading ---------------------------------------------------------------


def report_data(boss: Boss, now: float | None = None, max_bars: int = MAX_BARS) -> ReportData:
    """Read everything the report shows, in one read-only transaction."""
    now = time.time() if now is None else now
    with boss.store.ro() as conn:
        counts = reads.task_counts(conn)
        worker_rows = rr.workers(conn)
        totals = rr.attempt_totals(conn, now)
        by_state = rr.attempts_by_state(conn)
        busy = rr.busy_by_worker(conn, now)
        per_worker = rr.attempts_by_worker(conn)
        recent = rr.recent_attempts(conn, max_bars)
        failed, failures_total = rr.failures(conn, MAX_FAILURES)
        slow = rr.slowest_tasks(conn, now, SLOWEST)
        slow_busy = rr.busy_by_task_worker(conn, [s["id"] for s in slow], now)
    lines = _worker_lines(worker_rows, per_worker, boss, now)
    prices = {w.id: w.per_hour for w in lines}
    names = {w.id: w.name for w in lines}
    attempt_cost, _ = cost.busy_cost(busy, prices)
    summary = Summary(
        generated_at=now,
        database=boss.store.engine.url.render_as_string(hide_password=True),
        currency=boss.settings.cost.currency,
        tasks=counts, total_tasks=sum(counts.values()), tasks_run=totals["tasks_run"],
        attempts=by_state, total_attempts=totals["count"],
        first_start=totals["first_start"], last_end=totals["last_end"],
        makespan=_span(totals["first_start"], totals["last_end"]),
        workers=len(lines), vm_seconds=sum(w.vm_seconds for w in lines),
        cost=sum(w.cost for w in lines if w.cost is not None),
        unpriced_workers=sum(1 for w in lines if w.per_hour is None),
        busy_seconds=sum(busy.values()), attempt_cost=attempt_cost,
        cost_per_task=attempt_cost / totals["tasks_run"] if totals["tasks_run"] else None,
        bars_shown=len(recent), failures_total=failures_total,
    )
    return ReportData(
        summary=summary, workers=lines[:MAX_WORKERS],
        bars=[_bar(r, now) for r in recent],
        failures=[_failure(r, names) for r in failed],
        slowest=[_slow(r, slow_busy.get(r["id"], {}), prices) for r in slow],
    )


def _span(first: float | None, last: float | None) -> float:
    return max(0.0, last - first) if first is not None and last is not None else 0.0


def _worker_lines(rows: list[dict[str, Any]], per_worker: dict[int | None, int], boss: Boss,
                  now: float) -> list[WorkerLine]:
    usage = [cost.WorkerUsage(r["id"], r["provider"], r["state"], r["created_at"],
                              r["last_seen"]) for r in rows]
    costs = cost.worker_costs(usage, boss.settings, now)
    return [WorkerLine(r["id"], r["name"], r["provider"], r["state"], r["slots"],
                       per_worker.get(r["id"], 0), c.seconds, c.per_hour, c.cost)
            for r, c in zip(rows, costs, strict=True)]


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) and value >= 0 else None


def _bar(r: dict[str, Any], now: float) -> Bar:
    m = r["metrics"]
    return Bar(r["id"], r["task"], r["number"], r["worker_id"], r["state"], r["started_at"],
               r["finished_at"] if r["finished_at"] is not None else max(now, r["started_at"]),
               r["exit_status"], r["reason"], _metric(m, "stage_in_seconds"),
               _metric(m, "stage_out_seconds"), _metric(m, "wall"))


def _failure(r: dict[str, Any], names: dict[int, str]) -> Failure:
    worker = names.get(r["worker_id"], "-") if r["worker_id"] is not None else "-"
    return Failure(r["task"], r["number"], r["state"], worker, r["finished_at"],
                   r["exit_status"], r["reason"], r["stderr_tail"])


def _slow(r: dict[str, Any], busy: dict[int | None, float],
          prices: dict[int, float | None]) -> SlowTask:
    priced, unpriced = cost.busy_cost(busy, prices)
    return SlowTask(r["name"], r["state"], int(r["attempts"]), float(r["longest"]),
                    float(r["total"]), None if unpriced else priced)


# --- lanes -----------------------------------------------------------------


def pack_lanes(spans: Sequence[tuple[float, float]]) -> list[int]:
    """A lane for each (start, end): in order of start, the first lane free by then.

    The attempts table does not say which slot ran an attempt, so this
    rebuilds one. First fit in start order uses as many lanes as the most
    spans open at one instant, so a worker that ran at most ``slots``
    attempts at once gets at most ``slots`` lanes; more overlap (a worker
    whose slots changed, a lost attempt ended at the reaper's time) gets
    extra lanes rather than bars drawn over each other.
    """
    order = sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1]))
    lane_end: list[float] = []
    out = [0] * len(spans)
    for i in order:
        start, end = spans[i]
        lane = next((k for k, free in enumerate(lane_end) if free <= start), len(lane_end))
        if lane == len(lane_end):
            lane_end.append(end)
        lane_end[lane] = end
        out[i] = lane
    return out


# --- rendering -------------------------------------------------------------

STATE_COLOURS = {
    "succeeded": "#2e9d5b", "failed": "#d64541", "timeout": "#e8842c", "lost": "#8e6bbf",
    "cancelled": "#9a9a9a", "running": "#3b82d6",
}
LABEL_W, PLOT_W, AXIS_H, PAD = 200, 1000, 26, 12
TICK_STEPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900,
              1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800)

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta,.note{color:#666;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start;margin:8px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:18px}
table{border-collapse:collapse;font-size:13px}
td,th{border-bottom:1px solid #e4e4e4;padding:3px 8px;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
pre{margin:0;max-width:640px;white-space:pre-wrap;font-size:12px;color:#444}
.sw{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:-1px}
svg{display:block;border:1px solid #ddd;background:#fff}
svg text{font:11px system-ui,sans-serif;fill:#333}
.band{fill:#f5f6f8}.grid{stroke:#ddd}.sep{stroke:#bbb}
.x{stroke:none}g.b:hover .x{stroke:#000;stroke-width:1}
.si{fill:#fff;fill-opacity:.55}.so{fill:#000;fill-opacity:.35}
"""


def _colour_css() -> str:
    rules = [f"g.s-{s}>.x{{fill:{c}}}" for s, c in STATE_COLOURS.items()]
    return "\n".join([*rules, "g.s-other>.x{fill:#555}"])


def _state_class(state: str) -> str:
    return state if state in STATE_COLOURS else "other"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def fmt_money(x: float | None, currency: str) -> str:
    if x is None:
        return "unknown"
    if x == 0 or x >= 1:
        return f"{x:,.2f} {currency}"
    # short runs cost fractions of a cent: keep two significant digits, not 0.00
    decimals = min(8, max(2, 1 - math.floor(math.log10(x))))
    return f"{x:.{decimals}f} {currency}"


def render_report(data: ReportData) -> str:
    """The whole page, as one HTML string."""
    s = data.summary
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>ecloud report</title><style>", CSS, _colour_css(), "</style></head><body>",
        f"<h1>ecloud report</h1><p class=\"meta\">generated {fmt_time(s.generated_at)} "
        f"from {escape(s.database)}</p>",
        _summary_html(s),
        _gantt_html(data),
        _workers_html(data),
        _failures_html(data),
        _slowest_html(data),
        "</body></html>\n",
    ])


def _card(label: str, value: str) -> str:
    return f"<div class=\"card\">{escape(label)}<b>{escape(value)}</b></div>"


def _summary_html(s: Summary) -> str:
    cur = s.currency
    cards = [
        _card("tasks", str(s.total_tasks)), _card("attempts", str(s.total_attempts)),
        _card("makespan", fmt_seconds(s.makespan)), _card("workers", str(s.workers)),
        _card("VM time", fmt_seconds(s.vm_seconds)), _card("cost", fmt_money(s.cost, cur)),
        _card("attempt time (all slots)", fmt_seconds(s.busy_seconds)),
        _card("cost of attempts", fmt_money(s.attempt_cost, cur)),
        _card("average cost per task", fmt_money(s.cost_per_task, cur)),
    ]
    tasks = "".join(f"<tr><td>{escape(k)}</td><td class=\"n\">{v}</td></tr>"
                    for k, v in s.tasks.items())
    attempts = "".join(f"<tr><td>{escape(k)}</td><td class=\"n\">{v}</td></tr>"
                       for k, v in sorted(s.attempts.items()))
    notes = [f"first attempt started {fmt_time(s.first_start)}, last ended "
             f"{fmt_time(s.last_end)}. Cost: VM time from each worker's creation to its "
             "end (or now) times its price per hour ([cost] settings); a task costs its "
             "attempts' seconds times their worker's price."]
    if s.unpriced_workers:
        notes.append(f"{s.unpriced_workers} worker(s) have no price in [cost] and are left "
                     "out of the cost.")
    return ("<h2>Summary</h2><div class=\"cards\">" + "".join(cards) + "</div>"
            + "".join(f"<p class=\"note\">{escape(n)}</p>" for n in notes)
            + "<div class=\"cards\"><table><tr><th>task state</th><th class=\"n\">tasks</th>"
            + f"</tr>{tasks}</table><table><tr><th>attempt outcome</th>"
            + f"<th class=\"n\">attempts</th></tr>{attempts}</table></div>")


def _tick_step(span: float) -> float:
    want = span / 8
    step = next((t for t in TICK_STEPS if t >= want), None)
    return step if step is not None else 604800 * (int(want // 604800) + 1)


def _row_height(lanes: int) -> float:
    # keep the picture near 3,000 px tall however many lanes there are
    return 16.0 if lanes <= 180 else max(2.0, 3000.0 / lanes)


def _lanes(data: ReportData) -> tuple[list[tuple[str, int, int]], dict[int, int]]:
    """Workers' lane blocks (label, first lane, lane count) and each bar's lane."""
    names = {w.id: f"{w.name} ({w.provider})" for w in data.workers}
    groups: dict[int | None, list[Bar]] = {}
    for b in data.bars:
        groups.setdefault(b.worker_id, []).append(b)
    blocks: list[tuple[str, int, int]] = []
    lane_of: dict[int, int] = {}
    first = 0
    for wid in sorted(groups, key=lambda w: (w is None, w or 0)):
        bars = groups[wid]
        lanes = pack_lanes([(b.start, b.end) for b in bars])
        for b, lane in zip(bars, lanes, strict=True):
            lane_of[b.attempt_id] = first + lane
        label = "(no worker)" if wid is None else names.get(wid, f"worker {wid}")
        count = max(lanes) + 1
        blocks.append((label, first, count))
        first += count
    return blocks, lane_of


def _gantt_html(data: ReportData) -> str:
    s = data.summary
    head = "<h2>Timeline</h2>"
    if not data.bars:
        return head + "<p>No attempts yet.</p>"
    legend = "".join(f"<span class=\"sw\" style=\"background:{c}\"></span>{k}"
                     for k, c in STATE_COLOURS.items())
    legend += ("<span class=\"sw\" style=\"background:#2e9d5b;opacity:.45\"></span>stage in "
               "(lighter, at the start)<span class=\"sw\" style=\"background:#1b5e36\"></span>"
               "stage out (darker, at the end)")
    note = (f"<p class=\"note\">One lane per worker slot; hover a bar for its details. "
            f"Times are seconds since the first attempt shown started "
            f"({fmt_time(data.bars[0].start if data.bars else None)}).</p>")
    if s.bars_shown < s.total_attempts:
        note += (f"<p class=\"note\">Showing the {s.bars_shown:,} most recent attempts of "
                 f"{s.total_attempts:,}: the timeline is capped to keep the page light.</p>")
    return head + f"<p>{legend}</p>" + note + _svg(data)


def _svg(data: ReportData) -> str:
    blocks, lane_of = _lanes(data)
    lanes = sum(n for _, _, n in blocks)
    row_h = _row_height(lanes)
    t0 = min(b.start for b in data.bars)
    span = max(max(b.end for b in data.bars) - t0, 1e-3)
    width, height = LABEL_W + PLOT_W + PAD, AXIS_H + lanes * row_h + PAD
    scale = PLOT_W / span
    out = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" "
           f"height=\"{height:.0f}\" viewBox=\"0 0 {width} {height:.0f}\">"]
    out += _blocks_svg(blocks, row_h, width)
    out += _axis_svg(span, height)
    names = {w.id: w.name for w in data.workers}
    for b in data.bars:
        y = AXIS_H + lane_of[b.attempt_id] * row_h
        out.append(_bar_svg(b, LABEL_W + (b.start - t0) * scale, y, scale, row_h,
                            "-" if b.worker_id is None else names.get(b.worker_id, "-"), t0))
    out.append("</svg>")
    return "".join(out)


def _blocks_svg(blocks: list[tuple[str, int, int]], row_h: float, width: int) -> list[str]:
    out = []
    for i, (label, first, count) in enumerate(blocks):
        y, h = AXIS_H + first * row_h, count * row_h
        if i % 2:
            out.append(f"<rect class=\"band\" x=\"0\" y=\"{y:.1f}\" width=\"{width}\" "
                       f"height=\"{h:.1f}\"/>")
        out.append(f"<line class=\"sep\" x1=\"0\" x2=\"{width}\" y1=\"{y:.1f}\" "
                   f"y2=\"{y:.1f}\"/>")
        if h >= 10:
            short = label if len(label) <= 30 else label[:29] + "\u2026"
            out.append(f"<text x=\"4\" y=\"{y + min(h, row_h) / 2 + 4:.1f}\">"
                       f"<title>{escape(label)}</title>{escape(short)}</text>")
    return out


def _axis_svg(span: float, height: float) -> list[str]:
    step = _tick_step(span)
    out = []
    for k in range(int(span // step) + 1):
        x = LABEL_W + k * step * PLOT_W / span
        out.append(f"<line class=\"grid\" x1=\"{x:.1f}\" x2=\"{x:.1f}\" y1=\"{AXIS_H - 6}\" "
                   f"y2=\"{height - PAD:.0f}\"/><text x=\"{x + 2:.1f}\" y=\"14\">"
                   f"{escape(_tick_label(k * step))}</text>")
    return out


def _tick_label(t: float) -> str:
    if t < 60:
        return f"{t:g} s"
    if t < 3600:
        return f"{t / 60:g} min"
    return f"{t / 3600:g} h"


def _tooltip(b: Bar, worker: str, t0: float) -> str:
    lines = [f"{b.task} \u2014 attempt {b.number}", f"worker {worker}",
             b.state + ("" if b.exit_status is None else f", exit status {b.exit_status}"),
             f"started {fmt_time(b.start)} (+{b.start - t0:.2f} s), "
             f"lasted {fmt_seconds(b.end - b.start)}"]
    if b.stage_in is not None or b.stage_out is not None or b.wall is not None:
        lines.append(f"stage in {fmt_seconds(b.stage_in)}, run {fmt_seconds(b.wall)}, "
                     f"stage out {fmt_seconds(b.stage_out)}")
    if b.reason:
        lines.append(f"reason: {b.reason[:300]}")
    return escape("\n".join(lines))


def _bar_svg(b: Bar, x: float, y: float, scale: float, row_h: float, worker: str,
             t0: float) -> str:
    # at least a pixel wide, so that instant attempts are still seen and hovered
    w = max((b.end - b.start) * scale, 1.0)
    h = max(row_h - 2, 1.0)
    si = min((b.stage_in or 0.0) * scale, w)
    so = min((b.stage_out or 0.0) * scale, w - si)
    parts = [f"<g class=\"b s-{_state_class(b.state)}\" data-attempt=\"{b.attempt_id}\">"
             f"<title>{_tooltip(b, worker, t0)}</title>"
             f"<rect class=\"x\" x=\"{x:.1f}\" y=\"{y + 1:.1f}\" width=\"{w:.1f}\" "
             f"height=\"{h:.1f}\"/>"]
    if si >= 0.5:
        parts.append(f"<rect class=\"si\" x=\"{x:.1f}\" y=\"{y + 1:.1f}\" width=\"{si:.1f}\" "
                     f"height=\"{h:.1f}\"/>")
    if so >= 0.5:
        parts.append(f"<rect class=\"so\" x=\"{x + w - so:.1f}\" y=\"{y + 1:.1f}\" "
                     f"width=\"{so:.1f}\" height=\"{h:.1f}\"/>")
    parts.append("</g>")
    return "".join(parts)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    """A table from already-escaped cells; columns in ``numeric`` align right."""
    def cls(i: int) -> str:
        return " class=\"n\"" if i in numeric else ""
    th = "".join(f"<th{cls(i)}>{escape(h)}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _workers_html(data: ReportData) -> str:
    cur = data.summary.currency
    rows = [[escape(w.name), escape(w.provider), escape(w.state), str(w.slots),
             str(w.attempts), fmt_seconds(w.vm_seconds), fmt_money(w.per_hour, cur),
             fmt_money(w.cost, cur)] for w in data.workers]
    more = ""
    if data.summary.workers > len(data.workers):
        more = f"<p class=\"note\">The first {len(data.workers):,} workers are listed.</p>"
    return ("<h2>Workers</h2>" + _table(
        ["worker", "provider", "state", "slots", "attempts", "VM time", "price / hour",
         "cost"], rows, {3, 4, 5, 6, 7}) + more)


def _stderr(tail: str | None) -> str:
    lines = (tail or "").rstrip("\n").splitlines()[-STDERR_LINES:]
    return f"<pre>{escape(chr(10).join(lines)[-2000:])}</pre>" if lines else ""


def _failures_html(data: ReportData) -> str:
    head = "<h2>Failures</h2>"
    if not data.failures:
        return head + "<p>No failed, timed out or lost attempt.</p>"
    rows = [[escape(f.task), str(f.number), escape(f.state), escape(f.worker),
             fmt_time(f.finished_at), "-" if f.exit_status is None else str(f.exit_status),
             escape(f.reason or ""), _stderr(f.stderr_tail)] for f in data.failures]
    more = ""
    if data.summary.failures_total > len(data.failures):
        more = (f"<p class=\"note\">The latest {len(data.failures):,} of "
                f"{data.summary.failures_total:,} failed attempts are listed.</p>")
    return head + _table(["task", "attempt", "outcome", "worker", "ended", "exit status",
                          "reason", "last lines of stderr"], rows, {1, 5}) + more


def _slowest_html(data: ReportData) -> str:
    head = f"<h2>Slowest {SLOWEST} tasks</h2>"
    if not data.slowest:
        return head + "<p>No attempts yet.</p>"
    cur = data.summary.currency
    rows = [[escape(t.name), escape(t.state), str(t.attempts), fmt_seconds(t.longest),
             fmt_seconds(t.total), fmt_money(t.cost, cur)] for t in data.slowest]
    return head + _table(["task", "state", "attempts", "longest attempt", "all attempts",
                          "cost"], rows, {2, 3, 4, 5})
