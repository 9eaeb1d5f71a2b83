"""The Typer app and the consoles every command shares (rich output goes to stderr)."""

from __future__ import annotations

import os

import typer
from rich.console import Console

from memaudit._version import __version__
from memaudit.errors import MemauditError

app = typer.Typer(
    name="memaudit",
    help="Audit image classifiers for memorized training examples, localize, and remove them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        out.print(f"memaudit {__version__}")
        raise typer.Exit()


DISTRIBUTED = {"scan", "unlearn"}  # the commands that run across the processes of torchrun


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """memaudit: does this model remember these images, where, and can it forget them?"""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and ctx.invoked_subcommand not in DISTRIBUTED:
        raise MemauditError(
            f"memaudit {ctx.invoked_subcommand} runs in one process; under torchrun only "
            f"{' and '.join(f'memaudit {c}' for c in sorted(DISTRIBUTED))} run across "
            "processes: run it without torchrun"
        )
