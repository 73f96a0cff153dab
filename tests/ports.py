"""A free TCP port, for the servers the tests and benchmarks start (sshd, PostgreSQL,
`boss serve`, RabbitMQ...). Bound and released at once, so another process may take
it before the caller does: every server started on one fails loudly if it cannot bind."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
