"""The wire protocol between worker and boss: newline-delimited JSON.

A request is ``{"v": 1, "id": N, "call": NAME, "args": {...}}``; its reply is
``{"id": N, "ok": true, "result": {...}}`` or
``{"id": N, "ok": false, "error": {"code": CODE, "message": TEXT}}``.
The first call on a connection is ``hello`` with the worker's token; the
connection is then bound to that worker.

Calls and their arguments / results:

``hello``      token, host, pid, slots, version
               -> worker_id, name, lease_seconds, heartbeat_seconds,
                  buckets {name: url}, default_bucket
``pop``        n (free slots)
               -> {"tasks": [Assignment...]} | {"none": true, "retry_after": s}
                  | {"drain": true}
``heartbeat``  attempts [attempt ids]  -> {"cancel": [attempt ids]}, and
                  "adopt": [Assignment...] when attempts were claimed for the
                  worker whose reply it never got (it runs them)
``event``      events [{attempt_id, kind, data {...}, ts}]  (batched by the worker)
               -> {"not_current": [attempt ids whose events were dropped]}
``complete``   attempt_id, outcome, exit_status, reason, metrics, stdout_tail,
               stderr_tail  -> {"accepted": true, "task_state": S}  (error
               ``not_current`` when the attempt was lost or cancelled: the
               attempt id fences); with ``events`` (still queued) and ``pop``
               (n more tasks for the freed slot), the pop's reply too.
               Batched: ``results`` [up to 1024 of those] instead, with
               ``events`` and ``pop`` -> {"results": [{"accepted": true,
               "task_state": S} | {"accepted": false, "error": {code,
               message}}, one per result], and the pop's reply}: a refused
               result is said in its place, not as the call's error.
``goodbye``    reason -> {}
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import Code, ProtocolError

VERSION = 1
MAX_LINE = 16 * 1024 * 1024  # one message; a task document is far smaller
MAX_RESULTS = 1024  # results in one batched complete
CALLS = frozenset({"hello", "pop", "heartbeat", "event", "complete", "goodbye"})
OUTCOMES = frozenset({"succeeded", "failed", "timeout", "cancelled"})


@dataclass(frozen=True)
class Request:
    id: int
    call: str
    args: dict[str, Any] = field(default_factory=dict)


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def request(id: int, call: str, args: dict[str, Any] | None = None) -> bytes:
    return encode({"v": VERSION, "id": id, "call": call, "args": args or {}})


def ok(id: int | None, result: dict[str, Any]) -> bytes:
    return encode({"id": id, "ok": True, "result": result})


def ok_json(id: int | None, result: str) -> bytes:
    """A reply whose result is already encoded: a JSON object's text, on one line.

    The boss hands task documents out as the text it stored, spliced in
    rather than decoded and encoded again for every task it hands out."""
    return f'{{"id":{"null" if id is None else int(id)},"ok":true,"result":{result}}}\n'.encode()


def error(id: int | None, code: Code | str, message: str) -> bytes:
    return encode({"id": id, "ok": False, "error": {"code": str(code), "message": message}})


# a \uD800-\uDFFF escape: most are halves of a pair, which is fine; an unpaired one
# decodes to a str that no UTF-8 (the database, a log) can hold
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


# built once: json.loads with hooks builds a decoder per call, on every request
_STRICT = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


def _loads(line: bytes, strict: bool = True) -> Any:
    """json.loads, strict (no NaN or Infinity) unless told; deep nesting is a ValueError."""
    try:
        if not strict:
            return json.loads(line)
        # decoded as json.loads decodes bytes
        return _STRICT.decode(line.decode(json.detect_encoding(line), "surrogatepass"))
    except RecursionError:
        raise ValueError("arrays or objects nested too deeply") from None


def parse_request(line: bytes) -> Request:
    """Decode one request line; raise ProtocolError (never anything else)."""
    try:
        obj = _loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(Code.MALFORMED, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(Code.MALFORMED, "a request must be a JSON object")
    if _SURROGATE_ESCAPE.search(line):
        try:
            encode(obj)
        except UnicodeEncodeError:
            raise ProtocolError(Code.MALFORMED, "a string holds an unpaired surrogate "
                                "escape, which is not valid UTF-8") from None
    rid = obj.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolError(Code.MALFORMED, "'id' must be an integer")
    version = obj.get("v")
    if type(version) is not int or version != VERSION:  # true == 1 in Python, not in JSON
        raise ProtocolError(Code.VERSION, f"protocol version {obj.get('v')!r} unsupported "
                            f"(this boss speaks {VERSION})")
    call = obj.get("call")
    if not isinstance(call, str) or call not in CALLS:
        raise ProtocolError(Code.UNKNOWN_CALL, f"unknown call {call!r}")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(Code.MALFORMED, "'args' must be a JSON object")
    return Request(rid, call, args)


def request_id(line: bytes) -> int | None:
    """Best effort: the id of a request that failed to parse, for the error reply."""
    return message_id(decode(line))


def decode(line: bytes) -> Any:
    """A line's JSON value (NaN and Infinity allowed), or None when it is not JSON."""
    try:
        return _loads(line, strict=False)
    except (ValueError, UnicodeDecodeError):
        return None


def message_id(obj: Any) -> int | None:
    """The integer ``id`` of a decoded request or reply, or None."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


def parse_reply(line: bytes) -> tuple[int | None, dict[str, Any]]:
    """Decode a reply; return (id, result) or raise ProtocolError for an error reply."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(Code.MALFORMED, f"reply is not JSON: {exc}") from None
    return reply_of(obj)


def reply_of(obj: Any) -> tuple[int | None, dict[str, Any]]:
    """:func:`parse_reply` of a reply already decoded (by :func:`decode`)."""
    if not isinstance(obj, dict) or "ok" not in obj:
        raise ProtocolError(Code.MALFORMED, "reply is not a reply object")
    if not obj["ok"]:
        err = obj.get("error") or {}
        raise ProtocolError(str(err.get("code", Code.INTERNAL)), str(err.get("message", "")))
    result = obj.get("result")
    return obj.get("id"), result if isinstance(result, dict) else {}


def arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Fetch and type-check one argument; a wrong one is a MALFORMED error."""
    if name not in args:
        if default is ...:
            raise ProtocolError(Code.MALFORMED, f"missing argument {name!r}")
        return default
    value = args[name]
    # bool is an int to isinstance(): true must not pass for 1, wherever a number is asked
    # for (alone or with None, as exit_status is)
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError(Code.MALFORMED, f"argument {name!r} must be a number")
    if not isinstance(value, kind):
        raise ProtocolError(Code.MALFORMED, f"argument {name!r} has the wrong type")
    if isinstance(value, int) and not fits_int64(value):
        raise ProtocolError(Code.MALFORMED, f"argument {name!r} is out of range")
    return value


def fits_int64(value: int) -> bool:
    """Whether an integer fits the database's 64-bit columns (ids, statuses)."""
    return -(2**63) <= value < 2**63


@dataclass(frozen=True)
class Assignment:
    """One task handed to a worker: the attempt id is its fencing token."""

    attempt_id: int
    task_id: int
    name: str
    number: int  # 1 for the first try
    document: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"attempt_id": self.attempt_id, "task_id": self.task_id, "name": self.name,
                "number": self.number, "document": self.document}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Assignment:
        return cls(int(obj["attempt_id"]), int(obj["task_id"]), str(obj["name"]),
                   int(obj["number"]), dict(obj["document"]))


@dataclass
class Result:
    """What a worker reports for an attempt."""

    attempt_id: int
    outcome: str  # one of OUTCOMES
    exit_status: int | None = None
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # wall, cpu, max_rss, bytes_in...
    stdout_tail: str = ""
    stderr_tail: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"attempt_id": self.attempt_id, "outcome": self.outcome,
                "exit_status": self.exit_status, "reason": self.reason,
                "metrics": self.metrics, "stdout_tail": self.stdout_tail,
                "stderr_tail": self.stderr_tail}

    @classmethod
    def many_from_wire(cls, raw: Any) -> list[Result]:
        """The ``results`` of a batched complete: 1 to MAX_RESULTS, each attempt once."""
        if not isinstance(raw, list) or not 0 < len(raw) <= MAX_RESULTS:
            raise ProtocolError(Code.MALFORMED, f"'results' must be a list of 1 to "
                                f"{MAX_RESULTS} results")
        out = []
        for item in raw:
            if not isinstance(item, dict):
                raise ProtocolError(Code.MALFORMED, "each result must be an object")
            out.append(cls.from_wire(item))
        if len({r.attempt_id for r in out}) != len(out):
            raise ProtocolError(Code.MALFORMED, "an attempt is reported twice in 'results'")
        return out

    @classmethod
    def from_wire(cls, args: dict[str, Any]) -> Result:
        outcome = arg(args, "outcome", str)
        if outcome not in OUTCOMES:
            raise ProtocolError(Code.MALFORMED, f"outcome {outcome!r} is not one of "
                                f"{sorted(OUTCOMES)}")
        metrics = arg(args, "metrics", dict, {})
        if not all(isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)
                                             and fits_int64(v))
                   for v in metrics.values()):
            raise ProtocolError(Code.MALFORMED, "metrics must be numbers")
        status = arg(args, "exit_status", (int, type(None)), None)
        return cls(
            attempt_id=arg(args, "attempt_id", int),
            outcome=outcome,
            exit_status=status,
            reason=arg(args, "reason", str, ""),
            metrics={str(k): float(v) for k, v in metrics.items()},
            stdout_tail=arg(args, "stdout_tail", str, ""),
            stderr_tail=arg(args, "stderr_tail", str, ""),
        )
