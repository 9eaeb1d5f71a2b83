"""The one exception type for problems a user can fix (bad paths, ids, shapes, options)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class MemauditError(Exception):
    """A user-facing error: its message names the problem and the fix in one line.

    The CLI prints it without a traceback and exits with status 2.
    """


class MissingSplitError(MemauditError):
    """The dataset has no split of that name (an optional split may be treated as absent)."""


def first_problem(error: ValidationError) -> tuple[tuple[str, ...], str]:
    """Where (the field path) and what, of the first problem of a pydantic error."""
    first = error.errors()[0]
    if first["type"] == "extra_forbidden":
        what = "unknown key"
    elif first["type"] == "value_error":  # a validator's own message, without pydantic's prefix
        what = str(first.get("ctx", {}).get("error", first["msg"]))
    else:
        what = first["msg"]
    return tuple(str(p) for p in first["loc"]), what


def validation_problem(error: ValidationError) -> str:
    """The first problem of a pydantic error as ``'where: what'`` (one line)."""
    loc, what = first_problem(error)
    return f"{'.'.join(loc)}: {what}" if loc else what


def validated(model: type[M], values: Mapping[str, Any], what: str) -> M:
    """``model`` validated from ``values``, or one-line error naming ``what`` and the problem."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise MemauditError(f"invalid {what} {validation_problem(err)}") from None
