"""Typed audit reports (pydantic): JSON for pipelines; renderers are pure functions of a report."""

from memaudit.report._audit import AuditReport, Gate, Provenance, Verdict
from memaudit.report._base import Report, ReportError
from memaudit.report._kinds import KINDS, read_json, report_class
from memaudit.report._probes import (
    Accuracies,
    GradientsReport,
    Grouping,
    LayerGradients,
    LayerRetrain,
    LayerRewind,
    RetrainReport,
    RewindReport,
)
from memaudit.report._scan import ExampleResult, ScanReport, ScanSettings, Status, UnitRef
from memaudit.report._unlearn import UnlearnReport, UnlearnScores
from memaudit.report.html import read_html, read_reports, render_html, write_html

__all__ = [
    "KINDS",
    "Accuracies",
    "AuditReport",
    "ExampleResult",
    "Gate",
    "GradientsReport",
    "Grouping",
    "LayerGradients",
    "LayerRetrain",
    "LayerRewind",
    "Provenance",
    "Report",
    "ReportError",
    "RetrainReport",
    "RewindReport",
    "ScanReport",
    "ScanSettings",
    "Status",
    "UnitRef",
    "UnlearnReport",
    "UnlearnScores",
    "Verdict",
    "read_html",
    "read_json",
    "read_reports",
    "render_html",
    "report_class",
    "write_html",
]
