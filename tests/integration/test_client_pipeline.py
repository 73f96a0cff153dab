"""The worker's client keeps several calls in flight on one channel.

A small line server on 127.0.0.1 stands in for the boss's socket (the real
server is tested in test_server.py): it answers ``hello``, then holds the
next requests and answers them in reverse order. Each caller must get its
own reply, and a channel that breaks fails every waiting call.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from protocol import messages
from worker.client import BossClient
from worker.transport import TcpTransport, TransportError

CALLS = 4
BOUND = 30.0  # seconds


class ReversingServer:
    def __init__(self, hold: int, then_close: bool = False, first: bytes | None = None
                 ) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port: int = self.sock.getsockname()[1]
        self.hold = hold
        self.then_close = then_close
        self.first = first  # a line sent instead of the replies
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn, conn.makefile("rb") as lines:
            hello = json.loads(lines.readline())
            conn.sendall(messages.ok(hello["id"], {
                "worker_id": 1, "name": "w", "lease_seconds": 30, "heartbeat_seconds": 1}))
            held = [json.loads(lines.readline()) for _ in range(self.hold)]  # bounded
            if self.first is not None:  # the client gives up on the link: reply no more
                conn.sendall(self.first)
                return
            if self.then_close:
                return
            for req in reversed(held):
                conn.sendall(messages.ok(req["id"], {"echo": req["args"]["n"]}))

    def close(self) -> None:
        self.sock.close()
        self.thread.join(BOUND)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[ReversingServer]:
    s = ReversingServer(CALLS, then_close=getattr(request, "param", False))
    yield s
    s.close()


def run_calls(client: BossClient) -> list[object]:
    out: list[object] = [None] * CALLS

    def one(n: int) -> None:
        try:
            out[n] = client.call("heartbeat", {"n": n}, reconnect=False)["echo"]
        except TransportError as exc:
            out[n] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in range(CALLS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND)
    assert not any(t.is_alive() for t in threads)
    return out


def test_replies_out_of_order_reach_their_callers(server: ReversingServer) -> None:
    client = BossClient(TcpTransport("127.0.0.1", server.port, timeout=BOUND), "tok", slots=2)
    client.hello()
    # all four are sent before any reply comes: none waited for another to finish
    assert run_calls(client) == list(range(CALLS))
    client.close()


@pytest.mark.parametrize("server", [True], indirect=True)
def test_a_broken_channel_fails_every_waiting_call(server: ReversingServer) -> None:
    client = BossClient(TcpTransport("127.0.0.1", server.port, timeout=BOUND), "tok", slots=2)
    client.hello()
    results = run_calls(client)
    assert all(isinstance(r, TransportError) for r in results), results
    client.close()


@pytest.mark.parametrize("first", [b"not json\n", b'{"v": 1, "id": 99, "ok": true}\n',
                                   b'[1, 2]\n'])
def test_a_line_that_is_no_callers_reply_fails_every_waiting_call(first: bytes) -> None:
    server = ReversingServer(CALLS, first=first)
    client = BossClient(TcpTransport("127.0.0.1", server.port, timeout=BOUND), "tok", slots=2)
    try:
        client.hello()
        results = run_calls(client)
        assert all(isinstance(r, TransportError) for r in results), results
        assert any("out of step" in str(r) for r in results), results
    finally:
        client.close()
        server.close()
