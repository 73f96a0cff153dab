"""The task document: what a user pushes, what a worker runs.

Sisyphus's format (``image``, ``inputs``, ``outputs``, ``commands``) extended
with ``name``, ``after``, ``retries``, ``timeout``, ``priority``, ``env`` and
the storage mode (``storage`` + ``workdir``, hyperflow's cloud / nfs / local).

Three levels of path (sisyphus): *remote* ``bucket:path`` in a datastore,
*local* on the worker host (managed by the worker), *internal* where the
command sees the file (inside the container, or relative to the attempt's
work directory when there is no ``image``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import SchemaValidator
from pydantic_core import core_schema as cs

BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# not '-' first: a name is an argument of `boss logs NAME` and the like, never an option
NAME_RE = re.compile(r"[A-Za-z0-9_.:@+][A-Za-z0-9_.:@+/-]*")
# an image reference (registry/name:tag@digest): it is an argument of `podman run`, so
# no '-' first (it would be read as an option) and no blanks or shell metacharacters
IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]*")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# fullmatch everywhere: "$" would also match before a trailing newline
MAX_NAME = 200
MAX_PATH = 4096


@dataclass(frozen=True, order=True)
class RemotePath:
    """A ``bucket:path`` reference; ``is_dir`` when it ends in ``/``."""

    bucket: str
    path: str

    @property
    def is_dir(self) -> bool:
        return self.path.endswith("/")

    def __str__(self) -> str:
        return f"{self.bucket}:{self.path}"

    def contains(self, other: RemotePath) -> bool:
        """True when ``other`` is this path or lies under it (directories only)."""
        if self.bucket != other.bucket:
            return False
        if self.path == other.path or self.path.rstrip("/") == other.path.rstrip("/"):
            return True
        return self.is_dir and other.path.startswith(self.path)


def _check_relative(path: str, what: str) -> str:
    if not path:
        raise ValueError(f"{what} is empty")
    if len(path) > MAX_PATH:
        raise ValueError(f"{what} is longer than {MAX_PATH} characters")
    if "\x00" in path:
        raise ValueError(f"{what} contains a NUL byte")
    parts = path.split("/")
    if ".." in parts:
        raise ValueError(f"{what} contains '..'")
    return path


def parse_remote(key: str, default_bucket: str = "default") -> RemotePath:
    """Parse ``bucket:path`` (or a bare ``path`` in the default bucket)."""
    if "://" in key:
        raise ValueError(
            f"remote path {key!r} is a URL; name a bucket instead "
            "(`boss admin set-bucket NAME URL`, then use NAME:path)"
        )
    bucket, sep, path = key.partition(":")
    if not sep:
        bucket, path = default_bucket, key
    if not BUCKET_RE.fullmatch(bucket):
        raise ValueError(f"bucket name {bucket!r} is not valid (letters, digits, _ . -)")
    if path.startswith("/"):
        raise ValueError(f"remote path {key!r} must be relative to its bucket (no leading '/')")
    _check_relative(path.rstrip("/") or path, f"remote path {key!r}")
    if path in ("", "/"):
        raise ValueError(f"remote path {key!r} names no object")
    return RemotePath(bucket, path)


def check_internal(path: str) -> str:
    """An internal path: absolute (container) or relative (work dir), never with ``..``."""
    return _check_relative(path, f"internal path {path!r}")


class Command(BaseModel):
    """One command: an argv list and optional redirections to internal paths."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: list[str] = Field(min_length=1)
    stdin: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    shell: bool = Field(default=False, strict=True)  # "no" must not read as false

    @field_validator("command")
    @classmethod
    def _argv(cls, argv: list[str]) -> list[str]:
        for arg in argv:
            if "\x00" in arg:
                raise ValueError("an argument contains a NUL byte")
        if not argv[0]:
            raise ValueError("the program (first element) is empty")
        return argv

    @field_validator("stdin", "stdout", "stderr")
    @classmethod
    def _redirect(cls, path: str | None) -> str | None:
        return None if path is None else check_internal(path)


Storage = Literal["cloud", "nfs", "local"]


class TaskDocument(BaseModel):
    """A task as pushed. Unknown keys are refused so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)
    image: str | None = Field(default=None, min_length=1, max_length=512)
    inputs: dict[str, str] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    commands: list[Command] = Field(min_length=1)
    after: list[str] = Field(default_factory=list)
    # strict: "3" or true is a mistake to report, not a number to guess at
    retries: int = Field(default=0, ge=0, le=100, strict=True)
    timeout: float | None = Field(default=None, gt=0, strict=True, allow_inf_nan=False)
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000, strict=True)
    env: dict[str, str] = Field(default_factory=dict)
    storage: Storage = "cloud"
    workdir: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        if name is not None and not NAME_RE.fullmatch(name):
            raise ValueError(
                "a name may hold letters, digits and _ . : @ + - / and must not start with "
                "'/' or '-'"
            )
        if name is not None and any(part in ("", ".", "..") for part in name.split("/")):
            # names become path segments (logs): no empty, '.' or '..' segment
            raise ValueError("a name must not have an empty, '.' or '..' part between '/'")
        return name

    @field_validator("inputs", "outputs")
    @classmethod
    def _paths(cls, mapping: dict[str, str]) -> dict[str, str]:
        for remote, internal in mapping.items():
            try:
                parse_remote(remote)
                check_internal(internal)
            except ValueError as exc:
                raise ValueError(f"{remote!r}: {exc}") from None
        return mapping

    @field_validator("after")
    @classmethod
    def _after(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name:
                raise ValueError("an empty task name")
        return names

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not ENV_NAME_RE.fullmatch(key):
                raise ValueError(f"environment variable name {key!r} is not valid")
            if "\x00" in env[key]:
                raise ValueError(f"environment variable {key!r} contains a NUL byte")
        return env

    @field_validator("image", "workdir")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("contains a NUL byte")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, image: str | None) -> str | None:
        if image is not None and not IMAGE_RE.fullmatch(image):
            raise ValueError("an image reference holds letters, digits and _ . : @ / - "
                             "and starts with a letter or digit (e.g. docker.io/alpine:3.19)")
        return image

    @model_validator(mode="after")
    def _storage(self) -> TaskDocument:
        if self.storage != "cloud" and not self.workdir:
            raise ValueError(f"storage {self.storage!r} needs a 'workdir'")
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise ValueError("workdir must be an absolute path on the worker host")
        if self.workdir is not None and ".." in self.workdir.split("/"):
            raise ValueError("workdir contains '..'")
        return self

    def remote_inputs(self, default_bucket: str = "default") -> list[RemotePath]:
        return [parse_remote(k, default_bucket) for k in self.inputs]

    def remote_outputs(self, default_bucket: str = "default") -> list[RemotePath]:
        return [parse_remote(k, default_bucket) for k in self.outputs]

    @property
    def max_tries(self) -> int:
        return self.retries + 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one task: where and what."""

    where: str  # "task 'md5' (line 3)" or "line 7"
    field: str
    message: str

    def __str__(self) -> str:
        return problem(self.where, self.field, self.message)


def problem(where: str, field: str, message: str) -> str:
    """The one-line form of every push error: where, which field, what is wrong."""
    return f"{where}, field {field!r}: {message}" if field else f"{where}: {message}"


def describe(index: int, line: int | None, raw: Any) -> str:
    """How to name a task in an error: by its name when it has one, else its position."""
    pos = f"line {line}" if line is not None else f"#{index + 1}"
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        return f"task {raw['name']!r} ({pos})"
    return f"task {pos}"


def validate(raw: Any, where: str) -> tuple[TaskDocument | None, list[Problem]]:
    """Validate one raw (decoded JSON) document; every problem is reported."""
    if not isinstance(raw, dict):
        return None, [Problem(where, "", f"a task must be a JSON object, not {_kind(raw)}")]
    try:
        doc = TaskDocument.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (not part of the task document)"
            problems.append(Problem(where, loc, msg))
        return None, problems
    # Python's json decodes an escaped lone surrogate ("\ud800"); no UTF-8 holds one, so
    # neither the database nor a command line could take it later
    bad = _lone_surrogate(raw, "")
    if bad is not None:
        return None, [Problem(where, bad, "a string holds a lone surrogate (an unpaired "
                              "\\ud800-\\udfff escape), which is not valid UTF-8")]
    return doc, []


# --- the quick check: a yes/no for the push of millions of documents -------------------
#
# TaskDocument's Python field validators are two-thirds of its cost (about 5.5 us a
# document, of which 2 us is pydantic's own work). The schema below states the same
# rules as regular expressions and constraints that pydantic-core checks in Rust, into
# plain dicts (about 2.3 us). It only answers "certainly valid": whatever it refuses is
# judged by TaskDocument, which names the problem, so it may be stricter than the model
# (a ':' inside a remote path, a key over MAX_PATH characters) but never looser
# (tests/unit/test_quick_check.py holds it to that). Each pattern is anchored with ^ and
# $, which in Rust's regex engine match only at the ends (Python's $ also matches before
# a final newline); [^...] matches newlines too, as the Python checks allow them.

# a path segment that is not '..' (C: the characters a segment may hold)
def _segment(c: str, first: str) -> str:
    return rf"(?:\.|{first}{c}*|\.{first}{c}*|\.\.{c}+)"


_ISEG = _segment(r"[^/\x00]", r"[^./\x00]")
# check_internal(): no NUL, no '..' part (empty parts are fine: "/", "a//b")
_INTERNAL_RE = rf"^(?:{_ISEG})?(?:/(?:{_ISEG})?)*$"
# parse_remote(): [bucket:]path, the path relative (not '/' first), no '..' part, not
# empty; no ':' in the path, which keeps "://" (a URL) out without a look-ahead
_RSEG = _segment(r"[^/:\x00]", r"[^./:\x00]")
_REMOTE_RE = rf"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*:)?{_RSEG}(?:/(?:{_RSEG})?)*$"
# NAME_RE plus TaskDocument._name: parts between '/' neither empty, '.' nor '..', and
# the first character not '-'
_NC, _NX = r"[A-Za-z0-9_.:@+-]", r"[A-Za-z0-9_:@+-]"  # a name's characters; not '.'
_NSEG = rf"(?:\.{{3,}}|\.*{_NX}{_NC}*)"
_NFIRST = rf"(?:\.{{3,}}|\.+{_NX}{_NC}*|[A-Za-z0-9_:@+]{_NC}*)"
_NAME_RE = rf"^{_NFIRST}(?:/{_NSEG})*$"
_WORKDIR_RE = rf"^/(?:{_ISEG})?(?:/(?:{_ISEG})?)*$"  # absolute, no NUL, no '..' part
_NO_NUL_RE = r"^[^\x00]*$"


def _text(pattern: str | None = None, min_length: int | None = None,
          max_length: int | None = None) -> cs.StringSchema:
    return cs.str_schema(pattern=pattern, min_length=min_length, max_length=max_length,
                         regex_engine="rust-regex")


def _key(schema: cs.CoreSchema, required: bool = False) -> cs.TypedDictField:
    # no defaults: pydantic-core copies a mutable default for every document (3 us);
    # a key the document leaves out is left out of the dict
    return cs.typed_dict_field(schema, required=required)


def _quick_schema() -> cs.CoreSchema:
    internal = _text(_INTERNAL_RE, 1, MAX_PATH)
    paths = cs.dict_schema(_text(_REMOTE_RE, max_length=MAX_PATH), internal)
    command = cs.typed_dict_schema({
        # a program that is not empty, then any arguments; none holds a NUL
        "command": _key(cs.tuple_schema([_text(_NO_NUL_RE, 1), _text(_NO_NUL_RE)],
                                        variadic_item_index=1), required=True),
        "stdin": _key(cs.nullable_schema(internal)),
        "stdout": _key(cs.nullable_schema(internal)),
        "stderr": _key(cs.nullable_schema(internal)),
        "shell": _key(cs.bool_schema(strict=True)),
    }, extra_behavior="forbid")
    return cs.typed_dict_schema({
        "name": _key(cs.nullable_schema(_text(_NAME_RE, 1, MAX_NAME))),
        "image": _key(cs.nullable_schema(_text(IMAGE_RE.pattern.join("^$"), 1, 512))),
        "inputs": _key(paths),
        "outputs": _key(paths),
        "commands": _key(cs.list_schema(command, min_length=1), required=True),
        "after": _key(cs.list_schema(_text(min_length=1))),
        "retries": _key(cs.int_schema(ge=0, le=100, strict=True)),
        "timeout": _key(cs.nullable_schema(
            cs.float_schema(gt=0, strict=True, allow_inf_nan=False))),
        "priority": _key(cs.int_schema(ge=-1_000_000, le=1_000_000, strict=True)),
        "env": _key(cs.dict_schema(_text(ENV_NAME_RE.pattern.join("^$")),
                                   _text(_NO_NUL_RE))),
        "storage": _key(cs.literal_schema(["cloud", "nfs", "local"])),
        "workdir": _key(cs.nullable_schema(_text(_WORKDIR_RE))),
    }, extra_behavior="forbid")


_QUICK = SchemaValidator(_quick_schema())


def quick_check_json(data: bytes | str) -> dict[str, Any] | None:
    """A JSON document as a plain dict when it is certainly valid, else None.

    None says only "not certainly": :class:`TaskDocument` then decides, and names
    what is wrong. Keys the document leaves out are absent from the dict (read
    them with the defaults of TaskDocument); ``commands[i]["command"]`` is a tuple.
    """
    try:
        doc: dict[str, Any] = _QUICK.validate_json(data)
    except ValidationError:
        return None
    # TaskDocument._storage, the one rule across fields (the workdir's own rules are in
    # its pattern)
    if doc.get("storage", "cloud") != "cloud" and not doc.get("workdir"):
        return None
    return doc


def _lone_surrogate(value: Any, loc: str) -> str | None:
    """Where (as a field path) a string cannot be encoded in UTF-8; None if nowhere.

    Only called on a valid document, whose nesting is a few levels deep."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return loc
        return None
    items: Any = (value.items() if isinstance(value, dict)
                  else enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        here = f"{loc}.{key}" if loc else str(key)
        if isinstance(key, str) and _lone_surrogate(key, here) is not None:
            return loc or here
        found = _lone_surrogate(item, here)
        if found is not None:
            return found
    return None


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)
