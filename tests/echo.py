"""A tiny threaded JSON-lines server on 127.0.0.1 that answers like the boss's RPC server.

Each request line (``protocol.messages.request``) gets ``ok(id, {"call": ..., "args":
...})``; a malformed one gets an error reply. Used as the far end of tunnels in
tests and benchmarks, where the real boss server would be beside the point.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

from protocol import messages
from protocol.errors import ProtocolError

_POLL = 0.1  # seconds; how often idle threads look at the stop flag


class EchoServer:
    """Listen on 127.0.0.1 (free port) until ``close()``; count accepted connections."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name="echo-accept", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(_POLL)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    conn.sendall(self._answer(line))
        except OSError:
            return  # the client went away or close() shut the socket
        finally:
            conn.close()

    @staticmethod
    def _answer(line: bytes) -> bytes:
        try:
            req = messages.parse_request(line)
        except ProtocolError as exc:
            return messages.error(messages.request_id(line), exc.code, exc.message)
        return messages.ok(req.id, {"call": req.call, "args": req.args})

    def close(self) -> None:
        """Stop accepting, drop every connection and join the threads (bounded)."""
        self._stop.set()
        self._listener.close()
        self._accepter.join(timeout=5)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
