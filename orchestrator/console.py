"""The CLI's two consoles and the one way a user's mistake ends a command: one line per problem
on stderr, exit code 2."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, NoReturn

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

# The one `--set` option of every command that takes a run config (orchestrator/config.py parses it).
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: dotted.key=value (repeatable)")]


def fail(problems: Iterable[str], code: int = 2) -> NoReturn:
    for p in problems:
        err_console.print(f"[red]error:[/red] {p}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
