"""Running a typer app the ecloud way: user errors as one line, no traceback.

Shared by the ``boss`` and ``worker`` commands. Exit codes: 0 success,
1 a failure outside the user's control (database, network), 2 bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer
from rich.console import Console
from rich.text import Text

from protocol.errors import EcloudError
from protocol.settings import load_settings

err = Console(stderr=True, highlight=False, soft_wrap=True)


def run(app: typer.Typer, user_errors: tuple[type[BaseException], ...],
        argv: list[str] | None = None, name: str = "ecloud") -> int:
    """Run ``app``; translate ecloud errors to messages and exit codes."""
    try:
        # standalone: typer itself reports usage errors (exit 2) and calls sys.exit
        app(args=argv, prog_name=name)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except user_errors as exc:
        _print_error(exc)
        return 2
    except EcloudError as exc:
        _print_error(exc)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    return 0


def _print_error(exc: BaseException) -> None:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        # messages quote user input, which must not be read as rich markup
        err.print(Text.assemble(("error: ", "bold red"), line))


def load_settings_option(
    ctx: typer.Context,
    settings: str | None = typer.Option(
        None, "--settings", envvar="ECLOUD_SETTINGS",
        help="Settings TOML file (else ./ecloud.toml, else built-in defaults)."),
) -> None:
    """The ``--settings`` option of ``boss`` and ``worker``: settings are loaded once, here."""
    ctx.obj = {"settings": load_settings(settings)}


def main_for(app: typer.Typer, user_errors: tuple[type[BaseException], ...],
             name: str) -> Callable[[], None]:
    def main() -> None:
        sys.exit(run(app, user_errors, name=name))

    return main
