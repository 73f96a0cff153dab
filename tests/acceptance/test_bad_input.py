"""Bad push files and settings: one clear error each, exit 2, no traceback, nothing pushed.

A database with a few good tasks is made once for the module; every bad
command then runs against it (side by side, to keep the suite fast: they only
read, or write in a transaction that must roll back), and the database is
compared row by row before and after.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.acceptance.helpers import (
    PARALLEL,
    Cli,
    Ran,
    db_path,
    seed,
    snapshot,
    task,
    write_settings,
)

GOOD = [task("seeded1", outputs={"data:seeded/out.txt": "out.txt"}),
        task("seeded2", after=["seeded1"]), task("seeded3")]


def lines(*docs: Any) -> bytes:
    return "".join(json.dumps(d) + "\n" for d in docs).encode()


@dataclass(frozen=True)
class Case:
    id: str
    content: bytes | None  # the push file (None: no file at all)
    needles: tuple[str, ...]  # each must appear in stderr
    filename: str = "bad.jsonl"
    args: tuple[str, ...] = ()  # instead of `push-tasks FILE`
    settings: bool = True  # pass --settings with the good settings file
    extra: dict[str, bytes] = field(default_factory=dict)  # other files to write

    @property
    def push(self) -> bool:
        return not self.args


CASES = [
    Case("malformed-json-array", b'[{"name": "x", "commands": [\n',
         ("bad.json: line 2 column 1: not valid JSON: Expecting value",), filename="bad.json"),
    Case("malformed-json-lines",
         lines(task("fine")) + b'{"name": "broken", "commands": [}\n',
         ("bad.jsonl: line 2 column 33: not valid JSON: Expecting value",)),
    Case("missing-dependency", lines(task("orphan", after=["ghost"]), task("fine")),
         ("task 'orphan', field 'after': no task named 'ghost'",)),
    Case("cycle", lines(task("a", after=["c"]), task("b", after=["a"]), task("c", after=["b"]),
                        task("bystander", after=["seeded1"])),
         ("dependency cycle (each runs before the next): a -> b -> c -> a",)),
    Case("duplicate-in-file", json.dumps([task("twin"), task("other"), task("twin")]).encode(),
         ("task 'twin' (#3), field 'name': duplicate name 'twin'",), filename="bad.json"),
    Case("duplicate-in-database", lines(task("newcomer"), task("seeded1")),
         ("task 'seeded1', field 'name': a task with this name already exists",
          "--skip-existing")),
    Case("path-traversal", lines(
        task("up-internal", inputs={"data:in.txt": "../../etc/passwd"}),
        {"name": "up-redirect", "commands": [{"command": ["cat"], "stdout": "out/../../x"}]},
        task("up-remote", outputs={"data:a/../../b": "b"}),
        task("up-default-bucket", inputs={"../secret": "s"}),
        task("absolute-remote", inputs={"data:/etc/passwd": "p"}),
        task("url-remote", inputs={"file:///etc/passwd": "p"})),
         ("task 'up-internal' (line 1), field 'inputs': 'data:in.txt': internal path "
          "'../../etc/passwd' contains '..'",
          "task 'up-redirect' (line 2), field 'commands.0.stdout'",
          "task 'up-remote' (line 3), field 'outputs': 'data:a/../../b': remote path "
          "'data:a/../../b' contains '..'",
          "task 'up-default-bucket' (line 4), field 'inputs'",
          "task 'absolute-remote' (line 5), field 'inputs'", "no leading '/'",
          "task 'url-remote' (line 6), field 'inputs'", "is a URL")),
    Case("command-not-a-list", lines(
        {"name": "string-command", "commands": [{"command": "echo hi"}]},
        {"name": "string-commands", "commands": "echo hi"},
        ["not", "an", "object"]),
         ("task 'string-command' (line 1), field 'commands.0.command': Input should be a "
          "valid list",
          "task 'string-commands' (line 2), field 'commands'",
          "task line 3: a task must be a JSON object, not an array")),
    Case("empty-file", b"", ("bad.jsonl: the file is empty: no tasks to push",)),
    Case("invalid-utf8-lines", lines(task("fine")) + b'{"name": "caf\xe9", "commands": []}\n',
         ("bad.jsonl: line 2: not valid UTF-8 at byte",)),
    Case("invalid-utf8-array",
         b'[{"name": "ok", "commands": [{"command": ["true"]}]},\n'
         b' {"name": "caf\xff", "commands": [{"command": ["true"]}]}]',
         ("bad.json: line 2: not valid UTF-8 at byte 68",), filename="bad.json"),
    Case("missing-file", None, ("bad.jsonl: no such file",)),
    Case("unknown-settings-key", None, ("error: bad.toml: [boss.colour] unknown key",),
         args=("--settings", "bad.toml", "tasks"), settings=False,
         extra={"bad.toml": b'[boss]\ncolour = "blue"\n'}),
    Case("settings-not-a-file", None, ("error: settings file . cannot be read",),
         args=("--settings", ".", "tasks"), settings=False),
]


@dataclass
class Outcomes:
    cli: Cli
    before: dict[str, list[tuple[Any, ...]]]
    after: dict[str, list[tuple[Any, ...]]]
    ran: dict[str, Ran]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcomes]:
    root = tmp_path_factory.mktemp("bad-input")
    cli = Cli(root, write_settings(root))
    seed(cli, GOOD)
    before = snapshot(db_path(root))
    assert len(before["tasks"]) == len(GOOD)

    def one(case: Case) -> Ran:
        # each case has its own directory, so that file names in messages stay short
        cwd = root / case.id
        cwd.mkdir()
        if case.content is not None:
            (cwd / case.filename).write_bytes(case.content)
        for name, data in case.extra.items():
            (cwd / name).write_bytes(data)
        here = Cli(cwd, cli.settings)
        return here.run(*(case.args or ("push-tasks", case.filename)), settings=case.settings)

    with ThreadPoolExecutor(PARALLEL) as pool:
        ran = dict(zip([c.id for c in CASES], pool.map(one, CASES), strict=True))
    yield Outcomes(cli, before, snapshot(db_path(root)), ran)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_with_a_clear_error(case: Case, outcomes: Outcomes) -> None:
    ran = outcomes.ran[case.id]
    assert ran.code == 2, str(ran)
    assert ran.stdout == "", str(ran)
    errors = ran.stderr.splitlines()
    assert errors and all(line.startswith("error: ") for line in errors), str(ran)
    for needle in case.needles:
        assert needle in ran.stderr, f"{needle!r} not in\n{ran}"
    if case.push:
        # every line says which file; the last says that nothing happened
        assert all(line.startswith(f"error: {case.filename}: ") for line in errors), str(ran)
        assert errors[-1] == f"error: {case.filename}: nothing was pushed"


def test_every_problem_is_listed_at_once(outcomes: Outcomes) -> None:
    """One error line per bad task, not just the first one."""
    errors = outcomes.ran["path-traversal"].stderr.splitlines()
    assert len(errors) == 6 + 1
    assert len(outcomes.ran["command-not-a-list"].stderr.splitlines()) == 3 + 1


def test_database_unchanged(outcomes: Outcomes) -> None:
    assert outcomes.after == outcomes.before
    names = {row[1] for row in outcomes.after["tasks"]}
    assert names == {"seeded1", "seeded2", "seeded3"}


def test_skip_existing_pushes_the_rest(outcomes: Outcomes) -> None:
    """The duplicate refused above goes in with --skip-existing: the old task kept as it was."""
    cli = outcomes.cli
    path = cli.cwd / "duplicate-in-database" / "bad.jsonl"
    ran = cli.run("push-tasks", "--skip-existing", str(path))
    assert ran.code == 0, str(ran)
    assert ran.stdout.strip() == "1"
    assert re.search(r"pushed 1 tasks \(1 ready, 0 dependencies, 1 existing skipped\)",
                     ran.stderr), str(ran)
    after = snapshot(db_path(cli.cwd))
    old = {row[1]: row for row in outcomes.before["tasks"]}
    new = {row[1]: row for row in after["tasks"]}
    assert set(new) == {"seeded1", "seeded2", "seeded3", "newcomer"}
    assert all(new[name] == old[name] for name in old)
