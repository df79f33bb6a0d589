"""The CLI's two consoles and the one way a user's mistake ends a command: one line per problem
on stderr, exit code 2."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)



def set_option(help: str = "override: dotted.key=value (repeatable)") -> Any:
    """The one `--set` option of every command that takes a run config (orchestrator/config.py parses
    it); a command whose overrides reach further (a sweep file's keys) says so in its help."""
    return Annotated[list[str] | None, typer.Option("--set", help=help)]


SetOpt = set_option()


def fail(problems: Iterable[str] | str, code: int = 2) -> NoReturn:
    """Every command's way out for a user's mistake: an `error:` line per problem, exit `code`."""
    if isinstance(problems, str):
        problems = [problems]
    for p in problems:
        err_console.print(f"[red]error:[/red] {p}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
