"""Checking task documents: each one becomes a small record, or its problems.

A checked document is a record, a plain tuple that marshals small (helper
processes send them back through a pipe, see :mod:`boss.push.helpers`):

    (OK, line, name, priority, max_tries, after, outputs, inputs)
        line is None for a JSON array; outputs and inputs are (bucket, path) pairs
    (BAD, counted, [problem, ...])
        counted: the text was a JSON value, so it takes a position (as in "#3")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from protocol.document import RemotePath, TaskDocument, describe, quick_check_json, validate

MAX_LINE_BYTES = 1_000_000  # one task document; far larger means a mistake
# Python's json gives up about 1,000 levels down; a task document is 4 levels deep
TOO_DEEP = "not valid JSON for a task: arrays or objects nested too deeply"

OK, BAD = 0, 1
Record = tuple[Any, ...]


def _pairs(paths: list[RemotePath]) -> tuple[tuple[str, str], ...]:
    return tuple((p.bucket, p.path) for p in paths)


def _record(doc: TaskDocument, line: int | None, default_bucket: str) -> Record:
    outs = _pairs(doc.remote_outputs(default_bucket)) if doc.outputs else ()
    ins = _pairs(doc.remote_inputs(default_bucket)) if doc.inputs else ()
    return (OK, line, doc.name, doc.priority, doc.retries + 1, doc.after, outs, ins)


def _quick_pairs(paths: dict[str, str], default_bucket: str) -> tuple[tuple[str, str], ...]:
    """parse_remote() of keys the quick check passed: only the split is left to do."""
    out = []
    for key in paths:
        bucket, sep, path = key.partition(":")
        out.append((bucket, path) if sep else (default_bucket, key))
    return tuple(out)


def _quick_record(doc: dict[str, Any], line: int, default_bucket: str) -> Record:
    """The record of a document that quick_check_json() passed (TaskDocument's defaults)."""
    get = doc.get
    outs = get("outputs")
    ins = get("inputs")
    return (OK, line, get("name"), get("priority", 0), get("retries", 0) + 1,
            get("after", []), _quick_pairs(outs, default_bucket) if outs else (),
            _quick_pairs(ins, default_bucket) if ins else ())


def check_value(raw: Any, index: int, line: int | None, default_bucket: str) -> Record:
    """Validate one decoded document the careful way (every problem reported)."""
    doc, errs = validate(raw, describe(index, line, raw))
    if doc is None:
        return (BAD, True, [str(e) for e in errs])
    return _record(doc, line, default_bucket)


def check_lines(data: bytes, first_line: int, default_bucket: str) -> list[Record]:
    """Check a run of whole JSON lines; one record per line that is not blank.

    The quick path (:func:`protocol.document.quick_check_json`, pydantic-core
    alone) passes almost every valid line; what it does not pass goes to
    TaskDocument's own JSON validation, which accepts exactly what it accepted
    before there was a quick path; anything that refuses is decoded and
    validated again the careful way, so a bad document is described exactly as
    it would be otherwise (and one pydantic refuses only because of its JSON
    parser, such as a lone surrogate, is judged by Python's ``json`` as before).
    """
    out: list[Record] = []
    quick = quick_check_json
    fast = TaskDocument.model_validate_json
    lines = data.split(b"\n")
    # the last piece is b"" when data ends with a newline, else a line without one
    unterminated = len(lines) - 1 if lines[-1] else -1
    if not lines[-1]:
        lines.pop()
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        lineno = first_line + k
        size = len(line) + (k != unterminated)
        if size > MAX_LINE_BYTES:
            # _line_chunks() cut a longer line short: "more than", not its size
            out.append((BAD, False, [f"line {lineno}: a task of more than {MAX_LINE_BYTES} "
                                     "bytes (one task a line; is this a JSON-lines file?)"]))
            continue
        found = quick(line)
        if found is not None:
            out.append(_quick_record(found, lineno, default_bucket))
            continue
        try:
            doc = fast(line)
        except ValidationError:
            pass
        else:
            out.append(_record(doc, lineno, default_bucket))
            continue
        try:  # with its newline, as in a message's "line 2 column 1" for an unclosed '{'
            raw = json.loads((line + b"\n" if k != unterminated else line).decode("utf-8"))
        except UnicodeDecodeError as exc:
            out.append((BAD, False, [f"line {lineno}: not valid UTF-8 at byte {exc.start} "
                                     "of the line"]))
            continue
        except json.JSONDecodeError as exc:
            out.append((BAD, False, [f"line {lineno} column {exc.colno}: not valid JSON: "
                                     f"{exc.msg}"]))
            continue
        except RecursionError:
            out.append((BAD, False, [f"line {lineno}: {TOO_DEEP}"]))
            continue
        out.append(check_value(raw, 0, lineno, default_bucket))
    return out


@dataclass
class Chunk:
    """Checked documents, one record each, and their text (as the user wrote it)."""

    records: list[Record]
    data: bytes = b""  # JSON lines: the lines
    docs: list[Any] | None = None  # JSON array: the decoded documents

    def texts(self) -> list[str]:
        """One text per record (pass one found every document valid)."""
        if self.docs is not None:
            return [json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
                    for raw in self.docs]
        # the same lines as check_lines() took: every one is a valid document here, so
        # no line is blank to str.strip() and not to bytes.strip() or the other way round
        return [text for text in map(str.strip, self.data.decode("utf-8").split("\n"))
                if text]

