"""WfCommons instances as task graphs: reading, converting, the bounds (boss.wfcommons).

The real instances are read from the shared workflows directory beside the
repository (``../shared/workflows``; CI has the same layout); without it
those tests skip and say why. The rest use tiny hand-written instances.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from boss import push, wfcommons
from boss.wfcommons import WfCommonsError
from protocol.document import validate

WORKFLOWS = Path(__file__).resolve().parents[2].parent / "shared" / "workflows"
INSTANCES = sorted(WORKFLOWS.glob("*.json")) if WORKFLOWS.is_dir() else []
needs_instances = pytest.mark.skipif(
    not INSTANCES, reason=f"no WfCommons instances at {WORKFLOWS} (the shared workflows "
    "directory beside the repository; CI has the same layout)")


def task(name: str, runtime: float, parents: list[str], inputs: dict[str, int],
         outputs: dict[str, int], children: list[str] | None = None) -> dict[str, Any]:
    files = ([{"link": "input", "name": f, "sizeInBytes": n} for f, n in inputs.items()]
             + [{"link": "output", "name": f, "sizeInBytes": n} for f, n in outputs.items()])
    t: dict[str, Any] = {"name": name, "type": "compute", "runtimeInSeconds": runtime,
                         "parents": parents, "files": files}
    if children is not None:
        t["children"] = children
    return t


def tiny() -> dict[str, Any]:
    """a -> (b, c) -> d by data, and e after a with no shared file (schemaVersion 1.4)."""
    return {"name": "tiny", "schemaVersion": "1.4", "workflow": {"makespanInSeconds": 9,
            "tasks": [
                task("a", 1.0, [], {"in.txt": 100, "tool": 7}, {"x": 10, "y": 20},
                     ["b", "c", "e"]),
                task("b", 2.0, ["a"], {"x": 10, "tool": 7}, {"bx": 30}, ["d"]),
                task("c", 3.0, ["a"], {"y": 20}, {"cy": 0}, ["d"]),
                task("d", 1.0, ["b", "c"], {"bx": 30, "cy": 0}, {"out/d.txt": 5}, []),
                task("e", 0.5, ["a"], {}, {"e.log": 1}, []),
            ]}}


def tiny_v15() -> dict[str, Any]:
    """The same workflow in the schemaVersion 1.5 layout (ids, specification, execution)."""
    old = tiny()["workflow"]["tasks"]
    sizes = {f["name"]: f["sizeInBytes"] for t in old for f in t["files"]}
    return {"name": "tiny", "schemaVersion": "1.5", "workflow": {
        "specification": {
            "tasks": [{"name": "prog", "id": t["name"], "parents": t["parents"],
                       "children": t["children"],
                       "inputFiles": [f["name"] for f in t["files"] if f["link"] == "input"],
                       "outputFiles": [f["name"] for f in t["files"]
                                       if f["link"] == "output"]} for t in old],
            "files": [{"id": f, "sizeInBytes": n} for f, n in sizes.items()]},
        "execution": {"makespanInSeconds": 9, "executedAt": "2026-11-23T00:00:00Z",
                      "tasks": [{"id": t["name"], "runtimeInSeconds": t["runtimeInSeconds"]}
                                for t in old]}}}


def by_name(conv: wfcommons.Conversion) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in conv.documents}


def planned_parents(conv: wfcommons.Conversion, tmp_path: Path) -> dict[str, set[str]]:
    """The dependencies the boss's push derives from the documents (data and ``after``)."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in conv.documents))
    p = push.plan(path)
    return {p.names[i]: {p.names[j] for j in p.parents_of(i)} | set(p.after.get(i, []))
            for i in range(len(p))}


# --- the real instances ------------------------------------------------------------------

@needs_instances
@pytest.mark.parametrize("path", INSTANCES, ids=[p.stem for p in INSTANCES])
def test_instance_converts_with_its_edges(path: Path, tmp_path: Path) -> None:
    raw = json.loads(path.read_text())
    tasks = raw["workflow"]["tasks"]
    conv = wfcommons.convert(wfcommons.load(path), time_scale=0.01, size_scale=1e-6,
                             prefix="p")
    assert len(conv.documents) == len(tasks)
    for doc in conv.documents:
        _, problems = validate(doc, doc["name"])
        assert problems == []
    # the boss finds every recorded parent, from the data alone here, and nothing more
    expected = {f"p/{t['name']}": {f"p/{q}" for q in t["parents"]} for t in tasks}
    assert planned_parents(conv, tmp_path) == expected
    assert conv.edges == sum(len(t["parents"]) for t in tasks)
    assert not any("after" in d for d in conv.documents)  # every parent shares a file
    # the workflow's inputs are exactly the files no task writes
    written = {f["name"] for t in tasks for f in t["files"] if f["link"] == "output"}
    read = {f["name"] for t in tasks for f in t["files"] if f["link"] == "input"}
    assert {k.removeprefix("data:wf/p/") for k, _ in conv.inputs} == read - written
    total = sum(round(t["runtimeInSeconds"] * 0.01, 6) for t in tasks)
    assert conv.total_work == pytest.approx(total)
    assert conv.critical_path <= conv.total_work
    assert conv.bound(4) <= conv.level_bound(4) <= conv.list_schedule(4) + 1e-9


@needs_instances
def test_real_instance_needs_a_size_scale() -> None:
    """BLAST's database is 5 GB: a full-size copy per task is refused, with what to do."""
    path = WORKFLOWS / "blast-chameleon-small-001.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with pytest.raises(WfCommonsError, match=r"'nt'.*pass a smaller --size-scale"):
        wfcommons.convert(wfcommons.load(path), prefix="p")


# --- a tiny hand-written instance --------------------------------------------------------

def test_tiny_conversion(tmp_path: Path) -> None:
    wf = wfcommons.parse(tiny(), "tiny.json")
    assert wf.schema == "1.4" and [t.name for t in wf.tasks] == ["a", "b", "c", "d", "e"]
    conv = wfcommons.convert(wf, time_scale=2.0, size_scale=0.5, prefix="wf1")
    docs = by_name(conv)
    assert list(docs) == ["wf1/a", "wf1/b", "wf1/c", "wf1/d", "wf1/e"]  # parents first
    assert docs["wf1/b"]["inputs"] == {"data:wf/wf1/x": "x", "data:wf/wf1/tool": "tool"}
    assert docs["wf1/d"]["outputs"] == {"data:wf/wf1/out/d.txt": "out/d.txt"}
    assert docs["wf1/e"]["after"] == ["wf1/a"]  # a declared parent sharing no file
    assert all("after" not in docs[n] for n in ("wf1/a", "wf1/b", "wf1/c", "wf1/d"))
    assert planned_parents(conv, tmp_path) == {
        "wf1/a": set(), "wf1/b": {"wf1/a"}, "wf1/c": {"wf1/a"},
        "wf1/d": {"wf1/b", "wf1/c"}, "wf1/e": {"wf1/a"}}
    # inputs no task writes, scaled; read by two tasks, listed once
    assert conv.inputs == [("data:wf/wf1/in.txt", 50), ("data:wf/wf1/tool", 4)]
    # sleep runtime x 2; outputs at size x 0.5 (rounded)
    argv = docs["wf1/a"]["commands"][0]["command"]
    assert docs["wf1/a"]["commands"][0]["shell"] is True
    assert argv[1:] == ["wfcommons-task", "2", "5", "x", "10", "y"]
    # longest path a -> c -> d: (1 + 3 + 1) x 2; work (1+2+3+1+0.5) x 2
    assert conv.critical_path == pytest.approx(10.0)
    assert conv.total_work == pytest.approx(15.0)
    assert conv.bound(1) == pytest.approx(15.0)
    assert conv.bound(2) == pytest.approx(10.0)
    assert conv.edges == 5
    # priority by bottom level: c (3+1) before b (2+1) before e; a first of all
    prio = {n: d["priority"] for n, d in docs.items()}
    assert prio["wf1/a"] > prio["wf1/c"] > prio["wf1/b"] > prio["wf1/e"]
    assert prio["wf1/b"] > prio["wf1/d"]


def test_schema_15_reads_as_14() -> None:
    a = wfcommons.convert(wfcommons.parse(tiny(), "t14"), time_scale=1.5, prefix="p")
    b = wfcommons.convert(wfcommons.parse(tiny_v15(), "t15"), time_scale=1.5, prefix="p")
    assert b.documents == a.documents and b.inputs == a.inputs
    assert (b.critical_path, b.total_work) == (a.critical_path, a.total_work)


def test_commands_write_exact_sizes(tmp_path: Path) -> None:
    """The generated command, run by sh: it sleeps and writes each output at its size."""
    conv = wfcommons.convert(wfcommons.parse(tiny(), "tiny.json"), time_scale=0.01,
                             size_scale=3.0, prefix="p")
    for doc in conv.documents:
        argv = doc["commands"][0]["command"]
        work = tmp_path / doc["name"].replace("/", "_")
        work.mkdir()
        subprocess.run(["sh", "-c", *argv], cwd=work, check=True, timeout=30)
        sizes = {p.relative_to(work).as_posix(): p.stat().st_size
                 for p in work.rglob("*") if p.is_file()}
        want = {internal: 3 * n for internal, n in
                ((f["name"], f["sizeInBytes"]) for t in tiny()["workflow"]["tasks"]
                 if f"p/{t['name']}" == doc["name"] for f in t["files"]
                 if f["link"] == "output")}
        assert sizes == want


def test_bounds_when_one_task_gates_the_rest() -> None:
    """BWA's shape: an 8 s index gates eight 1 s tasks. The issue's bound says 9 s on
    4 slots, yet nothing but the index can run for 8 s: no schedule beats 8 + 8/4."""
    tasks = [task("index", 8.0, [], {}, {"idx": 1}), task("reduce", 0.0, [], {}, {"q": 1})]
    tasks += [task(f"t{i}", 1.0, ["index", "reduce"], {"idx": 1, "q": 1}, {f"o{i}": 1})
              for i in range(8)]
    wf = wfcommons.parse({"name": "g", "schemaVersion": "1.4",
                          "workflow": {"tasks": tasks}}, "g.json")
    conv = wfcommons.convert(wf, prefix="g")
    assert conv.bound(4) == pytest.approx(9.0)
    assert conv.level_bound(4) == pytest.approx(10.0)
    assert conv.list_schedule(4) == pytest.approx(10.0)
    assert conv.list_schedule(1) == pytest.approx(16.0)
    with pytest.raises(ValueError):
        conv.bound(0)


def test_list_schedule_takes_the_critical_path_first() -> None:
    """Two 1 s tasks and a 1 s task leading to a 2 s one, on 2 slots: the chain first
    gives 3 s, the critical path; push order alone would give 4 s."""
    tasks = [task("s1", 1.0, [], {}, {"s1": 1}), task("s2", 1.0, [], {}, {"s2": 1}),
             task("head", 1.0, [], {}, {"h": 1}), task("tail", 2.0, ["head"], {"h": 1},
                                                          {"t": 1})]
    conv = wfcommons.convert(wfcommons.parse({"name": "c", "schemaVersion": "1.4",
                                              "workflow": {"tasks": tasks}}, "c.json"),
                             prefix="c")
    assert conv.bound(2) == pytest.approx(3.0)
    assert conv.list_schedule(2) == pytest.approx(3.0)
    assert by_name(conv)["c/head"]["priority"] > by_name(conv)["c/s1"]["priority"]


def test_default_prefix() -> None:
    assert wfcommons.default_prefix(Path("x/bwa-chameleon-small-001.json")) == \
        "bwa-chameleon-small-001"
    with pytest.raises(WfCommonsError, match="pass --prefix"):
        wfcommons.default_prefix(Path("my flow.json"))


# --- bad files ---------------------------------------------------------------------------

def _set(path: str, value: Any) -> Any:
    def edit(doc: dict[str, Any]) -> dict[str, Any]:
        *keys, last = path.split(".")
        obj: Any = doc
        for k in keys:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        if value is _DELETE:
            del obj[last]
        elif isinstance(obj, list):
            obj[int(last)] = value
        else:
            obj[last] = value
        return doc
    return edit


_DELETE = object()

BAD_14 = [
    ("not an object", lambda d: [d], "a JSON object with 'schemaVersion'"),
    ("no version", _set("schemaVersion", _DELETE), "no 'schemaVersion'"),
    ("old version", _set("schemaVersion", "1.3"), "schemaVersion '1.3' is not supported"),
    ("no workflow", _set("workflow", _DELETE), "'workflow' is missing"),
    ("no tasks", _set("workflow.tasks", _DELETE), "'tasks' is missing"),
    ("empty tasks", _set("workflow.tasks", []), "the workflow has no task"),
    ("no runtime", _set("workflow.tasks.1.runtimeInSeconds", _DELETE),
     "task 'b': 'runtimeInSeconds' is missing"),
    ("negative runtime", _set("workflow.tasks.1.runtimeInSeconds", -1),
     "task 'b': 'runtimeInSeconds' must be a non-negative number"),
    ("runtime string", _set("workflow.tasks.1.runtimeInSeconds", "2"),
     "'runtimeInSeconds' must be a number"),
    ("no size", _set("workflow.tasks.0.files.0.sizeInBytes", _DELETE),
     "task 'a', files[0]: 'sizeInBytes' is missing"),
    ("bad link", _set("workflow.tasks.0.files.0.link", "inout"),
     "'link' must be 'input' or 'output'"),
    ("unknown parent", _set("workflow.tasks.1.parents", ["zz"]), "unknown parent 'zz'"),
    ("children disagree", _set("workflow.tasks.4.children", ["d"]),
     "task 'e' lists 'd' as a child, but 'd' does not list it as a parent"),
    ("parent not mirrored", _set("workflow.tasks.0.children", ["b", "c"]),
     "task 'e' lists 'a' as a parent, but 'a' does not list it as a child"),
    ("duplicate name", _set("workflow.tasks.4.name", "d"), "two tasks are named 'd'"),
    ("two writers", _set("workflow.tasks.4.files.0.name", "bx"),
     "file 'bx' is written by two tasks, 'b' and 'e'"),
    ("read and write", _set("workflow.tasks.1.files.2.name", "x"), "both reads and writes"),
    ("dotdot file", _set("workflow.tasks.4.files.0.name", "../etc/x"),
     "cannot be a datastore path"),
    ("absolute file", _set("workflow.tasks.4.files.0.name", "/tmp/x"),
     "cannot be a datastore path"),
]


@pytest.mark.parametrize(("what", "edit", "message"), BAD_14, ids=[b[0] for b in BAD_14])
def test_bad_instances_are_refused(what: str, edit: Any, message: str) -> None:
    with pytest.raises(WfCommonsError) as caught:
        wfcommons.parse(edit(tiny()), "tiny.json")
    assert str(caught.value).startswith("tiny.json"), str(caught.value)
    assert message in str(caught.value)


def test_cycle_is_named() -> None:
    doc = tiny()
    tasks = doc["workflow"]["tasks"]
    tasks[0]["parents"] = ["d"]
    tasks[3]["children"] = ["a"]
    tasks[0]["files"].append({"link": "input", "name": "out/d.txt", "sizeInBytes": 5})
    with pytest.raises(WfCommonsError, match=r"tiny.json: dependency cycle .*: "
                                             r"(a -> [bc] -> d -> a|d -> a -> [bc] -> d)"):
        wfcommons.convert(wfcommons.parse(doc, "tiny.json"), prefix="p")


BAD_15 = [
    ("no specification", _set("workflow.specification", _DELETE),
     "'specification' is missing"),
    ("no execution", _set("workflow.execution", _DELETE), "runtimes are needed"),
    ("no runtime entry", _set("workflow.execution.tasks.2.id", "zz"),
     "task 'c': no runtime"),
    ("file without size", _set("workflow.specification.files.0.id", "other"),
     "inputFiles 'in.txt' is not in workflow.specification.files"),
    ("no id", _set("workflow.specification.tasks.0.id", _DELETE), "'id' is missing"),
]


@pytest.mark.parametrize(("what", "edit", "message"), BAD_15, ids=[b[0] for b in BAD_15])
def test_bad_v15_instances_are_refused(what: str, edit: Any, message: str) -> None:
    with pytest.raises(WfCommonsError) as caught:
        wfcommons.parse(edit(tiny_v15()), "t15.json")
    assert str(caught.value).startswith("t15.json") and message in str(caught.value)


def test_conversion_problems_are_refused() -> None:
    wf = wfcommons.parse(tiny(), "tiny.json")
    with pytest.raises(WfCommonsError, match="--prefix 'a/b'"):
        wfcommons.convert(wf, prefix="a/b")
    with pytest.raises(WfCommonsError, match="--time-scale"):
        wfcommons.convert(wf, prefix="p", time_scale=float("nan"))
    big = copy.deepcopy(tiny())
    big["workflow"]["tasks"][0]["files"][0]["sizeInBytes"] = 10**12
    with pytest.raises(WfCommonsError, match=r"tiny.json: file 'in.txt' of task 'a' would "
                                             r"be 1000000000000 bytes .* e\.g\. 0\.0001"):
        wfcommons.convert(wfcommons.parse(big, "tiny.json"), prefix="p")
    spaced = copy.deepcopy(tiny())
    spaced["workflow"]["tasks"][4]["name"] = "e e"
    spaced["workflow"]["tasks"][0]["children"][2] = "e e"
    with pytest.raises(WfCommonsError, match=r"tiny.json: the converted task 'p/e e'.*"
                                             r"field 'name'"):
        wfcommons.convert(wfcommons.parse(spaced, "tiny.json"), prefix="p")


def test_load_refuses_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schemaVersion": "1.4", ')
    with pytest.raises(WfCommonsError, match=r"bad.json: not valid JSON"):
        wfcommons.load(bad)
    with pytest.raises(WfCommonsError, match=r"cannot read .*missing.json"):
        wfcommons.load(tmp_path / "missing.json")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(tiny()))
    assert len(wfcommons.load(good).tasks) == 5
