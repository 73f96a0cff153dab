"""`boss import-wfcommons`: the small BLAST instance imported, pushed and run to the end.

The instance is read from the shared workflows directory beside the repository
(``../shared/workflows``; CI has the same layout); without it the test skips
and says why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.helpers import Cli, write_settings

WORKFLOWS = Path(__file__).resolve().parents[2].parent / "shared" / "workflows"
BLAST = WORKFLOWS / "blast-chameleon-small-001.json"
PREFIX = "blast-chameleon-small-001"


@pytest.fixture
def blast() -> dict[str, object]:
    if not BLAST.is_file():
        pytest.skip(f"no {BLAST.name} in {WORKFLOWS} (the shared workflows directory "
                    "beside the repository; CI has the same layout)")
    data: dict[str, object] = json.loads(BLAST.read_text())
    return data


def test_import_blast_then_run_it(cli: Cli, tmp_path: Path, blast: dict[str, object]) -> None:
    tasks = blast["workflow"]["tasks"]  # type: ignore[index]
    scale = 0.0001
    files = {f["name"]: f["sizeInBytes"] for t in tasks for f in t["files"]}
    written = {f["name"] for t in tasks for f in t["files"] if f["link"] == "output"}
    inputs = {name: round(size * scale) for name, size in files.items() if name not in written}
    data = tmp_path / "data" / "wf" / PREFIX

    # before `boss init`: refused, and no input written for a push that cannot happen
    refused = cli.run("import-wfcommons", str(BLAST), "--size-scale", str(scale))
    assert refused.code == 1 and "boss init" in refused.stderr, str(refused)
    assert not data.exists()

    cli.ok("init")
    ran = cli.ok("import-wfcommons", str(BLAST), "--time-scale", "0.001",
                 "--size-scale", str(scale), "--slots", "4", "--json")
    got = json.loads(ran.stdout)
    assert (got["pushed"], got["ready"], got["edges"]) == (len(tasks), 1, 120)
    assert (got["inputs"], got["inputs_created"]) == (5, 5)
    assert got["input_bytes_written"] == sum(inputs.values())
    runtimes = [t["runtimeInSeconds"] * 0.001 for t in tasks]
    assert got["total_work_seconds"] == pytest.approx(sum(runtimes), rel=1e-4)
    assert got["lower_bound_seconds"] == pytest.approx(
        max(got["critical_path_seconds"], sum(runtimes) / 4), rel=1e-4)
    assert f"pushed {len(tasks)} tasks" in ran.stderr
    # the workflow's inputs are in the datastore at their scaled sizes
    assert {p.name: p.stat().st_size for p in data.iterdir()} == inputs
    assert inputs["nt"] == 511243  # BLAST's 5 GB database, scaled

    # again: refused (names exist) and nothing pushed; the error names the instance
    again = cli.run("import-wfcommons", str(BLAST), "--size-scale", str(scale))
    assert again.code == 2
    assert f"error: {BLAST} (as {PREFIX}/...): nothing was pushed" in again.stderr
    # --skip-existing pushes nothing new; a damaged input is written again
    (data / "nt").write_bytes(b"short")
    skip = json.loads(cli.ok("import-wfcommons", str(BLAST), "--size-scale", str(scale),
                             "--skip-existing", "--json").stdout)
    assert (skip["pushed"], skip["skipped"], skip["inputs_created"]) == (0, len(tasks), 1)
    assert (data / "nt").stat().st_size == inputs["nt"]

    # a file in no supported format: exit 2, named, nothing pushed
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"name": "x", "schemaVersion": "1.3", "workflow": {"jobs": []}}))
    bad = cli.run("import-wfcommons", str(old))
    assert bad.code == 2
    assert f"error: {old}: schemaVersion '1.3' is not supported" in bad.stderr

    # run it: a last task after the workflow's two final ones, on 4 local slots
    check = tmp_path / "check.json"
    check.write_text(json.dumps([{"name": "check", "after": [f"{PREFIX}/cat_ID000043",
                                                              f"{PREFIX}/cat_blast_ID000042"],
                                  "commands": [{"command": ["true"]}]}]))
    done = cli.ok("run", str(check), "--workers", "1", "--slots", "4")
    assert json.loads(done.stdout)["tasks"] == {"succeeded": len(tasks) + 1}
    # every output flowed through the datastore at its exact scaled size
    outputs = {name: round(files[name] * scale) for name in written}
    on_disk = {p.name: p.stat().st_size for p in data.iterdir()}
    assert on_disk == {**inputs, **outputs}


def test_import_without_inputs(tmp_path: Path, blast: dict[str, object]) -> None:
    cli = Cli(tmp_path, write_settings(tmp_path))
    cli.ok("init")
    got = json.loads(cli.ok("import-wfcommons", str(BLAST), "--size-scale", "0.0001",
                            "--no-inputs", "--prefix", "b2", "--json").stdout)
    assert (got["pushed"], got["inputs_created"], got["prefix"]) == (43, 0, "b2")
    assert not (tmp_path / "data" / "wf").exists()
    shown = json.loads(cli.ok("show", "b2/split_fasta_ID000001", "--json").stdout)
    assert shown["state"] == "ready"
