"""The one exception type for problems a user can fix (bad paths, ids, shapes, options)."""

from __future__ import annotations

from pydantic import ValidationError


class MemauditError(Exception):
    """A user-facing error: its message names the problem and the fix in one line.

    The CLI prints it without a traceback and exits with status 2.
    """


class MissingSplitError(MemauditError):
    """The dataset has no split of that name (an optional split may be treated as absent)."""


def validation_problem(error: ValidationError) -> str:
    """The first problem of a pydantic error as ``'where: what'`` (one line)."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    return f"{where}: {what}"
