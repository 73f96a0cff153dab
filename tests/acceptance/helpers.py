"""Running the ``boss`` console script as a user would: subprocesses, a settings file.

Each subprocess costs an interpreter start and the boss's imports, so tests
group their checks, and read-only commands that do not depend on each other
run side by side through :meth:`Cli.run_all` (at most ``PARALLEL`` at once).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PARALLEL = 4
TIMEOUT = 120  # seconds; a bound on a hung command, never an assertion about speed


def boss_executable() -> str:
    beside = Path(sys.executable).parent / "boss"
    if beside.is_file():
        return str(beside)
    found = shutil.which("boss")
    if found is None:
        pytest.fail("the `boss` console script is not installed (pip install -e .[test])")
    return found


@dataclass(frozen=True)
class Ran:
    argv: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (f"$ boss {' '.join(self.argv)}\nexit {self.code}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")


class Cli:
    """The ``boss`` command bound to one directory and one settings file."""

    def __init__(self, cwd: Path, settings: Path | None) -> None:
        self.cwd = cwd
        self.settings = settings
        self.exe = boss_executable()
        # the developer's ECLOUD_ variables never reach the commands under test
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
        self.env["NO_COLOR"] = "1"

    def command(self, args: Sequence[str], settings: bool = True) -> list[str]:
        prefix = ["--settings", str(self.settings)] if settings and self.settings else []
        return [self.exe, *prefix, *args]

    def run(self, *args: str, stdin: bytes = b"", settings: bool = True,
            env: dict[str, str] | None = None) -> Ran:
        """Run ``boss [--settings FILE] ARGS``; every run is checked for tracebacks."""
        proc = subprocess.run(self.command(args, settings), cwd=self.cwd, input=stdin,
                              capture_output=True, timeout=TIMEOUT, check=False,
                              env={**self.env, **(env or {})})
        ran = Ran(tuple(args), proc.returncode, proc.stdout.decode(errors="replace"),
                  proc.stderr.decode(errors="replace"))
        assert "Traceback" not in ran.stderr, str(ran)
        return ran

    def ok(self, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> Ran:
        ran = self.run(*args, stdin=stdin, env=env)
        assert ran.code == 0, str(ran)
        return ran

    def run_all(self, commands: Sequence[Sequence[str]]) -> list[Ran]:
        """Run independent commands side by side; results in the order given."""
        with ThreadPoolExecutor(PARALLEL) as pool:
            return list(pool.map(lambda args: self.run(*args), commands))


def write_settings(directory: Path, name: str = "settings.toml") -> Path:
    """A settings file with a SQLite database and datastore inside ``directory``."""
    path = directory / name
    path.write_text(
        "[boss]\n"
        f'database_url = "sqlite:///{directory}/state/boss.db"\n'
        "[datastore]\n"
        f'default = "file://{directory}/data"\n'
        "[datastore.buckets]\n"
        f'data = "file://{directory}/data"\n'
        "[worker]\n"
        f'workdir = "{directory}/work"\n'
        f'cache_dir = "{directory}/cache"\n',
        encoding="utf-8")
    return path


def db_path(directory: Path) -> Path:
    return directory / "state" / "boss.db"


def snapshot(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every ecloud table, read with the stdlib (not through the boss)."""
    con = sqlite3.connect(database)
    try:
        names = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {n: sorted(con.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr)
                for n in names}
    finally:
        con.close()


def task(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "commands": [{"command": ["true"]}], **kw}


def seed(cli: Cli, docs: Sequence[dict[str, Any]]) -> None:
    """Set up state without paying for subprocesses: init and push through the library.

    The commands under test still run as subprocesses; this is only the
    starting point, made with the same settings file.
    """
    from boss.service import Boss
    from protocol.settings import load_settings

    boss = Boss(load_settings(str(cli.settings) if cli.settings else None, environ={},
                              cwd=cli.cwd))
    try:
        boss.init()
        if docs:
            path = cli.cwd / "seed.jsonl"
            path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
            boss.push(path)
            path.unlink()
    finally:
        boss.close()
