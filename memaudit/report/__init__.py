"""Typed audit reports (pydantic): JSON for pipelines; renderers are pure functions of a report."""

from memaudit.report._base import Report, ReportError

__all__ = ["Report", "ReportError"]
