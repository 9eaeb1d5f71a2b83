"""The one exception type for problems a user can fix (bad paths, ids, shapes, options)."""

from __future__ import annotations


class MemauditError(Exception):
    """A user-facing error: its message names the problem and the fix in one line.

    The CLI prints it without a traceback and exits with status 2.
    """


class MissingSplitError(MemauditError):
    """The dataset has no split of that name (an optional split may be treated as absent)."""
