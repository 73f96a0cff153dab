"""boss report: a run built through the service, its numbers checked against the
database, its page parsed, its CLI called, and its page drawn by Chromium."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from boss import report
from boss import service as service_module
from boss import transitions as transitions_module
from boss.cli import app
from boss.errors import UserError
from boss.models import Attempt, Worker
from boss.service import Boss
from protocol.console import run as run_cli
from protocol.errors import SettingsError
from protocol.messages import Result

EVIL_STDERR = "reading input\n<script>alert('x')</script> & done\n"
NOW = 2000.0  # the report's "now": long after the run below ended


class Clock:
    """Stands in for the ``time`` module in boss.service and boss.transitions: the run's
    times are ours."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def _push(b: Boss, tmp_path: Path, docs: list[dict[str, Any]]) -> None:
    f = tmp_path / "run.jsonl"
    f.write_text("".join(json.dumps(d) + "\n" for d in docs))
    b.push(f)


def _ok(attempt_id: int, stage_in: float, wall: float, stage_out: float) -> Result:
    return Result(attempt_id, "succeeded", exit_status=0, metrics={
        "stage_in_seconds": stage_in, "wall": wall, "stage_out_seconds": stage_out})


def _claim_one(b: Boss, worker_id: int, name: str) -> int:
    (got,) = b.claim(worker_id, 1)
    assert got.name == name
    return got.attempt_id


@pytest.fixture
def ran(boss: Boss, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A small run with a success, a failure then a retry, and a lost attempt.

    Timeline (seconds): workers made at 1000; w1 (local, 2 slots) runs prep
    1010-1030 and flaky#1 1010-1030 (fails), then flaky#2 1031-1060 and slow
    1031-1090, then vanish#2 1061-1090; w2 (gce, 1 slot) takes vanish#1 at 1012
    and is declared lost at 1050. w1 leaves at 1100.
    """
    clock = Clock(1000.0)
    monkeypatch.setattr(service_module, "time", clock)
    monkeypatch.setattr(transitions_module, "time", clock)
    boss.settings.cost.currency = "EUR"
    boss.settings.cost.local = 0.36
    boss.settings.cost.gce = {"e2-standard-2": 0.072}
    boss.settings.gce.machine_type = "e2-standard-2"
    _push(boss, tmp_path, [
        {"name": "prep", "priority": 9, "commands": [{"command": ["true"]}]},
        {"name": "flaky", "priority": 8, "retries": 1, "commands": [{"command": ["false"]}]},
        {"name": "vanish", "priority": 7, "commands": [{"command": ["true"]}]},
        {"name": "slow", "priority": 6, "commands": [{"command": ["true"]}]},
    ])
    w1 = boss.add_worker("w1", provider="local", slots=2)[0]
    w2 = boss.add_worker("w2", provider="gce", slots=1)[0]
    clock.now = 1010.0
    a = {"prep": _claim_one(boss, w1, "prep"), "flaky1": _claim_one(boss, w1, "flaky")}
    clock.now = 1012.0
    a["vanish1"] = _claim_one(boss, w2, "vanish")
    clock.now = 1030.0
    boss.complete(w1, _ok(a["prep"], 2.0, 15.0, 1.0))
    boss.complete(w1, Result(a["flaky1"], "failed", exit_status=3, reason="exit status 3 <bad>",
                             stderr_tail=EVIL_STDERR))
    clock.now = 1031.0
    a["flaky2"] = _claim_one(boss, w1, "flaky")
    a["slow"] = _claim_one(boss, w1, "slow")
    clock.now = 1050.0
    assert boss.lose_workers([w2]) != []
    clock.now = 1060.0
    boss.complete(w1, _ok(a["flaky2"], 1.0, 25.0, 2.0))
    clock.now = 1061.0
    a["vanish2"] = _claim_one(boss, w1, "vanish")
    clock.now = 1090.0
    boss.complete(w1, _ok(a["slow"], 4.0, 50.0, 4.0))
    boss.complete(w1, _ok(a["vanish2"], 0.5, 28.0, 0.5))
    clock.now = 1100.0
    boss.goodbye(w1)
    return a


def _from_db(b: Boss) -> dict[str, Any]:
    """The figures the report must show, computed here straight from the rows."""
    with b.store.ro() as conn:
        attempts = conn.execute(select(Attempt)).all()
        workers = conn.execute(select(Worker)).all()
    price = {"local": 0.36, "gce": 0.072}
    per_hour = {w.id: price[w.provider] for w in workers}
    busy = [(x.finished_at - x.started_at, x.worker_id) for x in attempts]
    return {
        "attempts": len(attempts),
        "makespan": max(x.finished_at for x in attempts) - min(x.started_at for x in attempts),
        "vm_seconds": sum(w.last_seen - w.created_at for w in workers),
        "cost": sum((w.last_seen - w.created_at) / 3600 * per_hour[w.id] for w in workers),
        "busy_seconds": sum(s for s, _ in busy),
        "attempt_cost": sum(s / 3600 * per_hour[wid] for s, wid in busy),
        "tasks_run": len({x.task_id for x in attempts}),
        "ids": sorted(x.id for x in attempts),
    }


def test_numbers_match_the_database(boss: Boss, ran: dict[str, int]) -> None:
    data = report.report_data(boss, now=NOW)
    s = data.summary
    db = _from_db(boss)
    assert s.tasks["succeeded"] == 4 and s.total_tasks == 4 and s.tasks_run == db["tasks_run"]
    assert s.attempts == {"succeeded": 4, "failed": 1, "lost": 1}
    assert s.total_attempts == db["attempts"] == 6
    assert s.makespan == pytest.approx(db["makespan"]) == 80.0
    # w1: 1000 -> 1100 (goodbye); w2: 1000 -> 1012, its last sign of life before lost
    assert s.vm_seconds == pytest.approx(db["vm_seconds"]) == 112.0
    assert s.cost == pytest.approx(db["cost"]) == pytest.approx(100 / 3600 * 0.36
                                                                + 12 / 3600 * 0.072)
    assert s.busy_seconds == pytest.approx(db["busy_seconds"]) == 195.0
    assert s.attempt_cost == pytest.approx(db["attempt_cost"])
    assert s.cost_per_task == pytest.approx(db["attempt_cost"] / 4)
    assert s.currency == "EUR" and s.unpriced_workers == 0
    assert sorted(b.attempt_id for b in data.bars) == db["ids"]
    assert {(f.task, f.number, f.state) for f in data.failures} == {
        ("flaky", 1, "failed"), ("vanish", 1, "lost")}
    assert [(t.name, t.attempts, t.longest, t.total) for t in data.slowest] == [
        ("slow", 1, 59.0, 59.0), ("vanish", 2, 38.0, 67.0), ("flaky", 2, 29.0, 49.0),
        ("prep", 1, 20.0, 20.0)]
    vanish = data.slowest[1]
    assert vanish.cost == pytest.approx(38 / 3600 * 0.072 + 29 / 3600 * 0.36)


VOID = frozenset({"meta", "br", "img", "input", "link", "hr"})  # HTML elements with no end


class Page(HTMLParser):
    """Collects what the checks need; fails on a closing tag that closes nothing open."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> Page:
    p = Page()
    p.feed(page)
    p.close()
    assert p.stack == [], f"unclosed: {p.stack}"
    return p


def test_page_parses_with_one_bar_per_attempt(boss: Boss, ran: dict[str, int]) -> None:
    page = report.render_report(report.report_data(boss, now=NOW))
    p = _parse(page)
    bars = {int(a["data-attempt"] or 0): a["class"] for t, a in p.tags
            if t == "g" and "data-attempt" in a}
    assert sorted(bars) == sorted(ran.values())
    assert bars[ran["flaky1"]] == "b s-failed" and bars[ran["vanish1"]] == "b s-lost"
    assert bars[ran["slow"]] == "b s-succeeded"
    # stage phases: every finished success has a stage-in and a stage-out part
    assert sum(1 for t, a in p.tags if t == "rect" and a.get("class") == "si") == 4
    assert sum(1 for t, a in p.tags if t == "rect" and a.get("class") == "so") == 4
    # self-contained: no script, no external resource
    assert not any(t in ("script", "link", "img", "iframe") for t, _ in p.tags)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    # stderr and reasons are text, never markup
    text = "".join(p.text)
    assert "<script>alert('x')</script> & done" in text and "exit status 3 <bad>" in text
    titles = [d for d in p.text if d.startswith("flaky \u2014 attempt 1")]
    assert titles and "reason: exit status 3 <bad>" in titles[0]


def test_lanes_follow_slots(boss: Boss, ran: dict[str, int]) -> None:
    page = report.render_report(report.report_data(boss, now=NOW))
    ys: dict[int, float] = {}
    current = None
    for tag, attrs in _parse(page).tags:
        if tag == "g" and "data-attempt" in attrs:
            current = int(attrs["data-attempt"] or 0)
        elif tag == "rect" and attrs.get("class") == "x" and current is not None:
            ys[current] = float(attrs["y"] or 0)
            current = None
    # w1 ran two at once: prep and flaky#1 side by side, flaky#2 and slow side by side
    assert ys[ran["prep"]] != ys[ran["flaky1"]] and ys[ran["flaky2"]] != ys[ran["slow"]]
    w1_lanes = {ys[ran[k]] for k in ("prep", "flaky1", "flaky2", "slow", "vanish2")}
    assert len(w1_lanes) == 2
    assert ys[ran["vanish1"]] not in w1_lanes  # w2 has its own lane


@pytest.mark.parametrize(("spans", "want"), [
    ([], []),
    ([(0, 10)], [0]),
    ([(0, 10), (10, 20)], [0, 0]),                    # touching: same lane
    ([(0, 10), (5, 20), (12, 14)], [0, 1, 0]),
    ([(5, 20), (0, 10), (12, 14)], [1, 0, 0]),        # any input order
    ([(0, 30), (1, 2), (2, 3), (3, 40), (4, 5)], [0, 1, 1, 1, 2]),
])
def test_pack_lanes(spans: list[tuple[float, float]], want: list[int]) -> None:
    assert report.pack_lanes(spans) == want


def test_cap_on_bars_is_said(boss: Boss, ran: dict[str, int]) -> None:
    data = report.report_data(boss, now=NOW, max_bars=3)
    assert [b.attempt_id for b in data.bars] == [ran["flaky2"], ran["slow"], ran["vanish2"]]
    assert data.summary.total_attempts == 6
    page = report.render_report(data)
    assert "Showing the 3 most recent attempts of 6" in page
    assert page.count("data-attempt=") == 3


def test_empty_database(boss: Boss) -> None:
    data = report.report_data(boss, now=NOW)
    assert data.summary.total_attempts == 0 and data.summary.makespan == 0.0
    assert data.summary.cost_per_task is None
    page = report.render_report(data)
    _parse(page)
    assert "No attempts yet." in page


def test_cli_writes_the_file_and_json(boss: Boss, ran: dict[str, int], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    settings = tmp_path / "ecloud.toml"
    settings.write_text(f'[boss]\ndatabase_url = "{boss.settings.boss.database_url}"\n'
                        '[cost]\ncurrency = "EUR"\nlocal = 0.36\n'
                        '[cost.gce]\n"e2-standard-2" = 0.072\n')
    out = tmp_path / "out" / "run.html"
    out.parent.mkdir()
    argv = ["--settings", str(settings), "report", str(out)]
    assert run_cli(app, (UserError, SettingsError), argv, "boss") == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "report written" in captured.err
    assert out.read_text().count("data-attempt=") == 6
    assert run_cli(app, (UserError, SettingsError), [*argv, "--json"], "boss") == 0
    numbers = json.loads(capsys.readouterr().out)
    want = report.summary_json(report.report_data(boss, now=NOW))
    for key in ("total_tasks", "total_attempts", "makespan", "vm_seconds", "cost",
                "busy_seconds", "attempt_cost", "cost_per_task", "attempts"):
        assert numbers[key] == pytest.approx(want[key]), key
    assert run_cli(app, (UserError, SettingsError),
                   ["--settings", str(settings), "report", str(tmp_path / "no" / "x.html")],
                   "boss") == 2


# --- drawn by a real browser ------------------------------------------------


def _png_rows(data: bytes) -> tuple[int, list[bytes]]:
    """Decode an 8-bit RGB(A) PNG with zlib alone: (bytes per pixel, unfiltered rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height, bpp = 8, [], 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), f"PNG depth {depth} colour type {colour}"
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    raw, stride = zlib.decompress(b"".join(idat)), width * bpp
    rows, prev = [], bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        prev = _unfilter(raw[start], bytearray(raw[start + 1:start + 1 + stride]), prev, bpp)
        rows.append(prev)
    return bpp, rows


def _unfilter(kind: int, line: bytearray, prev: bytes, bpp: int) -> bytes:
    if kind == 2:
        return bytes((a + b) & 255 for a, b in zip(line, prev, strict=True))
    for i in range(len(line) if kind else 0):
        a = line[i - bpp] if i >= bpp else 0
        c = prev[i - bpp] if i >= bpp else 0
        if kind == 1:
            line[i] = (line[i] + a) & 255
        elif kind == 3:
            line[i] = (line[i] + ((a + prev[i]) >> 1)) & 255
        elif kind == 4:
            p = a + prev[i] - c
            pa, pb, pc = abs(p - a), abs(p - prev[i]), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else prev[i] if pb <= pc else c)
                       ) & 255
    return bytes(line)


def _count(rows: list[bytes], bpp: int, rgb: str) -> int:
    pixel = bytes.fromhex(rgb.lstrip("#"))
    return sum(1 for row in rows for i in range(0, len(row), bpp) if row[i:i + 3] == pixel)


def test_chromium_draws_the_report(boss: Boss, ran: dict[str, int], tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        why = "chromium is not installed (apt-get install chromium)"
        print(f"\nSKIPPING the Chromium screenshot test: {why}")
        pytest.skip(why)
    page = tmp_path / "report.html"
    page.write_text(report.render_report(report.report_data(boss, now=NOW)))
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1400,1000", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    bpp, rows = _png_rows(shot.read_bytes())
    assert len(rows) == 1000 and len(rows[0]) == 1400 * bpp
    assert len({row[i:i + 3] for row in rows[::50] for i in range(0, len(row), bpp)}) > 10
    # the bars themselves were drawn, not only the legend's 12x12 swatches
    for state in ("succeeded", "failed", "lost"):
        assert _count(rows, bpp, report.STATE_COLOURS[state]) > 1000, state
