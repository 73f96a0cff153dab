"""Events over AMQP: the events table, published to a topic exchange as hyperflow did.

The events table is an outbox. Every event row is written in the transaction
of the transition it describes, and :class:`EventPublisher` tails the table
from its own thread, so only committed rows are ever published (no phantom
events) and a transition never waits for the broker. Each row becomes one
persistent message (``delivery_mode=2``) on a durable topic exchange, routing
key :func:`boss.store.events.routing_key` (``job.42.stage-in.finished``),
``message_id`` the event id and ``correlation_id`` the job (task) id; the body
is hyperflow's JSON (``type``, ``timestamp`` in UTC, ``worker``: the executor)
with the event's own data merged in.

Delivery is at least once. Messages go out in batches (at most ``batch`` rows,
read in one short read-only transaction); the position (the last event id the
broker confirmed, with publisher confirms) is saved in the Context table under
``amqp.last_event_id`` after each confirmed batch, so a boss restart resumes
there and a crash in the middle of a batch republishes at most that batch:
consumers drop duplicates by ``message_id``. A broker outage costs one warning
in the log; the publisher retries with a bounded exponential delay and, once
the broker is back, publishes everything that happened meanwhile.

The first start on a database (no saved position) publishes from the newest
event on: enabling AMQP does not replay the history, which ``boss events``
shows.

On PostgreSQL, event ids are handed out when a row is inserted but become
visible when its transaction commits, so id 10 may appear after id 11. The
publisher therefore never moves past a gap in the ids until every transaction
that could still fill it has ended (see :class:`_Gaps`); on SQLite writers are
serialised, ids commit in order, and there are no such gaps.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
from sqlalchemy import Connection, Text, cast, func, select

from boss.errors import BossError, UserError
from boss.store import Store, workers
from boss.store import events as event_rows

if TYPE_CHECKING:
    from boss.service import Boss

log = logging.getLogger(__name__)

POSITION_KEY = "amqp.last_event_id"
BATCH = 500
POLL_SECONDS = 0.5
BACKOFF = (1.0, 30.0)  # seconds: first retry, longest wait between retries
CONFIRM_SECONDS = 60.0  # a batch not confirmed by then: reconnect and publish it again
DRAIN_SECONDS = 5.0  # stop() first publishes what is committed, for at most this long
_NAMES_CACHED = 10_000


@dataclass(frozen=True)
class Message:
    """One event as it goes on the wire (pure data; :func:`to_message` makes it)."""

    event_id: int
    routing_key: str
    body: bytes
    properties: dict[str, Any]


def to_message(event: dict[str, Any], executor: str | None) -> Message:
    """hyperflow's message for an event row (a dict from :func:`boss.store.events.since`).

    The event's data comes first so that it can never overwrite the fields a
    hyperflow consumer relies on (``type``, ``timestamp``, ``worker``, ``job``).
    """
    ts = float(event["ts"])
    body: dict[str, Any] = dict(event.get("data") or {})
    body.update({
        "type": event["kind"],
        "timestamp": datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds"),
        "worker": executor,
        "worker_id": event["worker_id"],
        "event_id": event["id"],
    })
    properties: dict[str, Any] = {
        "content_type": "application/json", "delivery_mode": 2, "app_id": "ecloud",
        "message_id": str(event["id"]), "type": event["kind"], "timestamp": int(ts),
    }
    if event["task_id"] is not None:
        body["job"] = event["task_id"]
        properties["correlation_id"] = str(event["task_id"])
    if event["attempt_id"] is not None:
        body["attempt_id"] = event["attempt_id"]
    return Message(event["id"], event_rows.routing_key(event["kind"], event["task_id"]),
                   json.dumps(body, separators=(",", ":"), default=str).encode(), properties)


class _Gaps:
    """PostgreSQL: when may the publisher pass a gap in the event ids?

    A row with id G that is not visible yet, while a row above it is, belongs to
    a transaction that is still running or that rolled back (sequences are not
    transactional). That transaction took G before the row above it committed,
    so it was already running, with a transaction id (taken at its first write,
    at the latest by the statement that took G), when the gap was seen: once
    every transaction running then has ended (the cluster's oldest running
    transaction id has passed that moment's ``xmax``), G is either visible or
    never will be. The
    same holds for every gap below the highest id read then, so one wait covers
    all the gaps of a batch. This assumes the id sequence hands out ids in
    order (no per-session ``CACHE``), as the SERIAL of the migrations does.

    A transaction left open for hours (an idle ``psql``) holds publishing back
    for as long, which is the price of never losing an event.
    """

    def __init__(self) -> None:
        self.pending: tuple[int, int] | None = None  # (below this id, final after xmax)

    def final_below(self, conn: Connection) -> int:
        """Gaps below the returned id are final; call BEFORE reading the rows."""
        if self.pending is None:
            return 0
        below, xmax = self.pending
        if _xid(conn, func.pg_snapshot_xmin) >= xmax:
            self.pending = None
            return below
        return 0

    def seen(self, conn: Connection, below: int) -> None:
        """Gaps below ``below`` are open; call AFTER reading the rows that show them."""
        if self.pending is None:
            self.pending = (below, _xid(conn, func.pg_snapshot_xmax))


def _xid(conn: Connection, part: Any) -> int:
    # xid8 has no Python type in psycopg: read it as text
    return int(conn.execute(select(cast(part(func.pg_current_snapshot()), Text))).scalar_one())


def contiguous(rows: list[dict[str, Any]], after: int, final_below: int) -> tuple[int, bool]:
    """How many of ``rows`` (ids ascending, all > ``after``) may go out now, and whether
    a gap stopped them: a gap ending at or below ``final_below`` is known to be final."""
    expected = after + 1
    for n, row in enumerate(rows):
        if row["id"] != expected and row["id"] > final_below:
            return n, True
        expected = row["id"] + 1
    return len(rows), False


class EventPublisher:
    """Publish committed event rows to an AMQP topic exchange, from a thread of its own.

    Use as a context manager or call :meth:`start` and :meth:`stop`. Only this
    thread touches the AMQP connection; the database is read through ``store``
    in short read-only transactions and written once per confirmed batch.
    """

    def __init__(self, store: Store, url: str, exchange: str = "hyperflow.events", *,
                 batch: int = BATCH, poll_seconds: float = POLL_SECONDS,
                 backoff: tuple[float, float] = BACKOFF,
                 confirm_seconds: float = CONFIRM_SECONDS) -> None:
        try:
            self.parameters = pika.URLParameters(url)
        except Exception as exc:  # pika raises bare ValueErrors and friends for bad URLs
            raise UserError(f"[events] amqp_url {_redact(url)!r} is not an AMQP URL "
                            f"(amqp://USER:PASSWORD@HOST:5672/VHOST): {exc}") from exc
        if not exchange:
            raise UserError("[events] amqp_exchange is empty: name the topic exchange "
                            "(hyperflow's is 'hyperflow.events')")
        pika_log = logging.getLogger("pika")
        if pika_log.level == logging.NOTSET:
            # pika logs every failed connection attempt as an ERROR with a traceback; the
            # publisher reports an outage once, with pika's reason, and retries quietly
            pika_log.setLevel(logging.CRITICAL)
        # a connection attempt, or a broker that stops reading (memory alarm), must
        # not hold the thread for long: the retry loop decides what happens next
        self.parameters.connection_attempts = 1
        self.parameters.socket_timeout = 10
        self.parameters.blocked_connection_timeout = 60
        self.store = store
        self.exchange = exchange
        self.batch = batch
        self.poll_seconds = poll_seconds
        self.backoff = backoff
        self.confirm_seconds = confirm_seconds
        self.where = f"{self.parameters.host}:{self.parameters.port}{self._vhost()}"
        # progress, read by `boss serve` logs and the tests
        self.position = 0  # the last event id the broker confirmed
        self.published = 0  # messages confirmed since start()
        self.connected = False
        self._saved = -1
        self._names: dict[int, str] = {}
        self._gaps = _Gaps()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards _connection between stop() and the thread
        self._connection: Any = None
        self._channel: Any = None
        self._thread: threading.Thread | None = None
        self._ready = False
        self._down = False  # a warning was logged for the current outage
        self._problem = ""
        self._db_down = False
        # the batch in flight: its unconfirmed delivery tags, its last event id and size
        self._unconfirmed: set[int] = set()
        self._batch_end = 0
        self._batch_size = 0
        self._next_tag = 1
        self._confirm_timer: Any = None
        self._poll_timer: Any = None
        self._drain_until = 0.0

    @classmethod
    def from_settings(cls, boss: Boss) -> EventPublisher | None:
        """The publisher ``[events] amqp_url`` asks for, or None when it is empty."""
        s = boss.settings.events
        if not s.amqp_url:
            return None
        return cls(boss.store, s.amqp_url, s.amqp_exchange)

    # --- lifetime -----------------------------------------------------------------------

    def start(self) -> None:
        """Load the saved position and start publishing in the background.

        On a first start every event committed after this call is published. If
        the database cannot be read now, the thread keeps trying.
        """
        if self._thread is not None:
            raise RuntimeError("the event publisher is already running")
        self._stop.clear()
        self.published = 0
        self._load_position()
        self._thread = threading.Thread(target=self._run, name="ecloud-amqp", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0, drain: float = DRAIN_SECONDS) -> None:
        """Publish what is committed (for at most ``drain`` seconds, and only while the
        broker is there), then stop; anything left goes out at the next start."""
        self._drain_until = time.monotonic() + min(drain, timeout / 2)
        self._stop.set()
        with self._lock:
            if self._connection is not None:
                self._connection.ioloop.add_callback_threadsafe(self._stopping)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # a daemon thread: it cannot keep the process alive
                log.warning("events: the AMQP publisher did not stop within %.0f s", timeout)
            self._thread = None

    def __enter__(self) -> EventPublisher:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            if not self._load_position():
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            try:
                ready = self._session()
            except Exception as exc:  # a bug or pika's: the publisher must outlive it
                if self._stop.is_set():
                    # pika 1.3 asserts when a connection still in its handshake is
                    # closed (its aborted workflow reports a class, not an instance);
                    # the socket is closed by then, and stopping is what was asked
                    log.debug("events: stopping the AMQP connection: %r", exc)
                    break
                log.exception("events: the AMQP connection failed")
                ready, self._problem = False, _describe(exc)
            if self._stop.is_set():
                break
            if ready:
                delay = self.backoff[0]  # it worked for a while: retry soon
            if not self._down:
                log.warning("events: cannot publish to the AMQP broker at %s (%s); events "
                            "stay in the database and are published once it takes them "
                            "(retrying, at most %.0f s apart)", self.where, self._problem,
                            self.backoff[1])
                self._down = True
            else:
                log.debug("events: still cannot publish to AMQP: %s", self._problem)
            self._stop.wait(delay)
            delay = min(delay * 2, self.backoff[1])
        self._save_position()

    def _load_position(self) -> bool:
        """Read the saved position once (first start: the newest event); False on DB errors."""
        if self._saved >= 0:
            return True
        try:
            with self.store.ro() as conn:
                saved = workers.context(conn).get(POSITION_KEY)
                newest = event_rows.last_id(conn)
        except BossError as exc:
            self._db_problem(exc)
            return False
        if saved is not None and saved.isdigit():
            self.position = int(saved)
            log.info("events: publishing to AMQP %s, exchange %r, after event %d",
                     self.where, self.exchange, self.position)
        else:
            self.position = newest
            log.info("events: publishing to AMQP %s, exchange %r, from event %d on (first "
                     "start: earlier events are not replayed)", self.where, self.exchange,
                     newest + 1)
        return self._save_position()

    def _save_position(self) -> bool:
        if self._saved == self.position:
            return True
        try:
            with self.store.tx() as conn:
                workers.set_context(conn, POSITION_KEY, str(self.position))
        except BossError as exc:
            self._db_problem(exc)
            return False
        self._saved = self.position
        self._db_down = False
        return True

    def _db_problem(self, exc: BaseException) -> None:
        if not self._db_down:
            log.warning("events: cannot read or save the AMQP position in the database "
                        "(%s); retrying", exc)
            self._db_down = True

    # --- one connection: pika's asynchronous adapter, driven by this thread -------------

    def _session(self) -> bool:
        """Connect and publish until the connection ends; True if it got ready."""
        self._ready = False
        self._poll_timer = self._confirm_timer = None
        self._unconfirmed.clear()
        self._batch_end = 0
        self._next_tag = 1
        self._problem = "no answer"
        if self._stop.is_set():
            return False
        try:
            connection = pika.SelectConnection(
                self.parameters, on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_closed)
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._problem = _describe(exc)
            return False
        with self._lock:
            self._connection = connection
        if self._stop.is_set():  # stop() came before the connection could be told
            self._shut()
        try:
            connection.ioloop.start()
        finally:
            with self._lock:
                self._connection = None
            if not connection.is_closed:
                _drop(connection)
            connection.ioloop.close()
            self.connected = False
        return self._ready

    def _stopping(self) -> None:
        # however the drain goes (a broker that stopped answering), the loop ends soon after
        self._later(max(0.0, self._drain_until - time.monotonic()) + 1.0,
                    self._connection.ioloop.stop)
        if not self._ready:
            self._shut()
        elif not self._unconfirmed:  # else the batch's last confirm calls _pump
            self._cancel(self._poll_timer)
            self._pump()

    def _shut(self) -> None:
        connection = self._connection
        if connection is None:
            return
        if connection.is_closing or connection.is_closed:
            connection.ioloop.stop()
        else:
            connection.close()

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, connection: Any, error: BaseException | str) -> None:
        self._problem = _describe(error)
        connection.ioloop.stop()

    def _on_closed(self, connection: Any, reason: BaseException) -> None:
        if not self._stop.is_set():
            self._problem = _describe(reason)
        connection.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.exchange_declare(exchange=self.exchange, exchange_type="topic", durable=True,
                                 callback=lambda _frame: channel.confirm_delivery(
                                     ack_nack_callback=self._on_confirm,
                                     callback=self._on_confirming))

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        # e.g. the exchange exists with another type: the broker closes the channel
        self._problem = _describe(reason)
        if not self._stop.is_set():
            self._shut()

    def _on_confirming(self, _frame: Any) -> None:
        self._ready = self.connected = True
        if self._down:
            log.info("events: the AMQP broker at %s is back; publishing after event %d",
                     self.where, self.position)
            self._down = False
        self._pump()

    def _pump(self) -> None:
        """Publish the next batch, or look again after ``poll_seconds``."""
        try:
            self._publish_batch()
        except Exception as exc:  # never let the thread die: log, reconnect, publish again
            log.exception("events: publishing to AMQP failed")
            self._problem = _describe(exc)
            self._shut()

    def _publish_batch(self) -> None:
        self._poll_timer = None
        if self._stop.is_set() and time.monotonic() >= self._drain_until:
            self._shut()
            return
        if self._unconfirmed:
            return
        try:
            with self.store.ro() as conn:
                messages = self._next_batch(conn)
        except BossError as exc:
            self._db_problem(exc)
            self._poll_timer = self._later(self.backoff[0], self._pump)
            return
        self._db_down = False
        if not messages:
            # the position may be unsaved when the last save failed
            self._save_position()
            if self._stop.is_set():
                self._shut()  # drained
            else:
                self._poll_timer = self._later(self.poll_seconds, self._pump)
            return
        for m in messages:
            self._channel.basic_publish(self.exchange, m.routing_key, m.body,
                                        pika.BasicProperties(**m.properties))
            self._unconfirmed.add(self._next_tag)
            self._next_tag += 1
        self._batch_end = messages[-1].event_id
        self._batch_size = len(messages)
        self._confirm_timer = self._later(self.confirm_seconds, self._confirm_timeout)

    def _next_batch(self, conn: Connection) -> list[Message]:
        postgres = self.store.dialect == "postgresql"
        final_below = self._gaps.final_below(conn) if postgres else 0
        rows = event_rows.since(conn, self.position, limit=self.batch)
        if not rows:
            if event_rows.last_id(conn) < self.position:
                # every event was pruned and SQLite reuses ids from 1: start over
                log.warning("events: the events table restarted below event %d; "
                            "publishing from its start", self.position)
                self.position = 0
            return []
        if postgres:
            n, gap = contiguous(rows, self.position, final_below)
            if gap:
                self._gaps.seen(conn, rows[-1]["id"])
            rows = rows[:n]
        unknown = {r["worker_id"] for r in rows
                   if r["worker_id"] is not None and r["worker_id"] not in self._names}
        if unknown:
            if len(self._names) > _NAMES_CACHED:
                self._names.clear()
            self._names.update({w.id: w.name for w in workers.by_ids(conn, sorted(unknown))})
        return [to_message(r, self._names.get(r["worker_id"]) if r["worker_id"] else None)
                for r in rows]

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self._problem = f"the broker refused message {method.delivery_tag} (nack)"
            self._shut()  # reconnect; the batch goes out again
            return
        tag = method.delivery_tag
        if method.multiple:
            self._unconfirmed = {t for t in self._unconfirmed if t > tag}
        else:
            self._unconfirmed.discard(tag)
        if self._unconfirmed or not self._batch_end:
            return
        self._cancel(self._confirm_timer)
        self._confirm_timer = None
        self.position = self._batch_end
        self.published += self._batch_size
        self._batch_end = 0
        self._save_position()  # on failure the next idle poll saves it
        self._poll_timer = self._later(0, self._pump)

    def _confirm_timeout(self) -> None:
        self._problem = (f"{len(self._unconfirmed)} message(s) not confirmed in "
                         f"{self.confirm_seconds:.0f} s")
        self._shut()

    def _later(self, delay: float, callback: Any) -> Any:
        return self._connection.ioloop.call_later(delay, callback)

    def _cancel(self, timer: Any) -> None:
        if timer is not None:
            self._connection.ioloop.remove_timeout(timer)

    def _vhost(self) -> str:
        vhost = self.parameters.virtual_host
        return "" if vhost == "/" else f"/{vhost}"


def _drop(connection: Any) -> None:
    """Close the socket of a connection whose loop stopped before the connection did
    (a stop whose drain ran out while the broker did not answer the close): left to
    itself, the socket stays open until the collector finds the connection's cycles.
    pika has no public call for it, and its abort completes only on a running loop,
    which would also run this publisher's pending timers: the socket is closed here."""
    sock = getattr(getattr(connection, "_transport", None), "_sock", None)
    if sock is None:  # pika's internals moved: the socket goes with the object
        log.debug("events: no socket found to close on the AMQP connection")
        return
    try:
        sock.close()
    except OSError as exc:
        log.debug("events: closing the AMQP connection's socket: %s", exc)


def _describe(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    text = str(error) or repr(error)
    return f"{type(error).__name__}: {text}"


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
