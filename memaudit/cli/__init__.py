"""Command-line interface: thin commands over the Python API (``memaudit --help``)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import click

from memaudit.cli import _probe, _report, _scan, _testbed, _unlearn  # noqa: F401  (commands)
from memaudit.cli._app import app, err
from memaudit.errors import MemauditError

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


def _show_warning(
    message: Warning | str, category: type[Warning], *args: object, **kw: object
) -> None:
    err.print(f"[yellow]warning:[/] {message}", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return 2 (no traceback)."""
    warnings.showwarning = _show_warning  # one-line warnings, no source line
    try:
        result = app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except MemauditError as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.ClickException as error:
        error.show()
        return EXIT_USAGE
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("[red]interrupted[/]")
        return 130
    return int(result) if isinstance(result, int) else EXIT_OK


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
