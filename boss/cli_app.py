"""The ``boss`` command's Typer apps and what every command module shares.

The commands live in :mod:`boss.cli` (tasks, workers, serving) and
:mod:`boss.cli_observe` (watching a run); both register on these apps.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

from boss.service import Boss
from protocol.console import load_settings_option

out = Console(highlight=False, soft_wrap=True)

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, add_completion=False,
                  help="ecloud boss: push tasks, watch them run, manage workers.")
admin = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                    help="Administration: status, context, workers.")
dbapp = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Database schema.")
app.add_typer(admin, name="admin")
app.add_typer(dbapp, name="db")


def _boss(ctx: typer.Context) -> Boss:
    boss: Boss | None = ctx.obj.get("boss")
    if boss is None:
        boss = Boss(ctx.obj["settings"])
        ctx.obj["boss"] = boss
        ctx.call_on_close(boss.close)
    return boss


def _json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


app.callback()(load_settings_option)


