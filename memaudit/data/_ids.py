"""Flagged-ids files: one example id per line, ``#`` comments allowed."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from memaudit.errors import MemauditError


def read_ids(path: str | os.PathLike[str]) -> list[int]:
    """Read a flagged-ids file: one integer per line, ``#`` comments and blank lines allowed.

    Duplicates are dropped (first occurrence kept) with a warning.
    """
    file = Path(path)
    if not file.is_file():
        raise MemauditError(f"flagged-ids file {str(path)!r} not found")
    ids: list[int] = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise MemauditError(
                f"{file}:{number}: {text!r} is not an integer example id; one id per line"
            ) from None
    if not ids:
        raise MemauditError(f"{file} lists no example ids; put one id per line")
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):
        warnings.warn(
            f"{file}: dropped {len(ids) - len(unique)} duplicate ids", UserWarning, stacklevel=2
        )
    return unique


def write_ids(path: str | os.PathLike[str], ids: Sequence[int], *, comment: str = "") -> Path:
    """Write ids one per line (with an optional ``#`` comment header)."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    file.write_text(head + "".join(f"{i}\n" for i in ids))
    return file
