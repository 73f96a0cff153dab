"""The task document (protocol.document) and the settings loader (protocol.settings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocol.document import (
    Problem,
    RemotePath,
    TaskDocument,
    check_internal,
    describe,
    parse_remote,
    problem,
    validate,
)
from protocol.errors import SettingsError
from protocol.settings import load_settings

# The example document from sisyphus's README, verbatim: it must validate unchanged.
SISYPHUS_EXAMPLE = """
{"image": "alpine:latest",
 "inputs": {
   "sisyphus:data/clear": "/mnt/clear"},
 "outputs": {
   "sisyphus:data/crypt": "/mnt/crypt"},
 "commands": [{
   "command": [
     "md5sum",
     "/mnt/clear"],
   "stdout": "/mnt/crypt"}]}
"""

WHERE = "task 't' (line 1)"


def good(**changes: Any) -> dict[str, Any]:
    """A minimal valid document with ``changes`` applied (a value of ... removes a key)."""
    doc: dict[str, Any] = {"name": "t", "commands": [{"command": ["true"]}]}
    for k, v in changes.items():
        if v is ...:
            doc.pop(k, None)
        else:
            doc[k] = v
    return doc


def problems_of(raw: Any) -> list[Problem]:
    doc, problems = validate(raw, WHERE)
    assert doc is None, f"expected {raw!r} to be refused"
    assert problems
    return problems


# --- good documents -----------------------------------------------------------------


def test_sisyphus_example_validates_unchanged() -> None:
    raw = json.loads(SISYPHUS_EXAMPLE)
    doc, problems = validate(raw, WHERE)
    assert problems == []
    assert doc is not None
    assert doc.name is None
    assert doc.image == "alpine:latest"
    assert doc.remote_inputs() == [RemotePath("sisyphus", "data/clear")]
    assert doc.remote_outputs() == [RemotePath("sisyphus", "data/crypt")]
    assert doc.commands[0].command == ["md5sum", "/mnt/clear"]
    assert doc.commands[0].stdout == "/mnt/crypt"
    assert doc.max_tries == 1
    # nothing is added or dropped: the dump (without defaults) is the input
    assert doc.model_dump(exclude_defaults=True) == raw


def test_document_with_every_field() -> None:
    raw = {
        "name": "md5-clear:v1@x+y/z",
        "image": "alpine:latest",
        "inputs": {"data:clear": "/mnt/clear", "data:dir/": "/mnt/dir", "plain": "rel/in"},
        "outputs": {"data:crypt": "/mnt/crypt", "data:outdir/": "out/"},
        "commands": [
            {"command": ["md5sum", "/mnt/clear"], "stdout": "/mnt/crypt"},
            {"command": ["sh", "-c", "echo hi >&2"], "stdin": "/mnt/clear",
             "stderr": "err.txt", "shell": True},
        ],
        "after": ["split", "other"],
        "retries": 2,
        "timeout": 3600,
        "priority": -5,
        "env": {"LANG": "C", "_X1": ""},
        "storage": "nfs",
        "workdir": "/srv/nfs/work",
    }
    doc, problems = validate(raw, WHERE)
    assert problems == []
    assert doc is not None
    assert doc.max_tries == 3
    assert doc.timeout == 3600.0
    assert doc.priority == -5
    assert doc.storage == "nfs"
    assert doc.workdir == "/srv/nfs/work"
    assert doc.after == ["split", "other"]
    assert doc.commands[1].shell is True
    assert doc.remote_inputs() == [RemotePath("data", "clear"), RemotePath("data", "dir/"),
                                   RemotePath("default", "plain")]
    assert doc.remote_inputs("mine")[2] == RemotePath("mine", "plain")
    assert [p.is_dir for p in doc.remote_outputs()] == [False, True]
    assert doc.model_dump(exclude_defaults=True) == {**raw, "timeout": 3600.0}


@pytest.mark.parametrize("storage", ["cloud", "nfs", "local"])
def test_every_storage_mode_with_an_absolute_workdir(storage: str) -> None:
    doc, problems = validate(good(storage=storage, workdir="/w"), WHERE)
    assert problems == [] and doc is not None and doc.storage == storage


def test_defaults() -> None:
    doc = TaskDocument.model_validate({"commands": [{"command": ["x"]}]})
    assert (doc.name, doc.image, doc.inputs, doc.outputs, doc.after) == (None, None, {}, {}, [])
    assert (doc.retries, doc.timeout, doc.priority, doc.env) == (0, None, 0, {})
    assert (doc.storage, doc.workdir, doc.max_tries) == ("cloud", None, 1)
    assert doc.commands[0].shell is False


# --- bad documents: each problem names the task and the field ----------------------

BAD: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, document, field named, fragment of the message)
    ("missing-commands", good(commands=...), "commands", "required"),
    ("commands-not-a-list", good(commands="true"), "commands", "list"),
    ("no-commands", good(commands=[]), "commands", "at least 1"),
    ("command-not-an-object", good(commands=["md5sum"]), "commands.0", ""),
    ("non-list-command", good(commands=[{"command": "md5sum /mnt/x"}]),
     "commands.0.command", "list"),
    ("empty-argv", good(commands=[{"command": []}]), "commands.0.command", "at least 1"),
    ("empty-program", good(commands=[{"command": ["", "x"]}]), "commands.0.command", "empty"),
    ("argv-not-strings", good(commands=[{"command": ["echo", 3]}]), "commands.0.command.1",
     "string"),
    ("unknown-command-key", good(commands=[{"command": ["x"], "stdot": "/o"}]),
     "commands.0.stdot", "unknown key"),
    ("unknown-key", good(imgae="alpine"), "imgae", "unknown key"),
    ("dotdot-remote", good(inputs={"data:a/../../etc/passwd": "/mnt/x"}), "inputs", "'..'"),
    ("dotdot-remote-dir", good(outputs={"data:../": "/mnt/x"}), "outputs", "'..'"),
    ("dotdot-internal", good(inputs={"data:x": "/mnt/../etc/shadow"}), "inputs", "'..'"),
    ("dotdot-internal-relative", good(outputs={"data:x": "../x"}), "outputs", "'..'"),
    ("dotdot-stdout", good(commands=[{"command": ["x"], "stdout": "../../x"}]),
     "commands.0.stdout", "'..'"),
    ("dotdot-stdin", good(commands=[{"command": ["x"], "stdin": "/a/.."}]),
     "commands.0.stdin", "'..'"),
    ("absolute-remote", good(inputs={"data:/etc/passwd": "/mnt/x"}), "inputs", "relative"),
    ("absolute-bare-remote", good(inputs={"/etc/passwd": "/mnt/x"}), "inputs", "relative"),
    ("url-remote", good(inputs={"s3://bucket/key": "/mnt/x"}), "inputs", "URL"),
    ("url-remote-file", good(outputs={"file:///etc/passwd": "/mnt/x"}), "outputs", "URL"),
    ("bad-bucket", good(inputs={"my bucket!:x": "/mnt/x"}), "inputs", "bucket name"),
    ("empty-bucket", good(inputs={":x": "/mnt/x"}), "inputs", "bucket name"),
    ("remote-names-nothing", good(inputs={"data:": "/mnt/x"}), "inputs", "empty"),
    ("empty-internal", good(inputs={"data:x": ""}), "inputs", "empty"),
    ("bad-env-name", good(env={"1ABC": "x"}), "env", "environment variable name"),
    ("bad-env-name-dash", good(env={"A-B": "x"}), "env", "environment variable name"),
    ("bad-env-name-equals", good(env={"A=B": "x"}), "env", "environment variable name"),
    ("env-not-strings", good(env={"A": 1}), "env.A", "string"),
    ("nfs-without-workdir", good(storage="nfs"), "", "workdir"),
    ("local-without-workdir", good(storage="local"), "", "workdir"),
    ("relative-workdir", good(storage="local", workdir="work/here"), "", "workdir"),
    ("dotdot-workdir", good(storage="nfs", workdir="/srv/../etc"), "", "workdir"),
    ("unknown-storage", good(storage="s3"), "storage", "cloud"),
    ("nul-argv", good(commands=[{"command": ["echo", "a\x00b"]}]), "commands.0.command",
     "NUL"),
    ("nul-internal", good(inputs={"data:x": "/mnt/\x00x"}), "inputs", "NUL"),
    ("nul-remote", good(outputs={"data:x\x00y": "/mnt/x"}), "outputs", "NUL"),
    ("nul-stderr", good(commands=[{"command": ["x"], "stderr": "e\x00"}]),
     "commands.0.stderr", "NUL"),
    ("nul-name", good(name="a\x00b"), "name", "name may hold"),
    ("retries-string", good(retries="x"), "retries", "integer"),
    ("retries-negative", good(retries=-1), "retries", "greater than or equal to 0"),
    ("retries-too-many", good(retries=101), "retries", "less than or equal to 100"),
    ("retries-fraction", good(retries=1.5), "retries", "integer"),
    ("timeout-negative", good(timeout=-1), "timeout", "greater than 0"),
    ("timeout-zero", good(timeout=0), "timeout", "greater than 0"),
    ("timeout-string", good(timeout="soon"), "timeout", "number"),
    ("priority-string", good(priority="high"), "priority", "integer"),
    ("priority-huge", good(priority=10**9), "priority", "less than or equal"),
    ("empty-name", good(name=""), "name", "at least 1"),
    ("absolute-name", good(name="/etc"), "name", "must not start with '/'"),
    ("name-with-space", good(name="a b"), "name", "name may hold"),
    ("name-too-long", good(name="n" * 201), "name", "at most 200"),
    ("name-not-a-string", good(name=7), "name", "string"),
    ("empty-after", good(after=[""]), "after", "empty task name"),
    ("after-not-a-list", good(after="split"), "after", "list"),
    ("inputs-not-an-object", good(inputs=["data:x"]), "inputs", "dictionary"),
    ("empty-image", good(image=""), "image", "at least 1"),
    ("shell-not-bool", good(commands=[{"command": ["x"], "shell": "yes please"}]),
     "commands.0.shell", "boolean"),
]


@pytest.mark.parametrize(("raw", "field", "fragment"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_document_names_the_field(raw: dict[str, Any], field: str, fragment: str) -> None:
    problems = problems_of(raw)
    assert [p.field for p in problems] == [field], problems
    (p,) = problems
    assert fragment in p.message
    assert p.where == WHERE
    text = str(p)
    assert text.startswith(WHERE)
    assert "\n" not in text  # one line per problem
    if field:
        assert f"field {field!r}" in text
    else:
        # a rule across fields: the message itself names the field
        assert "workdir" in text


def test_every_problem_of_a_document_is_reported() -> None:
    raw = good(retries="x", timeout=-1, env={"1": "x"}, bogus=True,
               commands=[{"command": "x"}])
    fields = sorted(p.field for p in problems_of(raw))
    assert fields == ["bogus", "commands.0.command", "env", "retries", "timeout"]


@pytest.mark.parametrize("raw", [[good()], "a task", 3, 2.5, True, None],
                         ids=["array", "string", "int", "float", "bool", "null"])
def test_a_document_must_be_an_object(raw: Any) -> None:
    (p,) = problems_of(raw)
    assert p.field == ""
    assert "must be a JSON object" in p.message
    assert str(p) == f"{WHERE}: {p.message}"


@pytest.mark.parametrize("raw", [good(name="md5\n"), good(env={"LANG\n": "C"}),
                                 good(inputs={"data\n:x": "/mnt/x"})],
                         ids=["name", "env-name", "bucket"])
def test_trailing_newline_is_refused(raw: dict[str, Any]) -> None:
    problems_of(raw)


@pytest.mark.parametrize("raw", [good(env={"A": "x\x00y"}),
                                 good(storage="nfs", workdir="/srv/\x00w"),
                                 good(image="alpine\x00:latest")],
                         ids=["env-value", "workdir", "image"])
def test_nul_bytes_anywhere_are_refused(raw: dict[str, Any]) -> None:
    problems_of(raw)


def test_problem_and_describe_format() -> None:
    assert problem("task 'a' (line 3)", "inputs", "bad") == "task 'a' (line 3), field 'inputs': bad"
    assert problem("line 7", "", "not JSON") == "line 7: not JSON"
    assert describe(0, 3, {"name": "a"}) == "task 'a' (line 3)"
    assert describe(4, None, {"name": "a"}) == "task 'a' (#5)"
    assert describe(4, None, {"name": 5}) == "task #5"
    assert describe(0, 9, [1]) == "task line 9"


# --- remote paths -----------------------------------------------------------------


@pytest.mark.parametrize(("key", "expected"), [
    ("data:x", RemotePath("data", "x")),
    ("data:a/b/c.txt", RemotePath("data", "a/b/c.txt")),
    ("data:dir/", RemotePath("data", "dir/")),
    ("plain/file", RemotePath("default", "plain/file")),
    ("b.1_x-y:p:q", RemotePath("b.1_x-y", "p:q")),
    ("data:..x/x..", RemotePath("data", "..x/x..")),
])
def test_parse_remote(key: str, expected: RemotePath) -> None:
    got = parse_remote(key)
    assert got == expected
    assert str(got) == f"{expected.bucket}:{expected.path}"
    assert got.is_dir == key.endswith("/")


def test_parse_remote_default_bucket() -> None:
    assert parse_remote("x/y", default_bucket="store") == RemotePath("store", "x/y")
    assert parse_remote("data:x", default_bucket="store") == RemotePath("data", "x")


@pytest.mark.parametrize(("key", "fragment"), [
    ("data:", "empty"),
    ("data:/", "relative"),
    ("data:/abs", "relative"),
    ("/abs", "relative"),
    ("data:a/../b", "'..'"),
    ("data:..", "'..'"),
    ("..", "'..'"),
    ("data:../", "'..'"),
    ("s3://bucket/key", "URL"),
    ("gs://b", "URL"),
    (":x", "bucket name"),
    ("a b:x", "bucket name"),
    ("-lead:x", "bucket name"),
    ("data:x\x00", "NUL"),
    ("data:" + "x" * 5000, "longer than"),
])
def test_parse_remote_refuses(key: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_remote(key)
    assert fragment in str(info.value)


@pytest.mark.parametrize(("outer", "inner", "expected"), [
    ("data:x", "data:x", True),
    ("data:d/", "data:d/", True),
    ("data:d/", "data:d", True),
    ("data:d", "data:d/", True),
    ("data:d/", "data:d/f", True),
    ("data:d/", "data:d/e/f/", True),
    ("data:d/", "data:dx", False),
    ("data:d/", "data:e/d/f", False),
    ("data:d", "data:d/f", False),  # a file contains nothing but itself
    ("data:d/", "other:d/f", False),
    ("data:d/f", "data:d/", False),
])
def test_remote_path_contains(outer: str, inner: str, expected: bool) -> None:
    assert parse_remote(outer).contains(parse_remote(inner)) is expected


@pytest.mark.parametrize("path", ["/mnt/x", "rel/x", "x", "/", "./x", "a..b", "..a/b.."])
def test_check_internal_accepts(path: str) -> None:
    assert check_internal(path) == path


@pytest.mark.parametrize("path", ["", "..", "../x", "/mnt/../x", "a/..", "a\x00", "/" * 5000])
def test_check_internal_refuses(path: str) -> None:
    with pytest.raises(ValueError, match="internal path"):
        check_internal(path)


# --- settings -----------------------------------------------------------------------


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean current directory (no ./ecloud.toml), resolved."""
    monkeypatch.chdir(tmp_path)
    return tmp_path.resolve()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_settings_defaults(here: Path) -> None:
    s = load_settings(None, environ={})
    assert s.source == "built-in defaults"
    assert s.boss.database_url == f"sqlite:///{here}/.ecloud/boss.db"
    assert (s.boss.listen, s.boss.port, s.boss.lease_seconds) == ("127.0.0.1:7878", 7878, 60.0)
    assert s.datastore.default == f"file://{here}/.ecloud/data"
    assert s.datastore.buckets == {"data": f"file://{here}/.ecloud/data"}
    assert s.bucket_url("data") == f"file://{here}/.ecloud/data"
    assert s.bucket_url("nope") is None
    assert s.worker.slots == 2
    assert s.worker.workdir == f"{here}/.ecloud/work"
    assert s.worker.cache_dir == f"{here}/.ecloud/cache"
    assert s.worker.cache_bytes == 10_000_000_000
    assert s.provider.default == "local"
    assert (s.autoscale.min_workers, s.autoscale.max_workers) == (0, 10)


def test_settings_file_and_relative_paths(here: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "s.toml", """
[boss]
database_url = "sqlite:///db/boss.db"
lease_seconds = 5
listen = "localhost:9000"
[datastore]
default = "file:///srv/data"
[datastore.buckets]
raw = "s3://raw/prefix"
rel = "file://rel/dir"
[worker]
slots = 8
workdir = "/abs/work"
container_runtime = "docker"
[provider]
default = "ssh"
[autoscale]
max_workers = 3
""")
    s = load_settings(str(f), environ={})
    assert s.source == str(f)
    assert s.boss.database_url == f"sqlite:///{here}/db/boss.db"
    assert (s.boss.lease_seconds, s.boss.port) == (5.0, 9000)
    assert s.datastore.default == "file:///srv/data"
    assert s.datastore.buckets == {"raw": "s3://raw/prefix", "rel": f"file://{here}/rel/dir"}
    assert (s.worker.slots, s.worker.workdir, s.worker.container_runtime) == (8, "/abs/work",
                                                                             "docker")
    assert s.provider.default == "ssh"
    assert s.autoscale.max_workers == 3


def test_settings_are_found_by_env_then_current_directory(here: Path, tmp_path: Path) -> None:
    write(here / "ecloud.toml", "[worker]\nslots = 3\n")
    other = write(tmp_path / "other.toml", "[worker]\nslots = 4\n")
    third = write(tmp_path / "third.toml", "[worker]\nslots = 5\n")
    assert load_settings(None, environ={}).worker.slots == 3
    assert load_settings(None, environ={"ECLOUD_SETTINGS": str(other)}).worker.slots == 4
    assert load_settings(str(third), environ={"ECLOUD_SETTINGS": str(other)}).worker.slots == 5


def test_env_overrides_file(here: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "s.toml", '[boss]\ndatabase_url = "sqlite:///file.db"\n')
    env = {"ECLOUD_BOSS_DATABASE_URL": "postgresql+psycopg://u@db/ecloud",
           "ECLOUD_WORKER_SLOTS": "6", "ECLOUD_BOSS_LEASE_SECONDS": "2.5"}
    s = load_settings(str(f), environ=env)
    assert s.boss.database_url == "postgresql+psycopg://u@db/ecloud"
    assert (s.worker.slots, s.boss.lease_seconds) == (6, 2.5)
    assert "ECLOUD_BOSS_DATABASE_URL" in s.source and str(f) in s.source
    # a relative SQLite URL from the environment is resolved too
    s = load_settings(None, environ={"ECLOUD_BOSS_DATABASE_URL": "sqlite:///x/b.db"})
    assert s.boss.database_url == f"sqlite:///{here}/x/b.db"


def test_env_json_for_dicts_and_lists(here: Path) -> None:
    env = {"ECLOUD_DATASTORE_BUCKETS": '{"raw": "s3://raw", "local": "file:///srv/l"}',
           "ECLOUD_WORKER_CONTAINER_ARGS": '["--network", "none"]'}
    s = load_settings(None, environ=env)
    assert s.datastore.buckets == {"raw": "s3://raw", "local": "file:///srv/l"}
    assert s.worker.container_args == ["--network", "none"]
    # a str setting is taken as written, even when it looks like JSON
    s = load_settings(None, environ={"ECLOUD_BOSS_SSH_USER": "[me]"})
    assert s.boss.ssh_user == "[me]"


def test_env_bad_json_names_the_variable(here: Path) -> None:
    with pytest.raises(SettingsError, match="ECLOUD_DATASTORE_BUCKETS: not valid JSON"):
        load_settings(None, environ={"ECLOUD_DATASTORE_BUCKETS": "{raw: s3://x}"})


@pytest.mark.parametrize("listen", ["0.0.0.0:7878", "192.168.1.2:7878", ":7878",
                                    "127.0.0.1:http", "example.com:80", "127.0.0.1"])
def test_non_loopback_listen_is_refused(here: Path, tmp_path: Path, listen: str) -> None:
    f = write(tmp_path / "s.toml", f'[boss]\nlisten = "{listen}"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(str(f), environ={})
    text = str(info.value)
    assert str(f) in text and "boss.listen" in text and "loopback" in text
    with pytest.raises(SettingsError, match="ECLOUD_BOSS_LISTEN"):
        load_settings(None, environ={"ECLOUD_BOSS_LISTEN": listen})


@pytest.mark.parametrize("listen", ["127.0.0.1:1", "localhost:7878", "[::1]:7878"])
def test_loopback_listen_is_accepted(here: Path, listen: str) -> None:
    s = load_settings(None, environ={"ECLOUD_BOSS_LISTEN": listen})
    assert s.boss.listen == listen


@pytest.mark.parametrize(("text", "fragment"), [
    ("[boss\ndatabase_url = 1\n", "not valid TOML"),
    ("[boss]\ndatabase_url = \n", "not valid TOML"),
    ("[boss]\ndatabse_url = 'sqlite:///x'\n", "boss.databse_url"),
    ("[bogus]\nx = 1\n", "bogus"),
    ("[worker]\nslots = 'many'\n", "worker.slots"),
    ("[worker]\nslots = 0\n", "worker.slots"),
    ("[provider]\ndefault = 'aws'\n", "provider.default"),
])
def test_bad_settings_file_names_the_file(here: Path, tmp_path: Path, text: str,
                                          fragment: str) -> None:
    f = write(tmp_path / "bad.toml", text)
    with pytest.raises(SettingsError) as info:
        load_settings(str(f), environ={})
    assert str(f) in str(info.value)
    assert fragment in str(info.value)


def test_settings_file_not_utf8_or_missing(here: Path, tmp_path: Path) -> None:
    f = tmp_path / "latin1.toml"
    f.write_bytes(b"[boss]\nssh_user = 'caf\xe9'\n")
    with pytest.raises(SettingsError, match="not valid TOML") as info:
        load_settings(str(f), environ={})
    assert str(f) in str(info.value)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(str(tmp_path / "missing.toml"), environ={})


@pytest.mark.parametrize("name", [".", "..", "a/../b", "a//b", "a/", "x/./y"])
def test_names_have_no_dot_or_empty_segments(name: str) -> None:
    problems = problems_of(good(name=name))
    assert problems and problems[0].field == "name"
