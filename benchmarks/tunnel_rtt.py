"""Round trip of one small JSON line: SSH tunnel (``ssh -W``) vs direct TCP, on loopback.

Starts a real sshd (tests/sshd.py) and a JSON-lines echo server (tests/echo.py),
opens one channel per transport and times request -> reply, one at a time, as
the worker's RPC client does. Goal: tunnel median <= 0.5 ms.

    .venv/bin/python benchmarks/tunnel_rtt.py [--calls 5000]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

# a script, not a package module: make the repository importable for tests.sshd
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import messages
from tests.echo import EchoServer
from tests.sshd import start_sshd
from worker.transport import SshTunnelTransport, TcpTransport, Transport

# benchmarks/run.py registers this script (see the contract there)
NAME = "tunnel_rtt"
TINY_ARGS = ["--calls", "300"]
GOAL_MISSED_EXIT = 1  # main returns 1 when the median misses GOAL_MS

GOAL_MS = 0.5
WARMUP = 200


def measure(transport: Transport, calls: int) -> list[float]:
    """Milliseconds per round trip of a heartbeat-sized request over one channel."""
    channel = transport.connect()
    try:
        line = messages.request(0, "heartbeat", {"attempts": [101, 102, 103]})
        samples = []
        for i in range(WARMUP + calls):
            start = time.perf_counter_ns()
            channel.send(line)
            channel.recv_line()
            if i >= WARMUP:
                samples.append((time.perf_counter_ns() - start) / 1e6)
        return samples
    finally:
        channel.close()


def summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{name:<12} median {statistics.median(ordered):.3f} ms   p99 {p99:.3f} ms   "
            f"mean {statistics.fmean(ordered):.3f} ms   max {ordered[-1]:.3f} ms   "
            f"(n={len(ordered)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="timed round trips each")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, start_sshd(Path(tmp)) as sshd, \
            EchoServer() as echo:
        tunnel = SshTunnelTransport(sshd.host, sshd.port, sshd.user, sshd.client_key_path,
                                    sshd.known_hosts_path, echo.port)
        direct = TcpTransport("127.0.0.1", echo.port)
        ssh_ms = measure(tunnel, args.calls)
        tcp_ms = measure(direct, args.calls)
        connect_ms = []
        for _ in range(20):  # what a reconnect costs: a new ssh process, login, forward
            start = time.perf_counter()
            tunnel.connect().close()
            connect_ms.append((time.perf_counter() - start) * 1000)
    size = len(messages.request(0, "heartbeat", {"attempts": [101, 102, 103]}))
    print(f"tunnel_rtt {datetime.date.today()} python {sys.version.split()[0]}, "
          f"OpenSSH sshd on 127.0.0.1, one {size}-byte line per round trip")
    print(summary("ssh tunnel", ssh_ms))
    print(summary("direct tcp", tcp_ms))
    print(f"{'ssh connect':<12} median {statistics.median(connect_ms):.1f} ms (n=20)")
    median = statistics.median(ssh_ms)
    verdict = "meets" if median <= GOAL_MS else "MISSES"
    print(f"tunnel median {median:.3f} ms {verdict} the goal of <= {GOAL_MS} ms")
    return 0 if median <= GOAL_MS else 1


if __name__ == "__main__":
    sys.exit(main())
