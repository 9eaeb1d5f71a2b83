"""The scan journal: results appended as JSON lines while a scan runs, so it can resume.

The first line is a header with a key (settings, model, data); each later line is one
:class:`~memaudit.schema.ExampleResult`. A line cut short by a crash is dropped on resume. A scan
over several processes writes one file per rank (``NAME.rank1.jsonl`` beside ``NAME.jsonl``);
a result depends only on the key and the id, so a resume reads every file of the scan,
whatever the world size that wrote it.
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


def rank_file(journal: str | os.PathLike[str], rank: int, world: int) -> Path:
    """The file rank ``rank`` of ``world`` writes: the journal itself for one process."""
    path = Path(journal)
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def files(journal: str | os.PathLike[str]) -> list[Path]:
    """The journal and its per-rank files that exist."""
    path = Path(journal)
    ranks = sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))
    return [p for p in (path, *ranks) if p.exists()]


def read(journal: str | os.PathLike[str], key: dict[str, Any]) -> list[ExampleResult]:
    """Every result the files of ``journal`` hold (a cut-short tail is left out); a clear error
    if one was written by a scan with another key."""
    results = []
    for path in files(journal):
        lines = path.read_text().splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("format") != FORMAT:
            raise MemauditError(
                f"{path} is not a scan journal of this memaudit ({FORMAT}); delete it to start over"
            )
        if header.get("key") != key:
            raise MemauditError(
                f"{path} was written by a scan with other {_differing(header.get('key'), key)}; "
                "delete it to start over or rerun with the same options"
            )
        for line in lines[1:]:
            try:
                results.append(ExampleResult.model_validate_json(line))
            except ValidationError:
                break  # a line cut short by a crash: redo from there
    return results


def _differing(old: Any, new: dict[str, Any]) -> str:
    """What differs between a journal's key and this scan's, for the error: the settings by
    name (``settings (precision: float32 then, mixed now)``), or the model or data."""
    if not isinstance(old, dict):
        return "settings, model or data"
    was, now = old.get("settings") or {}, new["settings"]
    names = [k for k in now if was.get(k) != now[k]]
    if names:
        said = ", ".join(f"{k}: {was.get(k)} then, {now[k]} now" for k in names)
        return f"settings ({said})"
    return " and ".join(k for k in ("model", "data") if old.get(k) != new[k])


def start(
    journal: str | os.PathLike[str] | None,
    key: dict[str, Any],
    *,
    resume: bool,
    rank: int = 0,
    world: int = 1,
) -> Path | None:
    """Open this process's journal file for appending: a fresh one, or (``resume``) the one it
    wrote before, rewritten without a cut-short tail so later appends stay readable."""
    if journal is None:
        return None
    path = rank_file(journal, rank, world)
    kept: list[str] = []
    if resume and path.exists():
        lines = path.read_text().splitlines()
        for line in lines[1:]:
            try:
                ExampleResult.model_validate_json(line)
            except ValidationError:
                break
            kept.append(line + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, "key": key}) + "\n" + "".join(kept))
    return path


def append(path: Path | None, results: Sequence[ExampleResult]) -> None:
    """Append ``results`` and flush them to disk (they survive a crash or Ctrl-C)."""
    if path is None:
        return
    with open(path, "a") as f:
        f.writelines(r.model_dump_json() + "\n" for r in results)
        f.flush()
        os.fsync(f.fileno())


def remove(journal: str | os.PathLike[str]) -> None:
    """Delete the journal and its per-rank files (after the report is written)."""
    for path in files(journal):
        path.unlink(missing_ok=True)
