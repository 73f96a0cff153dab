"""Worker calls read from their arguments, and their answers written as replies.

Pure: no I/O, no database. :func:`prepare` checks a bound connection's
request arguments and turns them into a :mod:`boss.calls` value plus a
function that writes the result of the call's answer. The server
(:mod:`boss.server`) queues the value for the group commit and, once the
batch is committed, sends what that function returns. A wrong argument is a
``ProtocolError`` raised here, before anything is queued, so it changes
nothing.

A result is a dict (encoded by :func:`protocol.messages.ok`) or the text of a
JSON object (sent by :func:`protocol.messages.ok_json`): tasks handed out go
as the document text the push stored, spliced in, not decoded and encoded
again per task.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from boss import calls
from boss.store import events as event_rows
from boss.store.tasks import Ended
from boss.transitions import Beat, PopAnswer
from protocol import messages
from protocol.errors import Code, ProtocolError

MAX_EVENT_BYTES = 16 * 1024
MAX_EVENTS = 10_000
MAX_POP = 1024

Reply = Callable[[Any], "dict[str, Any] | str"]
"""The call's answer -> its result; may raise ProtocolError (a refused result)."""


@dataclass(frozen=True)
class Caller:
    """Who calls: the connection's worker, and what bounds its arguments."""

    worker_id: int
    lease_seconds: float


def prepare(name: str, who: Caller, args: dict[str, Any]) -> tuple[calls.Call, Reply]:
    """The call a request makes (``pop``, ``heartbeat``, ``event``, ``complete`` or
    ``goodbye``: ``hello`` binds the connection first) and how to reply to its answer."""
    return _PREPARE[name](who, args)


def _pop(who: Caller, args: dict[str, Any]) -> tuple[calls.Call, Reply]:
    n = messages.arg(args, "n", int)
    if not 0 <= n <= MAX_POP:
        raise ProtocolError(Code.MALFORMED, f"n must be between 0 and {MAX_POP}")
    return calls.Pop(who.worker_id, n), pop_result


def pop_result(answer: PopAnswer) -> str:
    return "{" + _pop_fields(answer) + "}"


def _pop_fields(answer: PopAnswer) -> str:
    """The pop's result, as the members of a JSON object (another result's, or its own)."""
    if answer.tasks:
        return '"tasks":[' + ",".join(t.wire_json() for t in answer.tasks) + "]"
    if answer.drain:
        return '"drain":true'
    return f'"none":true,"retry_after":{json.dumps(answer.retry_after)}'


def _heartbeat(who: Caller, args: dict[str, Any]) -> tuple[calls.Call, Reply]:
    ids = _int_list(messages.arg(args, "attempts", list))
    return calls.Heartbeat(who.worker_id, tuple(ids)), _beat_result


def _beat_result(beat: Beat) -> dict[str, Any]:
    out: dict[str, Any] = {"cancel": beat.cancel}
    if beat.adopt:
        out["adopt"] = [a.to_wire() for a in beat.adopt]
    return out


def _event(who: Caller, args: dict[str, Any]) -> tuple[calls.Call, Reply]:
    """Progress events, batched by the worker: ``events`` [{attempt_id, kind, data, ts}]."""
    items = _events(who, messages.arg(args, "events", list))
    return calls.Events(who.worker_id, items), _not_current_result


def _not_current_result(not_current: list[int]) -> dict[str, Any]:
    return {"not_current": not_current}


def _events(who: Caller, raw: list[Any]) -> tuple[calls.Event, ...]:
    """Events of a call, every one checked before any is applied."""
    if len(raw) > MAX_EVENTS:
        raise ProtocolError(Code.MALFORMED, f"more than {MAX_EVENTS} events in one call")
    now = time.time()
    return tuple(_one_event(who, e, now) for e in raw)


def _one_event(who: Caller, e: Any, now: float) -> calls.Event:
    if not isinstance(e, dict):
        raise ProtocolError(Code.MALFORMED, "each event must be an object")
    attempt_id = messages.arg(e, "attempt_id", int)
    kind = messages.arg(e, "kind", str)
    data = messages.arg(e, "data", dict, {})
    ts = messages.arg(e, "ts", (int, float), now)
    if kind not in event_rows.WORKER_KINDS:
        raise ProtocolError(Code.MALFORMED, f"event kind {kind[:80]!r} is not one of "
                            + ", ".join(sorted(event_rows.WORKER_KINDS)))
    if len(messages.encode(data)) > MAX_EVENT_BYTES:
        raise ProtocolError(Code.MALFORMED, f"event data over {MAX_EVENT_BYTES} bytes")
    # the worker's clock stamps when it happened; never trust it beyond a lease's span
    return calls.Event(who.worker_id, attempt_id, kind, data,
                       ts=min(max(float(ts), now - who.lease_seconds), now))


def _complete(who: Caller, args: dict[str, Any]) -> tuple[calls.Call, Reply]:
    """A result (or, batched, ``results``); with ``events`` (still queued at the worker)
    and ``pop`` (how many tasks the freed slots take next), in one call and one
    transaction."""
    batched = "results" in args
    results = (messages.Result.many_from_wire(args["results"]) if batched
               else [messages.Result.from_wire(args)])
    items = _events(who, messages.arg(args, "events", list, []))
    n = messages.arg(args, "pop", int, 0)
    if not 0 <= n <= MAX_POP:
        raise ProtocolError(Code.MALFORMED, f"pop must be between 0 and {MAX_POP}")
    if batched:
        return (calls.CompleteMany(who.worker_id, tuple(results), items, n),
                lambda answer: _many_result(results, *answer))
    return (calls.CompleteAndPop(who.worker_id, results[0], items, n),
            lambda answer: _complete_result(results[0], *answer))


def _refused(attempt_id: int) -> str:
    return (f"attempt {attempt_id} is no longer current (lost, cancelled or not this "
            "worker's): result discarded")


def _complete_result(result: messages.Result, ended: Ended | None,
                     popped: PopAnswer | None) -> str:
    if ended is None:
        raise ProtocolError(Code.NOT_CURRENT, _refused(result.attempt_id))
    out = f'{{"accepted":true,"task_state":"{ended.task_state}"'
    return out + ("," + _pop_fields(popped) if popped is not None else "") + "}"


def _many_result(results: list[messages.Result], endings: list[Ended | None],
                 popped: PopAnswer | None) -> str:
    each = []
    for result, ended in zip(results, endings, strict=True):
        if ended is None:
            each.append(json.dumps({"accepted": False, "error": {
                "code": str(Code.NOT_CURRENT), "message": _refused(result.attempt_id)}}))
        else:
            each.append(f'{{"accepted":true,"task_state":"{ended.task_state}"}}')
    out = '{"results":[' + ",".join(each) + "]"
    return out + ("," + _pop_fields(popped) if popped is not None else "") + "}"


def _goodbye(who: Caller, args: dict[str, Any]) -> tuple[calls.Call, Reply]:
    reason = messages.arg(args, "reason", str, "")
    return calls.Goodbye(who.worker_id, reason[:500]), _empty_result


def _empty_result(_answer: Any) -> dict[str, Any]:
    return {}


def _int_list(values: list[Any]) -> list[int]:
    if len(values) > 100_000 or not all(
            isinstance(v, int) and not isinstance(v, bool) and messages.fits_int64(v)
            for v in values):
        raise ProtocolError(Code.MALFORMED, "attempts must be a list of attempt ids")
    return values


_PREPARE: dict[str, Callable[[Caller, dict[str, Any]], tuple[calls.Call, Reply]]] = {
    "pop": _pop, "heartbeat": _heartbeat, "event": _event, "complete": _complete,
    "goodbye": _goodbye,
}
