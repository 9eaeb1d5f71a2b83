"""The schema: typed settings, results and reports (pydantic), with no rendering.

Reports are frozen, strict and versioned; :mod:`memaudit.render` turns them into HTML and
Markdown, and nothing here imports it.
"""

from memaudit.schema._audit import (
    AuditPlan,
    AuditReport,
    FileDigest,
    Gate,
    Provenance,
    StageTime,
    Verdict,
    gates,
    n_correct,
    n_localized,
    verdict,
)
from memaudit.schema._base import Report, ReportError
from memaudit.schema._inputs import Preflight, Preprocessing
from memaudit.schema._kinds import KINDS, from_dict, read_json, report_class
from memaudit.schema._probes import (
    Accuracies,
    GradientsReport,
    Grouping,
    LayerGradients,
    LayerRetrain,
    LayerRewind,
    RetrainReport,
    RewindReport,
)
from memaudit.schema._scan import (
    DataSummary,
    ExampleResult,
    LayerCount,
    ModelSummary,
    ScanReport,
    ScanSettings,
    ScanSummary,
    Status,
    Timing,
    Unit,
    summarize,
)
from memaudit.schema._unlearn import (
    IdScore,
    Interval,
    Membership,
    MembershipFigures,
    UnlearnReport,
    UnlearnScores,
    accuracy_gap,
)

__all__ = [
    "KINDS",
    "Accuracies",
    "AuditPlan",
    "AuditReport",
    "DataSummary",
    "ExampleResult",
    "FileDigest",
    "Gate",
    "GradientsReport",
    "Grouping",
    "IdScore",
    "Interval",
    "LayerCount",
    "LayerGradients",
    "LayerRetrain",
    "LayerRewind",
    "Membership",
    "MembershipFigures",
    "ModelSummary",
    "Preflight",
    "Preprocessing",
    "Provenance",
    "Report",
    "ReportError",
    "RetrainReport",
    "RewindReport",
    "ScanReport",
    "ScanSettings",
    "ScanSummary",
    "StageTime",
    "Status",
    "Timing",
    "Unit",
    "UnlearnReport",
    "UnlearnScores",
    "Verdict",
    "accuracy_gap",
    "from_dict",
    "gates",
    "n_correct",
    "n_localized",
    "read_json",
    "report_class",
    "summarize",
    "verdict",
]
