"""Command-line interface: thin commands over the Python API (``memaudit --help``)."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import typer
from rich.markup import escape

from memaudit.cli import _demo, _probe, _recipe, _report, _scan, _testbed, _unlearn  # noqa: F401
from memaudit.cli._app import app, err
from memaudit.cli._report import GateFailed
from memaudit.errors import MemauditError

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


def _show_warning(
    message: Warning | str, category: type[Warning], *args: object, **kw: object
) -> None:
    err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (one line on stderr, no traceback, on failure).

    0 ok, 1 a gate failed, 2 bad input or usage (``MemauditError``), 3 memaudit itself failed
    (any other exception; ``MEMAUDIT_TRACEBACK=1`` shows the traceback).
    """
    warnings.showwarning = _show_warning  # one-line warnings, no source line
    _report.ARGV[:] = list(argv) if argv is not None else sys.argv[1:]
    try:
        result = app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except MemauditError as error:
        # Messages hold paths and shapes like "[batch, classes]": print them, not as markup.
        err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except typer.Exit as done:
        return int(done.exit_code)
    except typer.TyperException as error:  # typer's bundled click: usage errors, bad options
        show = getattr(error, "show", None)
        if callable(show):
            show()
        return EXIT_USAGE
    except (typer.Abort, KeyboardInterrupt):
        err.print("[red]interrupted[/]")
        return 130
    except GateFailed as failed:
        err.print(str(failed), style="bold red", highlight=False, soft_wrap=True, markup=False)
        return EXIT_GATE
    except Exception as crash:  # a crash must never look like a failed gate (exit 1)
        if os.environ.get("MEMAUDIT_TRACEBACK"):
            raise
        message = " ".join(str(crash).split())  # one line, whatever the exception holds
        err.print(
            f"failed: {type(crash).__name__}: {message} (a bug or an environment problem; rerun "
            "with MEMAUDIT_TRACEBACK=1 for the traceback)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        return EXIT_FAILED
    return int(result) if isinstance(result, int) else EXIT_OK


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
