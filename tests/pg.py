"""A real PostgreSQL server for the tests, in a temporary directory.

Started once per test session as the ``postgres`` user (initdb + pg_ctl) on a
free port of 127.0.0.1; each test gets a fresh database copied from a
template that already has the schema.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.ports import free_port


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@dataclass
class PgServer:
    port: int
    datadir: Path
    bindir: Path
    user: str
    durable: bool = False

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> None:
        subprocess.run([str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", self.user, "-d", database, "-v", "ON_ERROR_STOP=1", "-q",
                        "-c", sql], check=True, capture_output=True, timeout=60)

    def restart(self, down_seconds: float = 0.0) -> float:
        """Stop the server as an administrator would (fast: every connection is
        terminated, committed work kept), stay down ``down_seconds``, start it again;
        return how long it refused connections."""
        t0 = time.monotonic()
        _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast",
                      "-w", "-t", "60", "stop"])
        time.sleep(down_seconds)
        _as_postgres(_start_command(self.bindir, self.datadir, self.port, self.durable))
        return time.monotonic() - t0

    def stop(self) -> None:
        _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate",
                      "stop"], check=False)
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


# the tests' server trades crash safety for speed; a benchmark's keeps PostgreSQL's
# defaults (every commit flushed to disk), as a user's server would
_FAST = "-F -c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def _start_command(bindir: Path, datadir: Path, port: int, durable: bool = False
                   ) -> list[str]:
    root = datadir.parent
    return [str(bindir / "pg_ctl"), "-D", str(datadir), "-w", "-t", "60",
            "-l", str(root / "log"), "-o",
            f"-k {root / 'sock'} -h 127.0.0.1 -p {port} -c max_connections=200"
            + ("" if durable else " " + _FAST),
            "start"]


def _as_postgres(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=check, capture_output=True, timeout=120)


def start(durable: bool = False) -> tuple[PgServer | None, str]:
    """Start a server; return (server, "") or (None, why not). ``durable``: with
    PostgreSQL's default fsync and synchronous commit (benchmarks), not without."""
    bindir = _bindir()
    if bindir is None:
        return None, "PostgreSQL is not installed (scripts/test.sh installs it when root)"
    if os.geteuid() == 0:
        try:
            subprocess.run(["id", "postgres"], check=True, capture_output=True)
        except subprocess.CalledProcessError:
            return None, "no 'postgres' user to run the server as"
    root = Path(tempfile.mkdtemp(prefix="ecloud-pg-"))
    os.chmod(root, 0o755)
    datadir = root / "data"
    sockdir = root / "sock"
    sockdir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockdir, "postgres")
    port = free_port()
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    try:
        _as_postgres([str(bindir / "initdb"), "-D", str(datadir), "-U", user, "-A", "trust",
                      "--no-sync", "-E", "UTF8"])
        _as_postgres(_start_command(bindir, datadir, port, durable))
    except subprocess.CalledProcessError as exc:
        return None, f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')[-500:]}"
    server = PgServer(port, datadir, bindir, user, durable)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            server.psql("SELECT 1")
            break
        except subprocess.CalledProcessError:
            time.sleep(0.1)
    return server, ""
