"""Every report kind by name: read any report file, print any kind's JSON Schema."""

from __future__ import annotations

import os
from typing import Any

from memaudit.schema._audit import AuditReport
from memaudit.schema._base import Report, ReportError, read_raw
from memaudit.schema._probes import GradientsReport, RetrainReport, RewindReport
from memaudit.schema._scan import ScanReport
from memaudit.schema._unlearn import UnlearnReport

KINDS: dict[str, type[Report]] = {
    cls.KIND: cls
    for cls in (
        ScanReport,
        UnlearnReport,
        AuditReport,
        GradientsReport,
        RewindReport,
        RetrainReport,
    )
}


def report_class(kind: str) -> type[Report]:
    """The report model of ``kind`` (``scan``, ``unlearn``, ``audit``, ...)."""
    if kind not in KINDS:
        raise ReportError(f"unknown report kind {kind!r}; one of: {', '.join(KINDS)}")
    return KINDS[kind]


def from_dict(raw: Any, *, source: str = "<data>") -> Report:
    """Validate a report of any kind (it names its kind)."""
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ReportError(f"{source} is not a memaudit report (no kind/schema_version)")
    return report_class(str(raw["kind"])).from_dict(raw, source=source)


def read_json(path: str | os.PathLike[str]) -> Report:
    """Read one report of any kind from a JSON file."""
    return from_dict(read_raw(path), source=str(path))


def schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of the report ``kind``."""
    return report_class(kind).model_json_schema()
