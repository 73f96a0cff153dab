"""Every benchmark runs once at its tiny size, so that none of them rots (issue 6).

Each runs as ``benchmarks/run.py NAME --size tiny --json`` in a subprocess, as
a user would; a module that another change adds to benchmarks/ is picked up
by the registry and tested here without an edit. A peer that cannot be
installed here is allowed, as long as its row says why.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import RegistryError, Report, discover, parse, read_module

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"
BOUND = 240.0  # seconds for one tiny run: a bound on waiting, never a speed assertion
REGISTRY = discover()
NOT_AVAILABLE = re.compile(r"^not available: \S.{5,}")
LABELS = {"W", "runs"}  # numbers in a row that are not measured figures
# these start a real sshd (tests/sshd.py)
MARKS = {name: [pytest.mark.sshd] for name in ("tunnel_rtt", "ssh_tunnels", "staging")}


def run_py(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run benchmarks/run.py; past BOUND, SIGTERM it (it cleans up), then kill its group."""
    proc = subprocess.Popen([sys.executable, str(RUN), *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # run.py unwinds: it stops what it started
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        pytest.fail(f"run.py {' '.join(args)} did not finish in {BOUND:.0f} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_report(report: Report) -> None:
    """Every row holds a figure, or says why its contender is not available here."""
    assert report["rows"], "the table has no rows"
    for row in report["rows"]:
        figures = [k for k, v in row.items() if k not in LABELS
                   and isinstance(v, int | float) and not isinstance(v, bool)]
        status = str(row.get("status") or "")
        if status:
            assert NOT_AVAILABLE.match(status), f"row {row} failed: {status}"
            print(f"{row}: {status}")  # shown with -rA / -s: what this machine lacks
        else:
            assert figures, f"row {row} holds no figure"


def test_registry_holds_the_benchmarks() -> None:
    assert {"shell_tasks", "peers", "true_10k", "push_1m", "claim_throughput",
            "tunnel_rtt", "watch_1m"} <= set(REGISTRY)


def test_list_names_every_benchmark(tmp_path: Path) -> None:
    proc = run_py("--list", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == set(REGISTRY)


def test_discovery_reads_the_contract_without_importing(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text(
        '"""A benchmark."""\nimport no_such_module\nNAME = "good"\n'
        'TINY_ARGS = ["--n", "1"]\nREPEATS = True\n\ndef main(argv=None):\n    return 0\n')
    (tmp_path / "helper.py").write_text('NAME = "helper"\n')  # no TINY_ARGS, no main
    found = discover(tmp_path)
    assert list(found) == ["good"]
    assert found["good"].tiny_args == ["--n", "1"] and found["good"].repeats
    assert found["good"].summary == "A benchmark."
    (tmp_path / "again.py").write_text('NAME = "good"\nTINY_ARGS = []\ndef main(argv=None): ...\n')
    with pytest.raises(RegistryError, match="defined by both"):
        discover(tmp_path)
    (tmp_path / "bad.py").write_text('NAME = "x" + "y"\nTINY_ARGS = []\ndef main(a=None): ...\n')
    with pytest.raises(RegistryError, match="must be a literal"):
        read_module(tmp_path / "bad.py")


def test_arguments_pass_through_to_the_benchmark() -> None:
    args, extra = parse(["peers", "--size", "tiny", "--tasks", "5", "--", "--repeat", "2"])
    assert (args.name, args.size, args.repeat) == ("peers", "tiny", None)
    assert extra == ["--tasks", "5", "--repeat", "2"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=MARKS.get(n, []))
                                  for n in sorted(REGISTRY)])
def test_benchmark_runs_at_tiny_size(name: str, tmp_path: Path) -> None:
    proc = run_py(name, "--size", "tiny", "--json", cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-5000:]}"
    doc = json.loads(proc.stdout)
    assert (doc["name"], doc["size"], doc["exit"]) == (name, "tiny", 0)
    assert doc["date"] and doc["commit"] and len(doc["load_average"]) == 3
    for one in doc["runs"]:
        if "report" in one:
            check_report(one["report"])
        else:
            assert re.search(r"\d", one["output"]), f"{name} printed no figure:\n{proc.stderr}"
