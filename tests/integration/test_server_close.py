"""Stopping `boss serve` closes the connections it accepted, not only its listener."""

from __future__ import annotations

import socket
from pathlib import Path

from boss.server import serving
from boss.service import Boss
from tests.conftest import make_settings

BOUND = 30.0  # seconds; a bound on waiting, never an assertion about speed


def test_stopping_the_server_closes_open_connections(tmp_path: Path) -> None:
    boss = Boss(make_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db"))
    boss.init()
    try:
        with serving(boss) as server:
            idle = socket.create_connection(("127.0.0.1", server.port), timeout=BOUND)
            # a connection that never said hello, and one half-way through a line
            partial = socket.create_connection(("127.0.0.1", server.port), timeout=BOUND)
            partial.sendall(b'{"id": 1, "call": "hel')
        with idle, partial:
            # the server's end is closed at once, not when the garbage collector finds
            # it (which pytest reports as a ResourceWarning in whatever test runs then)
            assert closed_by_peer(idle)
            assert closed_by_peer(partial)
    finally:
        boss.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """The other end closed: an orderly end of stream, or a reset (Linux resets a
    connection closed with bytes still unread in it, as the half-sent line is)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
