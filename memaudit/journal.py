"""The scan journal: results appended as JSON lines while a scan runs, so it can resume.

The first line is a header with a key (settings, model, data); each later line is one
:class:`~memaudit.schema.ExampleResult`. A line cut short by a crash is dropped on resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from memaudit.errors import MemauditError
from memaudit.schema import ExampleResult

FORMAT = "memaudit-scan-journal/1"


def start(
    journal: str | os.PathLike[str] | None, key: dict[str, Any], *, resume: bool
) -> list[ExampleResult]:
    """The results an earlier run wrote to ``journal`` (when resuming); a fresh one otherwise."""
    if journal is None:
        return []
    path = Path(journal)
    if path.exists() and resume:
        lines = path.read_text().splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("format") != FORMAT or header.get("key") != key:
            raise MemauditError(
                f"{path} was written by a scan with other settings, model or data; delete it to "
                "start over or rerun with the same options"
            )
        results = []
        for line in lines[1:]:
            try:
                results.append(ExampleResult.model_validate_json(line))
            except ValidationError:
                break  # a line cut short by a crash: redo from there
        # Rewrite without any cut-short tail so later appends stay readable.
        path.write_text("".join([lines[0] + "\n", *(r.model_dump_json() + "\n" for r in results)]))
        return results
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, "key": key}) + "\n")
    return []


def append(journal: str | os.PathLike[str] | None, results: Sequence[ExampleResult]) -> None:
    """Append ``results`` and flush them to disk (they survive a crash or Ctrl-C)."""
    if journal is None:
        return
    with open(journal, "a") as f:
        f.writelines(r.model_dump_json() + "\n" for r in results)
        f.flush()
        os.fsync(f.fileno())
