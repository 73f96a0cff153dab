"""The push's quick check (protocol.document.quick_check_json) against TaskDocument.

The quick check may refuse a valid document (TaskDocument then decides), but it
must never pass one that TaskDocument refuses, and what it passes must give the
same record as TaskDocument would. Hypothesis drives every field with strings
built from the characters the rules are about ('.', '/', ':', '-', NUL,
newline, ...).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from boss.push.records import _quick_record, _record, check_lines
from protocol.document import Command, TaskDocument, quick_check_json, validate

# the characters each rule is about, plus a few ordinary and non-ASCII ones
TRICKY = st.text(alphabet=st.sampled_from(list("./:-_@+a0Z \n\t\x00é😀\\\"")), max_size=12)
# mostly characters that names, images and variable names may hold, so that many pass
PLAIN = st.text(alphabet=st.sampled_from(list("./-:_@+aZ0")), min_size=1, max_size=8)
STRINGS = st.one_of(TRICKY, PLAIN, st.sampled_from(
    ["", ".", "..", "...", "/", "//", "a/", "/a", "a/..", "../a", "a/../b", "a//b", "-a",
     "a-", ".a", "..a", "a.", "data:x", "data:", ":x", "data:/x", "data://x", "s3://b/x",
     "a:b:c", "data:x/", "data:../", "data:./", "d a:x", "a\n", "\na", "x" * 201]))


def model_accepts(text: str) -> TaskDocument | None:
    try:
        return TaskDocument.model_validate_json(text)
    except ValidationError:
        return None


def assert_never_looser(raw: dict[str, Any]) -> bool:
    """quick passes -> the model passes, with the same record; True when quick passed."""
    text = json.dumps(raw)
    quick = quick_check_json(text.encode())
    if quick is None:
        return False
    doc = model_accepts(text)
    assert doc is not None, f"the quick check passed a document the model refuses: {text}"
    assert _quick_record(quick, 7, "dflt") == _record(doc, 7, "dflt")
    return True


def test_the_quick_schema_has_the_fields_of_the_model() -> None:
    # a field added to the model and not here would make every document that uses it
    # take the slow path; one here and not in the model would pass an unknown key
    from protocol.document import _quick_schema

    schema: Any = _quick_schema()
    assert set(schema["fields"]) == set(TaskDocument.model_fields)
    command = schema["fields"]["commands"]["schema"]["items_schema"]
    assert set(command["fields"]) == set(Command.model_fields)


@pytest.mark.parametrize("raw", [
    {"name": "t", "commands": [{"command": ["true"]}]},
    {"commands": [{"command": ["md5sum", "/mnt/clear"], "stdout": "/mnt/crypt"}],
     "image": "alpine:latest", "inputs": {"sisyphus:data/clear": "/mnt/clear"},
     "outputs": {"sisyphus:data/crypt": "/mnt/crypt"}},
    {"name": "md5-clear:v1@x+y/z", "image": "docker.io/alpine:3.19",
     "inputs": {"data:clear": "/mnt/clear", "data:dir/": "/mnt/dir", "plain": "rel/in"},
     "outputs": {"data:crypt": "/mnt/crypt", "data:outdir/": "out/"},
     "commands": [{"command": ["md5sum", "/mnt/clear"], "stdout": "/mnt/crypt"},
                  {"command": ["sh", "-c", "echo hi >&2"], "stdin": "/mnt/clear",
                   "stderr": "err.txt", "shell": True}],
     "after": ["split", "other"], "retries": 2, "timeout": 3600, "priority": -5,
     "env": {"LANG": "C", "_X1": ""}, "storage": "nfs", "workdir": "/srv/nfs/work"},
    {"name": "...", "commands": [{"command": ["x"]}], "storage": "local", "workdir": "/"},
    {"name": ".-x/...", "commands": [{"command": ["x", ""]}], "timeout": 0.5},
    {"name": None, "image": None, "commands": [{"command": ["x"], "stdout": None}],
     "timeout": None, "workdir": None},
])
def test_ordinary_documents_take_the_quick_path(raw: dict[str, Any]) -> None:
    assert assert_never_looser(raw)


@pytest.mark.parametrize("raw", [
    {"name": "t\n", "commands": [{"command": ["x"]}]},  # Python's $ would pass it
    {"name": "a/./b", "commands": [{"command": ["x"]}]},
    {"name": "-a", "commands": [{"command": ["x"]}]},
    {"commands": [{"command": ["", "x"]}]},
    {"commands": [{"command": ["x\x00"]}]},
    {"commands": [{"command": ["x"]}], "inputs": {"data:a/../": "/x"}},
    {"commands": [{"command": ["x"]}], "inputs": {"s3://b/x": "/x"}},
    {"commands": [{"command": ["x"]}], "outputs": {"data:x": "a/../b"}},
    {"commands": [{"command": ["x"]}], "storage": "nfs"},
    {"commands": [{"command": ["x"]}], "storage": "nfs", "workdir": ""},
    {"commands": [{"command": ["x"]}], "workdir": "/a/../b"},
    {"commands": [{"command": ["x"]}], "env": {"A-B": "x"}},
    {"commands": [{"command": ["x"]}], "image": "--privileged"},
    {"commands": [{"command": ["x"]}], "retries": True},
    {"commands": [{"command": ["x"]}], "extra": 1},
])
def test_bad_documents_are_left_to_the_model(raw: dict[str, Any]) -> None:
    assert quick_check_json(json.dumps(raw)) is None
    assert validate(raw, "task")[0] is None


def test_a_lone_surrogate_is_left_to_the_careful_path() -> None:
    assert quick_check_json(b'{"commands":[{"command":["\\ud800"]}]}') is None


DOCS = st.fixed_dictionaries(
    {"commands": st.lists(st.fixed_dictionaries(
        {"command": st.lists(STRINGS, max_size=3)},
        optional={"stdin": st.none() | STRINGS, "stdout": STRINGS, "stderr": STRINGS,
                  "shell": st.booleans() | st.sampled_from([0, 1, "no"])}), max_size=2)},
    optional={
        "name": st.none() | STRINGS,
        "image": st.none() | STRINGS,
        "inputs": st.dictionaries(STRINGS, STRINGS, max_size=2),
        "outputs": st.dictionaries(STRINGS, STRINGS, max_size=2),
        "after": st.lists(STRINGS, max_size=2),
        "retries": st.integers(-2, 102) | st.floats(0, 3) | st.booleans(),
        "timeout": st.none() | st.integers(-1, 10) | st.floats(allow_nan=False) | TRICKY,
        "priority": st.integers(-1_000_001, 1_000_001) | st.booleans(),
        "env": st.dictionaries(STRINGS, STRINGS, max_size=2),
        "storage": st.sampled_from(["cloud", "nfs", "local", "s3", ""]),
        "workdir": st.none() | STRINGS | STRINGS.map(lambda s: "/" + s),
    })


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCS)
def test_the_quick_check_is_never_looser_than_the_model(raw: dict[str, Any]) -> None:
    assert_never_looser(raw)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(["name", "remote", "internal", "workdir", "env", "image"]), STRINGS)
def test_each_pattern_is_never_looser_than_its_rule(field: str, value: str) -> None:
    # one tricky value at a time in an otherwise ordinary document: the generated
    # documents above rarely get every other field right at once
    raw: dict[str, Any] = {"name": "t", "commands": [{"command": ["x"], "stdout": "o"}]}
    if field == "name":
        raw["name"] = value
    elif field == "remote":
        raw["inputs"] = {value: "i"}
    elif field == "internal":
        raw["outputs"] = {"data:o": value}
        raw["commands"][0]["stdout"] = value
    elif field == "workdir":
        raw.update(storage="nfs", workdir=value)
    elif field == "env":
        raw["env"] = {value: value}
    else:
        raw["image"] = value
    assert_never_looser(raw)


def test_check_lines_gives_the_same_records_whichever_path_passes_them() -> None:
    # a ':' in a remote path is valid but not for the quick check: the model passes it
    lines = [{"name": "a", "commands": [{"command": ["x"]}], "outputs": {"d:x": "o"}},
             {"name": "b", "commands": [{"command": ["x"]}], "inputs": {"d:x:y": "i"}},
             {"name": "c", "commands": [{"command": ["x"]}], "inputs": {"plain": "i"},
              "after": ["a"], "retries": 3, "priority": 9}]
    data = "".join(json.dumps(raw) + "\n" for raw in lines).encode()
    assert quick_check_json(json.dumps(lines[1])) is None
    assert check_lines(data, 1, "dflt") == [
        (0, 1, "a", 0, 1, [], (("d", "x"),), ()),
        (0, 2, "b", 0, 1, [], (), (("d", "x:y"),)),
        (0, 3, "c", 9, 4, ["a"], (), (("dflt", "plain"),)),
    ]
