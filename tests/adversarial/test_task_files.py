"""Malformed push files: each refused with one line per problem, the database untouched.

The corpus (``corpus/``, one small file per case, named for what is wrong)
covers wrong types, missing fields, huge fields, deep nesting, invalid UTF-8,
NUL bytes, unknown keys, absolute and ``..`` paths and shell metacharacters
where they are dangerous. tests/acceptance/test_bad_input.py has the cases it
does not repeat (broken JSON, a cycle, duplicates, a Latin-1 byte, missing
files, bad settings).

Every file is pushed through :meth:`boss.service.Boss.push` (the code behind
``boss push-tasks``) into a database seeded with three tasks; the error must
list each problem on a line of its own that names the file, then the task (by
name and line, or by position) and the field, or the line and byte for text
that is not JSON; the database is compared row by row after every push. A
sample goes through the ``boss`` command too (exit 2, no traceback).

Shell metacharacters are refused where something could read them as syntax:
task names (arguments of ``boss logs NAME``, path segments), image references
(an argument of ``podman run``: ``--privileged`` would be an option), bucket
and environment variable names. They are accepted, and stored as written, in
commands, environment values and paths inside a bucket or the work directory:
a command is an argv list executed without a shell (``shell: true`` is the
user asking for one, to run their own pipeline), and paths reach only
``open()``, fsspec and ``podman --mount`` (which refuses ',').

A 1 GiB file (sparse) is refused by its size when it is over ``[boss]
max_push_bytes`` without being read, and, under the limit, without being held
in memory: a line longer than a task may be is cut short and skipped.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from boss.errors import PushError
from boss.push import MAX_LINE_BYTES
from boss.service import Boss
from protocol.settings import load_settings
from tests.acceptance.helpers import (
    PARALLEL,
    TIMEOUT,
    Cli,
    db_path,
    seed,
    snapshot,
    task,
    write_settings,
)

CORPUS = Path(__file__).parent / "corpus"
GOOD = [task("seeded1", outputs={"data:seeded/out.txt": "out.txt"}),
        task("seeded2", after=["seeded1"]), task("seeded3")]
GIB = 1 << 30

# file -> (how the first problem starts: where, and the field; something it says)
EXPECTED: dict[str, tuple[str, str]] = {
    # wrong types (strict: "3", true and 1.5 are not numbers to guess at)
    "wrong-type-name-number.jsonl": ("task line 2, field 'name'", "valid string"),
    "wrong-type-retries-string.jsonl": ("task 'r' (line 1), field 'retries'", "valid integer"),
    "wrong-type-retries-bool.jsonl": ("task 'rb' (line 1), field 'retries'", "valid integer"),
    "wrong-type-priority-float.jsonl": ("task 'p' (line 1), field 'priority'", "valid integer"),
    "wrong-type-timeout-string.jsonl": ("task 'to' (line 1), field 'timeout'", "valid number"),
    "wrong-type-env-list.jsonl": ("task 'e' (line 1), field 'env'", "valid dictionary"),
    "wrong-type-env-value-number.jsonl": ("task 'ev' (line 1), field 'env.N'", "valid string"),
    "wrong-type-inputs-list.jsonl": ("task 'i' (line 1), field 'inputs'", "valid dictionary"),
    "wrong-type-after-string.jsonl": ("task 'a' (line 2), field 'after'", "valid list"),
    "wrong-type-argument-number.jsonl": ("task 'argn' (line 1), field 'commands.0.command.1'",
                                         "valid string"),
    "wrong-type-shell-string.jsonl": ("task 'sh' (line 1), field 'commands.0.shell'",
                                      "valid boolean"),
    "wrong-type-storage.jsonl": ("task 'st' (line 1), field 'storage'", "'cloud', 'nfs' or"),
    "wrong-type-document-null.jsonl": ("task line 1", "must be a JSON object, not null"),
    "wrong-type-document-string.json": ("task #2", "must be a JSON object, not a string"),
    "wrong-type-array-of-arrays.json": ("task #1", "must be a JSON object, not an array"),
    "wrong-type-top-level-object.json": ("task line 1, field 'commands'", "Field required"),
    # out of range
    "range-retries-negative.jsonl": ("task 'rn' (line 1), field 'retries'", "greater than"),
    "range-retries-huge.jsonl": ("task 'rh' (line 1), field 'retries'", "less than or equal"),
    "range-priority-huge.jsonl": ("task 'ph' (line 1), field 'priority'", "less than or equal"),
    "range-timeout-zero.jsonl": ("task 'tz' (line 1), field 'timeout'", "greater than 0"),
    "range-timeout-nan.jsonl": ("task 'tn' (line 1), field 'timeout'", "finite number"),
    "range-timeout-infinity.jsonl": ("task 'ti' (line 1), field 'timeout'", "finite number"),
    "range-timeout-overflow.jsonl": ("task 'tov' (line 1), field 'timeout'", "finite number"),
    # missing fields
    "missing-commands.jsonl": ("task 'nocmd' (line 1), field 'commands'", "Field required"),
    "missing-command-in-command.jsonl": ("task 'nocmd2' (line 1), field 'commands.0.command'",
                                         "Field required"),
    "missing-empty-commands.jsonl": ("task 'nocmd3' (line 1), field 'commands'",
                                     "at least 1 item"),
    "missing-empty-argv.jsonl": ("task 'noargv' (line 1), field 'commands.0.command'",
                                 "at least 1 item"),
    "missing-empty-program.jsonl": ("task 'noprog' (line 1), field 'commands.0.command'",
                                    "the program (first element) is empty"),
    "missing-empty-name.jsonl": ("task '' (line 1), field 'name'", "at least 1 character"),
    "missing-empty-object.jsonl": ("task line 1, field 'commands'", "Field required"),
    # a rule across two fields: the message names the field
    "missing-workdir-for-nfs.jsonl": ("task 'nfs' (line 1)", "storage 'nfs' needs a 'workdir'"),
    # huge fields
    "huge-name.jsonl": (f"task '{'n' * 201}' (line 1), field 'name'", "at most 200 characters"),
    "huge-image.jsonl": ("task 'img' (line 1), field 'image'", "at most 512 characters"),
    "huge-internal-path.jsonl": ("task 'hp' (line 1), field 'inputs'",
                                 "longer than 4096 characters"),
    "huge-remote-path.jsonl": ("task 'hr' (line 1), field 'outputs'",
                               "longer than 4096 characters"),
    # unknown keys (a key holding a newline is shown escaped: still one line)
    "unknown-key-top-level.jsonl": ("task 'typo' (line 1), field 'comands'", "unknown key"),
    "unknown-key-in-command.jsonl": ("task 'typo2' (line 1), field 'commands.0.stdot'",
                                     "unknown key"),
    "unknown-key-with-newline.jsonl": ("task 'typo3' (line 1), field 'evil\\nkey'",
                                       "unknown key"),
    # absolute and '..' paths
    "path-dotdot-stdin.jsonl": ("task 'dd-stdin' (line 1), field 'commands.0.stdin'",
                                "contains '..'"),
    "path-dotdot-stderr-absolute.jsonl": (
        "task 'dd-stderr' (line 1), field 'commands.0.stderr'", "contains '..'"),
    "path-dotdot-output-internal.jsonl": ("task 'dd-out' (line 1), field 'outputs'",
                                          "contains '..'"),
    "path-dotdot-workdir.jsonl": ("task 'dd-wd' (line 1)", "workdir contains '..'"),
    "path-relative-workdir.jsonl": ("task 'rel-wd' (line 1)", "workdir must be an absolute"),
    "path-absolute-remote-output.jsonl": ("task 'abs-out' (line 1), field 'outputs'",
                                          "relative to its bucket (no leading '/')"),
    "path-bucket-dotdot.jsonl": ("task 'bkt' (line 1), field 'inputs'",
                                 "bucket name '..' is not valid"),
    "path-bucket-root-only.jsonl": ("task 'root' (line 1), field 'inputs'",
                                    "relative to its bucket"),
    "path-url-sftp.jsonl": ("task 'url' (line 1), field 'outputs'", "is a URL"),
    "path-name-dotdot.jsonl": ("task 'a/../../b' (line 1), field 'name'", "'..' part"),
    "path-name-absolute.jsonl": ("task '/etc/passwd' (line 1), field 'name'",
                                 "must not start with '/'"),
    # NUL bytes: raw ones are not JSON (line and column); escaped ones are refused per field
    "nul-raw-in-string.jsonl": ("line 1 column 14", "not valid JSON: Invalid control"),
    "nul-raw-between-lines.jsonl": ("line 2 column 1", "not valid JSON"),
    "nul-escaped-argument.jsonl": ("task 'nul-arg' (line 1), field 'commands.0.command'",
                                   "NUL byte"),
    "nul-escaped-env-value.jsonl": ("task 'nul-env' (line 1), field 'env'", "NUL byte"),
    "nul-escaped-env-name.jsonl": ("task 'nul-envk' (line 1), field 'env'",
                                   "name 'A\\x00B' is not valid"),
    "nul-escaped-image.jsonl": ("task 'nul-img' (line 1), field 'image'", "NUL byte"),
    "nul-escaped-input.jsonl": ("task 'nul-in' (line 1), field 'inputs'", "NUL byte"),
    "nul-escaped-stdout.jsonl": ("task 'nul-out' (line 1), field 'commands.0.stdout'",
                                 "NUL byte"),
    "nul-escaped-name.jsonl": ("task 'nul\\x00name' (line 1), field 'name'", "a name may hold"),
    "nul-escaped-workdir.jsonl": ("task 'nul-wd' (line 1), field 'workdir'", "NUL byte"),
    # invalid UTF-8: the line and the byte offset in the file
    "utf8-overlong-slash.jsonl": ("line 2", "not valid UTF-8 at byte 14 of the line"),
    "utf8-encoded-surrogate.jsonl": ("line 1", "not valid UTF-8 at byte 13 of the line"),
    "utf8-truncated-at-end.jsonl": ("line 2", "not valid UTF-8 at byte 43 of the line"),
    "utf8-bom.jsonl": ("line 1 column 1", "Unexpected UTF-8 BOM"),
    # valid JSON, but no UTF-8 can hold it (nor the database, nor an argv)
    "utf8-escaped-lone-surrogate.jsonl": (
        "task 'esc' (line 1), field 'commands.0.command.1'", "lone surrogate"),
    # deep nesting: Python's json gives up (RecursionError); a one-line error, no traceback
    "deep-nesting-line.jsonl": ("line 2", "nested too deeply"),
    "deep-nesting-env.jsonl": ("line 1", "nested too deeply"),
    "deep-nesting-array.json": ("not valid JSON for a task", "nested too deeply"),
    # shell metacharacters where they would be syntax
    "shell-name-semicolon.jsonl": ("task 'x; rm -rf ~' (line 1), field 'name'",
                                   "a name may hold"),
    "shell-name-substitution.jsonl": ("task '$(reboot)' (line 1), field 'name'",
                                      "a name may hold"),
    "shell-name-backtick.jsonl": ("task '`id`' (line 1), field 'name'", "a name may hold"),
    "shell-name-pipe-newline.jsonl": ("task 'a|b\\nc' (line 1), field 'name'",
                                      "a name may hold"),
    "shell-dash-name.jsonl": ("task '-rf' (line 1), field 'name'", "or '-'"),
    "shell-env-name.jsonl": ("task 'envname' (line 1), field 'env'",
                             "name 'PATH;id' is not valid"),
    "shell-image-option.jsonl": ("task 'opt' (line 1), field 'image'", "an image reference"),
    "shell-image-semicolon.jsonl": ("task 'semi' (line 1), field 'image'",
                                    "an image reference"),
    "shell-image-space.jsonl": ("task 'space' (line 1), field 'image'", "an image reference"),
    "shell-bucket-name.jsonl": ("task 'bucketsh' (line 1), field 'inputs'",
                                "bucket name '$(id)' is not valid"),
}

# through the `boss` command as well: the ones that used to end in a traceback or pass
CLI_SAMPLE = ["deep-nesting-array.json", "utf8-escaped-lone-surrogate.jsonl",
              "unknown-key-with-newline.jsonl"]

# what a problem line may start with: a task (by name and position, or position), or
# a place in the text
WHERE_RE = re.compile(r"(task ('.*' \((line \d+|#\d+)\)|line \d+|#\d+)"
                      r"|line \d+( column \d+)?: )")


@dataclass
class Seeded:
    root: Path
    cli: Cli
    boss: Boss
    before: dict[str, list[tuple[Any, ...]]]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    root = tmp_path_factory.mktemp("adversarial")
    cli = Cli(root, write_settings(root))
    seed(cli, GOOD)
    boss = Boss(load_settings(str(cli.settings), environ={}, cwd=root))
    try:
        yield Seeded(root, cli, boss, snapshot(db_path(root)))
    finally:
        boss.close()


def test_the_corpus_and_its_expectations_match() -> None:
    files = {p.name for p in CORPUS.iterdir()}
    assert files == set(EXPECTED), (files ^ set(EXPECTED))
    assert all(p.stat().st_size < 64 * 1024 for p in CORPUS.iterdir())


def refusal(boss: Boss, path: Path) -> PushError:
    with pytest.raises(PushError) as caught:
        boss.push(path)
    return caught.value


def check_lines(err: PushError, source: str) -> None:
    """One line per problem, each naming the file; the last says nothing was pushed."""
    lines = str(err).splitlines()
    assert lines == [f"{source}: {p}" for p in err.problems] + [f"{source}: nothing was pushed"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_refused_with_one_line_naming_task_and_field(name: str, seeded: Seeded) -> None:
    path = CORPUS / name
    err = refusal(seeded.boss, path)
    check_lines(err, str(path))
    for p in err.problems:
        assert WHERE_RE.match(p) or p.startswith("not valid JSON for a task"), p
    where, says = EXPECTED[name]
    first = err.problems[0]
    assert first.startswith(where + ": ") or first.startswith(where + ", "), first
    assert says in first, first
    # nothing half-pushed: every row of every table as it was
    assert snapshot(db_path(seeded.root)) == seeded.before


def test_the_boss_command_prints_them_without_a_traceback(seeded: Seeded) -> None:
    def one(name: str) -> tuple[str, Any]:
        here = Cli(CORPUS, seeded.cli.settings)
        return name, here.run("push-tasks", name)  # Cli.run fails on a traceback

    with ThreadPoolExecutor(PARALLEL) as pool:
        ran = list(pool.map(one, CLI_SAMPLE))
    for name, r in ran:
        assert r.code == 2, str(r)
        errors = r.stderr.splitlines()
        assert all(line.startswith(f"error: {name}: ") for line in errors), str(r)
        assert errors[-1] == f"error: {name}: nothing was pushed", str(r)
        assert EXPECTED[name][1] in r.stderr, str(r)
    assert snapshot(db_path(seeded.root)) == seeded.before


# --- the 1 GiB file -------------------------------------------------------------------

def sparse(path: Path, head: bytes, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk: ``head`` then zeros (truncate -s)."""
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return path


# runs `boss` and prints the largest peak RSS (KiB) among it and its helper processes
PEAK = ("import resource, subprocess, sys\n"
        f"p = subprocess.run(sys.argv[1:], capture_output=True, timeout={TIMEOUT})\n"
        "sys.stderr.buffer.write(p.stderr)\n"
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")


def push_measured(cli: Cli, name: str, env: dict[str, str]) -> tuple[int, int, str]:
    """``boss push-tasks NAME`` in cli.cwd: exit code, peak RSS in bytes, stderr."""
    proc = subprocess.run([sys.executable, "-c", PEAK, *cli.command(["push-tasks", name])],
                          cwd=cli.cwd, capture_output=True, timeout=TIMEOUT + 30,
                          check=False, env={**cli.env, **env})
    code, kib = proc.stdout.split()
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    return int(code), int(kib) * 1024, stderr


@pytest.mark.parametrize(("head", "limit", "message"), [
    # over the limit: refused by its size, before a byte is read (reading would find
    # the over-long line below instead)
    (b"", str(GIB // 2), f"error: huge: the file is {GIB} bytes, over the limit of "
                         f"{GIB // 2} bytes ([boss] max_push_bytes"),
    # under the default limit: JSON lines, one line of 1 GiB; cut short, not read whole
    (b"", None, f"error: huge: line 1: a task of more than {MAX_LINE_BYTES} bytes"),
    # a JSON array is read whole, so it has its own, smaller bound
    (b"[", None, f"error: huge: a JSON array of {GIB} bytes is too large to read at once"),
], ids=["over-the-limit", "no-newline", "array"])
def test_a_1gib_file_is_refused_without_reading_it_into_memory(
        head: bytes, limit: str | None, message: str, seeded: Seeded, tmp_path: Path) -> None:
    sparse(tmp_path / "huge", head, GIB)
    cli = Cli(tmp_path, seeded.cli.settings)
    env = {"ECLOUD_BOSS_MAX_PUSH_BYTES": limit} if limit else {}
    code, peak, stderr = push_measured(cli, "huge", env)
    print(f"\n1 GiB file ({head[:12]!r}...): exit {code}, peak RSS {peak / 2**20:.0f} MiB")
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(message), stderr
    assert lines[1] == "error: huge: nothing was pushed"
    # the interpreter and the boss's imports take ~100 MiB; the file would take 1 GiB more
    assert peak < 400 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB"
    assert snapshot(db_path(seeded.root)) == seeded.before


def test_lines_after_an_over_long_one_keep_their_numbers(seeded: Seeded, tmp_path: Path
                                                       ) -> None:
    """The rest of an over-long line is skipped unread; the lines after it are still
    checked, and named by their true line numbers."""
    path = tmp_path / "long.jsonl"
    with path.open("wb") as f:
        f.write(json.dumps(task("first")).encode() + b"\n")
        f.write(b'{"name": "long", "env": {"X": "' + b"x" * (3 * MAX_LINE_BYTES) + b'"}}\n')
        f.write(json.dumps(task("third", retries="2")).encode() + b"\n")
        f.write(b"\xff\n")
    err = refusal(seeded.boss, path)
    check_lines(err, str(path))
    assert err.problems == [
        f"line 2: a task of more than {MAX_LINE_BYTES} bytes (one task a line; is this a "
        "JSON-lines file?)",
        "task 'third' (line 3), field 'retries': Input should be a valid integer",
        "line 4: not valid UTF-8 at byte 0 of the line"]
    assert snapshot(db_path(seeded.root)) == seeded.before


class Endless(io.RawIOBase):
    """Standard input that never ends: lines of a valid task, forever."""

    LINE = (json.dumps(task("again")) + "\n").encode()

    def __init__(self) -> None:
        self.given = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = len(buffer)
        data = (self.LINE * (n // len(self.LINE) + 1))[:n]
        buffer[:n] = data
        self.given += n
        return n


def test_standard_input_over_the_limit_is_cut_off(seeded: Seeded) -> None:
    """An endless standard input is spooled only to the limit, refused, and the spool removed."""
    limit = 100_000
    s = seeded.boss.settings.model_copy(deep=True)
    s.boss.max_push_bytes = limit
    boss = Boss(s)
    spool = Path(s.worker.workdir).parent / "spool"
    stream = Endless()
    try:
        with pytest.raises(PushError) as caught:
            boss.push(None, stdin=io.BufferedReader(stream))
    finally:
        boss.close()
    check_lines(caught.value, "<stdin>")
    assert caught.value.problems == [
        f"standard input holds more than {limit} bytes, over the limit of {limit} bytes "
        "([boss] max_push_bytes, ECLOUD_BOSS_MAX_PUSH_BYTES); split it into several "
        "pushes or raise the limit"]
    assert limit < stream.given <= limit + 1 + (1 << 20)
    assert not any(spool.iterdir())
    assert snapshot(db_path(seeded.root)) == seeded.before


# --- metacharacters where they are legal ------------------------------------------------

def test_shell_metacharacters_in_commands_env_values_and_paths_are_accepted(
        tmp_path: Path) -> None:
    """Stored exactly as written: commands are argv lists (no shell unless asked), env
    values are values, and paths only ever reach open(), fsspec and --mount."""
    docs: list[dict[str, Any]] = [
        {"name": "argv", "commands": [{"command": ["echo", "$(id)", "`id`", "a;b", "|", "&&",
                                                   "> /etc/passwd", "*", "~", "'\"\\"]}]},
        {"name": "asked-for-a-shell", "commands": [
            {"command": ["echo $HOME; ls | wc -l > count.txt && cat < count.txt"],
             "shell": True}]},
        {"name": "env", "env": {"A": "$(reboot); `id` | & > <"},
         "commands": [{"command": ["true"]}]},
        {"name": "paths", "inputs": {"data:in/$(id) ;|&.txt": "in/$x y;z.txt"},
         "outputs": {"data:out/`id`.txt": "/abs/inside-the-work-dir.txt"},
         "commands": [{"command": ["true"], "stdout": "out/$HOME.txt"}]},
        {"name": "image", "image": "registry.example:5000/team/tool-1.2_x:v1.0@sha256:"
                                   + "0" * 64, "commands": [{"command": ["true"]}]},
    ]
    root = tmp_path / "ok"
    root.mkdir()
    cli = Cli(root, write_settings(root))
    seed(cli, [])
    boss = Boss(load_settings(str(cli.settings), environ={}, cwd=root))
    path = root / "ok.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    try:
        assert boss.push(path).pushed == len(docs)
        for d in docs:
            shown = boss.show(str(d["name"]))
            assert shown["document"] == d, shown
    finally:
        boss.close()
