"""The AMQP event sink (boss/amqp.py) against a real RabbitMQ broker.

The module starts its own broker, never the system service, as the user
running the tests (Debian's ``rabbitmq-server`` package; scripts/test.sh
installs it). What that takes here:

- Run ``/usr/lib/rabbitmq/bin/rabbitmq-server`` and ``rabbitmqctl`` directly:
  Debian's ``/usr/sbin`` wrappers switch to the ``rabbitmq`` user, cd to
  /var/lib/rabbitmq and log to /var/log/rabbitmq.
- ``HOME`` is a temporary directory holding our own ``.erlang.cookie`` (mode
  0400): the server and ``rabbitmqctl`` must share the cookie, and the system's
  is readable only by the ``rabbitmq`` user.
- ``RABBITMQ_NODENAME=ecltest-PID@localhost``, ``RABBITMQ_MNESIA_BASE`` and
  ``RABBITMQ_LOG_BASE`` in the temporary directory (restarting with the same
  ones keeps durable queues and their persistent messages).
- Three free ports on 127.0.0.1: ``RABBITMQ_NODE_PORT`` (AMQP, with
  ``RABBITMQ_NODE_IP_ADDRESS=127.0.0.1``), ``RABBITMQ_DIST_PORT`` (Erlang
  distribution, else NODE_PORT + 20000) and ``ERL_EPMD_PORT``: a private
  ``epmd``, which the broker starts as a daemon and which outlives it, so the
  module stops it with ``epmd -port P -kill`` instead of touching a shared one.
- No plugins (``RABBITMQ_ENABLED_PLUGINS_FILE`` holding ``[].``: the
  management plugin would want port 15672), no config files
  (``RABBITMQ_CONFIG_FILE``, ``RABBITMQ_ADVANCED_CONFIG_FILE`` and
  ``RABBITMQ_CONF_ENV_FILE`` point into the temporary directory).
- ``guest``/``guest`` may log in from 127.0.0.1, which is all the tests do.

Starting takes 5 to 10 s (an Erlang VM); the tests share one broker, and only
the outage test stops and restarts it. Stopping is ``rabbitmqctl -n NODE stop``,
then SIGKILL to the server's process group if it is still there after 30 s.
When the broker cannot start, every test here skips with the reason and the
end of its log.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pika = pytest.importorskip("pika", reason="pika is not installed (pip install 'ecloud[boss]')")

from boss import calls  # noqa: E402
from boss.amqp import POSITION_KEY, EventPublisher  # noqa: E402
from boss.errors import UserError  # noqa: E402
from boss.server import serving  # noqa: E402
from boss.service import Boss  # noqa: E402
from boss.store import events as event_rows  # noqa: E402
from protocol.messages import Result  # noqa: E402
from tests.conftest import fresh_pg_url, make_settings  # noqa: E402
from tests.integration.test_transitions import push, task  # noqa: E402
from tests.ports import free_port  # noqa: E402

SBIN = Path("/usr/lib/rabbitmq/bin")
START_SECONDS = 60.0
WAIT_SECONDS = 20.0  # for messages to arrive; they normally take well under a second




@dataclass
class Broker:
    """A RabbitMQ node of our own under ``root``; ``start()`` again after ``stop()``."""

    root: Path
    node: str = field(default_factory=lambda: f"ecltest-{os.getpid()}@localhost")
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    epmd_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def env(self) -> dict[str, str]:
        r = self.root
        return {**os.environ, "HOME": str(r / "home"), "LC_ALL": "C.UTF-8",
                "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "RABBITMQ_MNESIA_BASE": str(r / "mnesia"), "RABBITMQ_LOG_BASE": str(r / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(r / "enabled_plugins"),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(r / "plugins"),
                "RABBITMQ_CONFIG_FILE": str(r / "rabbitmq"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(r / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(r / "rabbitmq-env.conf"),
                "RABBITMQ_PID_FILE": str(r / "rabbitmq.pid")}

    def prepare(self) -> None:
        home = self.root / "home"
        home.mkdir(parents=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(os.urandom(16).hex().upper())
        cookie.chmod(0o400)
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")

    def start(self) -> str:
        """Start the node and wait until it takes AMQP connections; "" or why not."""
        self.starts += 1
        with open(self.root / f"server-{self.starts}.log", "wb") as out:
            self.proc = subprocess.Popen([str(SBIN / "rabbitmq-server")], env=self.env(),
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"rabbitmq-server exited with status {self.proc.returncode}"
            if self.reachable():
                return ""
            time.sleep(0.25)
        return f"rabbitmq-server did not take connections within {START_SECONDS:.0f} s"

    def reachable(self) -> bool:
        try:  # a plain TCP probe first: pika logs every refused connection as an error
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        try:
            pika.BlockingConnection(pika.URLParameters(
                self.url + "?connection_attempts=1&socket_timeout=1")).close()
        except pika.exceptions.AMQPError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            subprocess.run([str(SBIN / "rabbitmqctl"), "-n", self.node, "stop"],
                           env=self.env(), capture_output=True, timeout=60, check=False)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server's VM only
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        # the broker started this epmd (as a daemon, on our private port): stop it too
        subprocess.run(["epmd", "-port", str(self.epmd_port), "-kill"], capture_output=True,
                       timeout=10, check=False)

    def log_tail(self) -> str:
        logs = sorted(self.root.glob("server-*.log")) + sorted(self.root.glob("log/*.log"))
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in logs[-2:])


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    if not (SBIN / "rabbitmq-server").exists() or shutil.which("epmd") is None:
        why = "RabbitMQ is not installed (apt-get install rabbitmq-server; scripts/test.sh does)"
        print(f"\nSKIPPING AMQP tests: {why}")
        pytest.skip(why)
    b = Broker(Path(tempfile.mkdtemp(prefix="ecloud-rabbitmq-")))
    b.prepare()
    try:
        why = b.start()
        if why:
            why = f"{why}\n{b.log_tail()}"
            print(f"\nSKIPPING AMQP tests: {why}")
            pytest.skip(why)
        yield b
    finally:
        b.close()
        shutil.rmtree(b.root, ignore_errors=True)


@dataclass
class Received:
    routing_key: str
    properties: Any
    body: dict[str, Any]

    @property
    def id(self) -> int:
        return int(self.properties.message_id)


class Consumer:
    """A durable queue bound with ``#``: it keeps what is published while nobody reads."""

    def __init__(self, broker: Broker, exchange: str, queue: str) -> None:
        self.broker, self.exchange, self.queue = broker, exchange, queue
        self.got: list[Received] = []
        self.conn: Any = None
        self.connect()

    def connect(self) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(self.broker.url))
        ch = self.conn.channel()
        ch.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        ch.queue_declare(self.queue, durable=True)
        ch.queue_bind(self.queue, self.exchange, routing_key="#")
        self.channel = ch

    def close(self) -> None:
        if self.conn is not None and self.conn.is_open:
            self.conn.close()
        self.conn = None

    def read(self) -> None:
        for _ in range(10_000):  # far more than any test publishes
            method, props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return
            self.got.append(Received(method.routing_key, props, json.loads(body)))
        raise AssertionError(f"queue {self.queue} never ran dry")

    def until(self, done: Callable[[], bool], seconds: float = WAIT_SECONDS) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.read()
            if done():
                return
            assert time.monotonic() < deadline, (
                f"waited {seconds:.0f} s; got ids {sorted(self.ids())[-20:]}")
            self.conn.sleep(0.05)

    def ids(self) -> set[int]:
        return {m.id for m in self.got}

    def until_ids(self, wanted: set[int]) -> None:
        self.until(lambda: wanted <= self.ids())


def wait_for(done: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"not done within {seconds:.0f} s"
        time.sleep(0.05)


def publisher(boss: Boss, url: str, exchange: str = "hyperflow.events") -> EventPublisher:
    """A publisher that polls and retries fast, so the tests wait less."""
    return EventPublisher(boss.store, url, exchange, poll_seconds=0.05, backoff=(0.2, 1.0))


def event_rows_of(boss: Boss) -> list[dict[str, Any]]:
    with boss.store.ro() as conn:
        return event_rows.since(conn, 0, limit=100_000)


def saved_position(boss: Boss) -> int:
    return int(boss.context()[POSITION_KEY])


def run_tasks(boss: Boss, tmp_path: Path, prefix: str) -> dict[str, int]:
    """Push a chain a -> b and a free task c; run them on one worker with stage events.

    Returns task name (without the prefix) -> task id."""
    push(boss, tmp_path, [task(f"{prefix}a"), task(f"{prefix}b", after=[f"{prefix}a"]),
                          task(f"{prefix}c")], name=f"{prefix}.jsonl")
    w, _, token = boss.add_worker(slots=2)
    boss.authenticate(token, "test", 2)
    done: dict[str, int] = {}
    for _ in range(3):
        got = boss.claim(w, 2)
        if not got:
            break
        for a in got:
            for kind, data in [("stage-in.started", {}),
                               ("stage-in.finished", {"bytes": 10, "time": 0.5}),
                               ("execution.started", {}),
                               ("execution.finished", {"exit_status": 0, "time": 1.5}),
                               ("stage-out.started", {}),
                               ("stage-out.finished", {"bytes": 3, "time": 0.1})]:
                assert boss.apply_one(calls.Event(w, a.attempt_id, kind, data)) is True
            boss.complete(w, Result(a.attempt_id, "succeeded", exit_status=0,
                                    metrics={"wall": 1.0}))
            done[a.name.removeprefix(prefix)] = a.task_id
    boss.goodbye(w, "done")
    assert len(done) == 3
    return done


@pytest.fixture
def sqlite_boss(tmp_path: Path) -> Iterator[Boss]:
    b = Boss(make_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db"))
    b.init()
    try:
        yield b
    finally:
        b.close()


def check_messages(boss: Boss, got: list[Received]) -> None:
    """Every message is its event row, hyperflow-shaped."""
    rows = {r["id"]: r for r in event_rows_of(boss)}
    names = {w["id"]: w["name"] for w in boss.workers(include_terminated=True)}
    for m in got:
        row = rows[m.id]
        assert m.routing_key == event_rows.routing_key(row["kind"], row["task_id"])
        assert m.properties.delivery_mode == 2
        assert m.properties.content_type == "application/json"
        assert m.body["type"] == row["kind"] and m.body["event_id"] == row["id"]
        stamp = datetime.fromisoformat(m.body["timestamp"])
        assert stamp.utcoffset() == timedelta(0)
        assert stamp.timestamp() == pytest.approx(row["ts"], abs=1e-5)
        if row["task_id"] is not None:
            assert m.properties.correlation_id == str(row["task_id"])
            assert m.body["job"] == row["task_id"]
        else:
            assert m.properties.correlation_id is None and "job" not in m.body
        assert m.body["worker"] == names.get(row["worker_id"])
        for key, value in row["data"].items():
            if key not in ("type", "timestamp", "worker", "worker_id", "event_id", "job"):
                assert m.body[key] == value


def test_every_event_once_with_hyperflow_routing_keys(broker: Broker, boss: Boss,
                                                      tmp_path: Path) -> None:
    """On SQLite and PostgreSQL: each committed event row is one message, in order."""
    consumer = Consumer(broker, "hyperflow.events", f"all-{boss.store.dialect}")
    try:
        with publisher(boss, broker.url) as pub:
            ids_of = run_tasks(boss, tmp_path, "p")
            a, b, c = ids_of["a"], ids_of["b"], ids_of["c"]
            rows = event_rows_of(boss)
            consumer.until_ids({r["id"] for r in rows})
        ids = [m.id for m in consumer.got]
        assert ids == [r["id"] for r in rows]  # each once, oldest first, nothing else
        assert pub.published == len(rows)
        check_messages(boss, consumer.got)
        keys = {m.routing_key for m in consumer.got}
        for t in (a, b, c):
            for stage in ("started", "stage-in.started", "stage-in.finished",
                          "execution.started", "execution.finished", "stage-out.started",
                          "stage-out.finished", "finished"):
                assert f"job.{t}.{stage}" in keys
        assert f"job.{b}.ready" in keys  # b waited for a
        assert {"jobs.pushed", "worker.created", "worker.joined", "worker.left"} <= keys
        finished = next(m for m in consumer.got if m.routing_key == f"job.{a}.finished")
        assert finished.body["exit_status"] == 0 and finished.body["worker"].startswith("manual-")
        staged = next(m for m in consumer.got if m.routing_key == f"job.{a}.stage-in.finished")
        assert staged.body["bytes"] == 10 and staged.body["time"] == 0.5
        assert saved_position(boss) == rows[-1]["id"]
    finally:
        consumer.close()


def test_outage_then_restart_resumes(broker: Broker, sqlite_boss: Boss, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """Events made while the broker is down arrive once it is back; a new publisher
    resumes from the saved position instead of publishing everything again."""
    boss = sqlite_boss
    caplog.set_level(logging.INFO, logger="boss.amqp")
    consumer = Consumer(broker, "ecloud.outage", "outage")
    pub = publisher(boss, broker.url, "ecloud.outage")
    pub.start()
    try:
        run_tasks(boss, tmp_path, "before")
        before = {r["id"] for r in event_rows_of(boss)}
        consumer.until_ids(before)
        wait_for(lambda: pub.position == max(before))  # confirmed, not only delivered
        consumer.close()

        broker.stop()
        wait_for(lambda: not pub.connected)
        run_tasks(boss, tmp_path, "during")  # the boss goes on without the broker
        during = {r["id"] for r in event_rows_of(boss)} - before
        time.sleep(1.5)  # a few reconnection attempts, for the one-warning check
        assert saved_position(boss) == max(before)
        assert broker.start() == "", broker.log_tail()

        consumer.connect()
        consumer.until_ids(before | during)
        assert pub.connected
    finally:
        pub.stop()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "cannot publish" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert any("is back" in r.getMessage() for r in caplog.records)
    # at least once: after dedupe by message_id, exactly the rows
    assert consumer.ids() == before | during
    check_messages(boss, consumer.got)
    position = saved_position(boss)
    assert position == max(during)

    # a boss restart: a new publisher on the same database, after an event made while
    # no publisher ran; it must publish that one and the later ones, and nothing older
    boss.record_event("worker.lost", worker_id=1)
    # duplicates of older ones, if a batch went out twice; read before the new publisher
    # starts, else the new ones may come with them and be taken for old (the test
    # failed so under load)
    consumer.read()
    n = len(consumer.got)
    with publisher(boss, broker.url, "ecloud.outage") as again:
        boss.record_event("job.ready", task_id=1, data={"again": True})
        after = {r["id"] for r in event_rows_of(boss)} - before - during
        consumer.until_ids(before | during | after)
    assert len(after) == 2 and again.published == 2
    assert [m.id for m in consumer.got[n:]] == sorted(after)
    assert saved_position(boss) == max(after)
    consumer.close()


def test_boss_serve_publishes_when_amqp_url_is_set(broker: Broker, sqlite_boss: Boss) -> None:
    """`boss serve` runs the publisher; the first start does not replay older events, and
    stopping the server publishes what was committed before it saves the position."""
    boss = sqlite_boss
    boss.record_event("worker.created", worker_id=None, data={"old": True})
    old = max(r["id"] for r in event_rows_of(boss))
    boss.settings.events.amqp_url = broker.url
    boss.settings.events.amqp_exchange = "ecloud.serve"
    consumer = Consumer(broker, "ecloud.serve", "serve")
    try:
        with serving(boss):
            boss.record_event("job.ready", task_id=5)
            consumer.until(lambda: bool(consumer.got))
            boss.record_event("job.cancelled", task_id=5)  # published by the drain at stop
        consumer.until(lambda: len(consumer.got) >= 2)
        time.sleep(0.2)
        consumer.read()
        assert [m.routing_key for m in consumer.got] == ["job.5.ready", "job.5.cancelled"]
        assert min(consumer.ids()) > old
        assert saved_position(boss) == max(consumer.ids())
    finally:
        consumer.close()


def test_bad_settings_are_refused(sqlite_boss: Boss) -> None:
    with pytest.raises(UserError, match="amqp_url"):
        EventPublisher(sqlite_boss.store, "http://[broken")
    with pytest.raises(UserError, match="amqp_exchange"):
        EventPublisher(sqlite_boss.store, "amqp://localhost", "")


@pytest.mark.postgres
def test_postgres_waits_for_a_gap_to_be_committed_or_rolled_back(
        broker: Broker, pg_server: Any, tmp_path: Path) -> None:
    """Ids are handed out at insert, visible at commit: id N+1 may commit before N. The
    publisher must not move past N until N's transaction has ended, or N is lost."""
    boss = Boss(make_settings(tmp_path, fresh_pg_url(pg_server)))
    consumer = Consumer(broker, "ecloud.gaps", "gaps")
    held = boss.store.engine.connect()
    try:
        with publisher(boss, broker.url, "ecloud.gaps") as pub:
            for outcome in ("commit", "rollback"):
                tx = held.begin()
                event_rows.record(held, "job.ready", task_id=1, data={"held": outcome})
                boss.record_event("job.ready", task_id=2, data={"after": outcome})
                later = max(r["id"] for r in event_rows_of(boss))
                time.sleep(1.0)  # twenty polls
                consumer.read()
                assert later not in consumer.ids() and pub.position < later
                if outcome == "commit":
                    tx.commit()
                else:
                    tx.rollback()
                consumer.until_ids({later})
        rows = event_rows_of(boss)
        assert [m.id for m in consumer.got] == [r["id"] for r in rows]
        assert [m.body.get("held", m.body.get("after")) for m in consumer.got] == [
            "commit", "commit", "rollback"]
    finally:
        held.close()
        consumer.close()
        boss.close()


def test_stopping_during_the_handshake_with_a_silent_broker_is_quiet_and_closes(
        sqlite_boss: Boss, caplog: pytest.LogCaptureFixture) -> None:
    """A broker that accepts the connection and never answers (hung, or not AMQP):
    stopping the publisher while its handshake waits logs no error and closes the
    connection (pika asserts on closing a connection mid-handshake)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    publisher = EventPublisher(sqlite_boss.store, f"amqp://guest:guest@127.0.0.1:{port}/",
                               backoff=(0.1, 0.2))
    caplog.set_level(logging.DEBUG, logger="boss.amqp")
    publisher.start()
    try:
        held, _ = listener.accept()  # its handshake now waits for the broker's first frame
    finally:
        started = time.monotonic()
        publisher.stop(timeout=10)
        took = time.monotonic() - started
        listener.close()
    with held:
        held.settimeout(10)
        while held.recv(4096):  # the protocol header, then the end of the stream
            pass
    assert took < 5
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


class Freezer:
    """A TCP relay to the broker for one connection that can stop passing the broker's
    bytes on (``frozen``), as a broker that hangs; it notes when the client closes."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT_SECONDS)
        self.port = self.listener.getsockname()[1]
        self.upstream = port
        self.frozen = threading.Event()
        self.client_closed = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._threads.append(threading.Thread(target=self._accept, daemon=True))
        self._threads[0].start()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        broker = socket.create_connection(("127.0.0.1", self.upstream), timeout=WAIT_SECONDS)
        self._socks += [client, broker]
        for src, dst, ends in ((client, broker, self.client_closed), (broker, client, None)):
            src.settimeout(0.2)
            t = threading.Thread(target=self._pass, args=(src, dst, ends), daemon=True)
            self._threads.append(t)
            t.start()

    def _pass(self, src: socket.socket, dst: socket.socket, ends: threading.Event | None
              ) -> None:
        deadline = time.monotonic() + 4 * WAIT_SECONDS
        while not self._done.is_set() and time.monotonic() < deadline:
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                if ends is not None:
                    ends.set()
                return
            if src is self._socks[1] and self.frozen.is_set():
                continue  # the broker's answer is lost: it hangs, as far as the client sees
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._done.set()
        for t in self._threads:
            t.join(WAIT_SECONDS)
        for sock in [*self._socks, self.listener]:
            sock.close()


def test_stopping_while_the_broker_does_not_answer_the_close_drops_the_socket(
        broker: Broker, sqlite_boss: Boss) -> None:
    """The publisher's stop gives up on a close the broker never answers, after its drain;
    its socket is closed then and there, not left to the collector (whose finding it,
    later, is a ResourceWarning in whatever runs at that moment)."""
    relay = Freezer(broker.port)
    pub = publisher(sqlite_boss, f"amqp://guest:guest@127.0.0.1:{relay.port}/%2F",
                    "ecloud.frozen")
    gc.disable()  # the connection's cycles must not be what closes the socket
    try:
        pub.start()
        try:
            wait_for(lambda: pub.connected, WAIT_SECONDS)
            relay.frozen.set()
        finally:
            pub.stop(timeout=WAIT_SECONDS, drain=0.2)
        assert relay.client_closed.wait(WAIT_SECONDS)
    finally:
        gc.enable()
        relay.close()
