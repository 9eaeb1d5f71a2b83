"""Typed audit reports (pydantic): JSON for pipelines; renderers are pure functions of a report."""

from memaudit.report._base import Report, ReportError
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

__all__ = [
    "Accuracies",
    "ExampleResult",
    "GradientsReport",
    "Grouping",
    "LayerGradients",
    "LayerRetrain",
    "LayerRewind",
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
]
