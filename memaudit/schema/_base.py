"""The base every memaudit report shares: versioned, frozen, strict, JSON round-trip."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from memaudit._version import __version__
from memaudit.errors import MemauditError, validation_problem

R = TypeVar("R", bound="Report")


class ReportError(MemauditError):
    """A file is not a memaudit report of the expected kind, or is of a newer schema."""


def read_raw(path: str | os.PathLike[str]) -> Any:
    """The parsed JSON of a report file; one-line errors for a missing or non-JSON file."""
    file = Path(path)
    if not file.is_file():
        raise ReportError(f"report {str(path)!r} not found")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ReportError(f"{file} is not JSON, so not a memaudit report") from None


class Report(BaseModel):
    """Base of every report: ``kind``, ``schema_version``, tool version, creation time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    KIND: ClassVar[str] = "report"
    SCHEMA_VERSION: ClassVar[int] = 1

    kind: str
    schema_version: int
    memaudit_version: str = __version__
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @model_validator(mode="before")
    @classmethod
    def _known_schema(cls, raw: Any) -> Any:
        """Refuse a newer schema, also for a report nested in another (a scan in an audit)."""
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if isinstance(version, int) and version > cls.SCHEMA_VERSION:
            raise ValueError(
                f"{cls.KIND} schema version {version} is newer than this memaudit reads "
                f"({cls.SCHEMA_VERSION}); upgrade memaudit"
            )
        return raw

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as indented JSON."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.model_dump_json(indent=2))
        return out

    @classmethod
    def from_json(cls: type[R], path: str | os.PathLike[str]) -> R:
        """Read and validate a report; a clear error for other files or newer schemas."""
        return cls.from_dict(read_raw(path), source=str(path))

    @classmethod
    def from_dict(cls: type[R], raw: object, *, source: str = "<data>") -> R:
        if not isinstance(raw, dict) or "schema_version" not in raw or "kind" not in raw:
            raise ReportError(f"{source} is not a memaudit report (no kind/schema_version)")
        if raw["kind"] != cls.KIND:
            raise ReportError(f"{source} is a {raw['kind']!r} report, not a {cls.KIND!r} report")
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            problem = validation_problem(err)
            raise ReportError(f"{source} is not a valid {cls.KIND} report: {problem}") from None
