"""Docs are tested: every command has help text and appears in README.md."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from boss.cli import app as boss_app
from worker.cli import app as worker_app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def commands(group: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        if hasattr(cmd, "commands"):
            yield from commands(cmd, path)
        else:
            yield path, cmd


ALL = [*commands(typer.main.get_command(boss_app), "boss"),
       *commands(typer.main.get_command(worker_app), "worker")]


def test_there_are_commands() -> None:
    assert len(ALL) > 20


@pytest.mark.parametrize(("path", "cmd"), ALL, ids=[p for p, _ in ALL])
def test_command_has_help_and_is_in_readme(path: str, cmd: Any) -> None:
    assert (cmd.help or "").strip(), f"{path} has no help text"
    assert f"`{path}`" in README, f"{path} is not documented in README.md"
