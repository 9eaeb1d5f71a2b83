"""The audit report: one scan, the unlearning step, the re-scan, gates and provenance.

The schema and the verdict and gate arithmetic; their sentences are in :mod:`memaudit.render`.
"""

from __future__ import annotations

import platform
from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from memaudit.schema._base import Report
from memaudit.schema._scan import ScanReport, ScanSettings, Status
from memaudit.schema._unlearn import UnlearnReport, UnlearnSettings

_STRICT = ConfigDict(frozen=True, extra="forbid")


class FileDigest(BaseModel):
    """A file an audit read or wrote, with its SHA-256, so an auditor can check it is the same."""

    model_config = _STRICT
    path: str
    sha256: str
    bytes: int


class StageTime(BaseModel):
    """Wall time of one stage of an audit (load, scan, unlearn, rescan, ...)."""

    model_config = _STRICT
    stage: str
    started: datetime
    seconds: float = Field(ge=0)


class Provenance(BaseModel):
    """What an auditor needs to rerun an audit and check it ran on the same inputs."""

    model_config = _STRICT
    command: str | None = Field(None, description="the exact command line, when run from the CLI")
    weights: FileDigest | None = Field(None, description="the model's weights file")
    flagged_ids: FileDigest | None = Field(None, description="the flagged-ids file")
    unlearned_model: FileDigest | None = Field(None, description="the unlearned model written")
    seeds: dict[str, int] = Field(default_factory=dict, description="seed of each stage")
    versions: dict[str, str] = Field(default_factory=dict, description="python and packages")
    device: str
    device_name: str | None = None
    platform: str = Field(default_factory=platform.platform)
    stages: list[StageTime] = Field(default_factory=list)


GateName = Literal[
    "max-flagged-accuracy", "max-localized-fraction", "max-gap-to-retrain", "max-membership-tpr"
]


class Gate(BaseModel):
    """A pass/fail threshold a pipeline set on the audit (``value`` must be ``<= threshold``)."""

    model_config = _STRICT
    name: GateName
    threshold: float
    value: float | None = Field(description="the measured value; None if it could not be")
    passed: bool
    weak_reference: bool = Field(False, description="failed: the reference it gaps is weak")


class Verdict(BaseModel):
    """The audit's headline numbers (fractions are of all flagged examples)."""

    model_config = _STRICT
    n_flagged: int
    localized_units: int = Field(description="N: 'localized' means flips with at most N units")
    n_correct_before: int = Field(description="flagged examples predicted as their given label")
    n_localized: int = Field(description="flagged examples that flip with <= N units")
    localized_fraction: float
    median_units: float | None = Field(description="median minimal units of flipped examples")
    flagged_accuracy_after: float | None = Field(None, description="after unlearning")
    n_correct_after: int | None = Field(None, description="given label still predicted (rescan)")
    n_localized_after: int | None = Field(None, description="still flip with <= N units (rescan)")
    warnings: list[str] = Field(
        default_factory=list, description="what limits the audit (from the preflight check)"
    )
    weak_reference: bool = Field(
        False, description="the retrained reference falls short of the original's test accuracy"
    )
    gap_to_retrain: float | None = Field(
        None, description="average gap of the unlearned model to the retrained reference"
    )
    membership_tpr_after: float | None = Field(
        None, description="membership test after unlearning: TPR at 1% FPR"
    )


class AuditPlan(BaseModel):
    """What an audit does: its scan, its unlearning step and its gates.

    ``unlearn``: how :func:`memaudit.unlearn.unlearn` runs (method, budget, yardsticks).
    ``localized_units`` (N): an example "rests on a handful
    of units" when it flips with at most N units. ``compare``: also scan that many random
    non-flagged ids as a comparison group. Gates (``max_*``) are recorded in the report; a
    failed gate is a result, not an error.
    """

    model_config = _STRICT
    scan: ScanSettings = Field(default_factory=ScanSettings)
    unlearn: UnlearnSettings = Field(default_factory=UnlearnSettings)
    no_unlearn: bool = Field(False, description="scan only: skip unlearning and the re-scan")
    localized_units: int = Field(
        5, description="N: an example is localized when it flips with <= N units"
    )
    compare: int = Field(0, description="also scan this many random non-flagged ids")
    max_flagged_accuracy: float | None = Field(
        None, description="gate: fail (exit 1) if flagged accuracy after unlearning is above X"
    )
    max_localized_fraction: float | None = Field(
        None,
        description="gate: fail (exit 1) if more than this share of flagged examples flip with "
        "<= --localized-units units (before unlearning)",
    )
    max_gap_to_retrain: float | None = Field(
        None,
        description="gate: fail (exit 1) if the average gap to the model retrained without the "
        "flagged ids is above X (needs --compare-retrain)",
    )
    max_membership_tpr: float | None = Field(
        None,
        description="gate: fail (exit 1) if after unlearning the membership test finds more "
        "than X of the flagged ids at 1% FPR (needs --membership-references)",
    )


class AuditReport(Report):
    """Typed result of ``memaudit audit`` / ``Auditor.audit`` (``memaudit schema audit``).

    Example:
        >>> report = AuditReport.from_json("audit/audit.json")          # doctest: +SKIP
        >>> report.verdict.localized_fraction, [g.passed for g in report.gates]  # doctest: +SKIP
    """

    KIND: ClassVar[str] = "audit"
    SCHEMA_VERSION: ClassVar[int] = 3  # 2: preflight, verdict warnings; 3: scan and unlearn 3
    kind: Literal["audit"] = "audit"
    schema_version: int = 3

    verdict: Verdict
    scan: ScanReport = Field(description="the scan of the flagged ids on the original model")
    unlearn: UnlearnReport | None = Field(None, description="None with --no-unlearn")
    rescan: ScanReport | None = Field(None, description="the unlearned model, same ids")
    comparison: ScanReport | None = Field(None, description="a scan of non-flagged ids")
    gates: list[Gate] = Field(default_factory=list)
    provenance: Provenance

    @property
    def passed(self) -> bool:
        """Whether every gate passed (True when none was set)."""
        return all(g.passed for g in self.gates)


def n_localized(scan: ScanReport, units: int) -> int:
    """Examples of ``scan`` that flip with at most ``units`` units (minimal set)."""
    return sum(e.status is Status.FLIPPED and e.n_units_minimal <= units for e in scan.examples)


def n_correct(scan: ScanReport) -> int:
    """Examples predicted as their given label before the search (i.e. not misclassified)."""
    return scan.summary.n_flagged - scan.summary.n_misclassified


def verdict(
    scan: ScanReport,
    *,
    localized_units: int,
    unlearn: UnlearnReport | None = None,
    rescan: ScanReport | None = None,
) -> Verdict:
    """The headline numbers of a scan, and of the unlearning and re-scan when given."""
    n = scan.summary.n_flagged
    localized = n_localized(scan, localized_units)
    return Verdict(
        n_flagged=n,
        localized_units=localized_units,
        n_correct_before=n_correct(scan),
        n_localized=localized,
        localized_fraction=localized / n if n else 0.0,
        median_units=scan.summary.median_units_minimal,
        flagged_accuracy_after=unlearn.after.flagged_accuracy if unlearn else None,
        n_correct_after=n_correct(rescan) if rescan else None,
        n_localized_after=n_localized(rescan, localized_units) if rescan else None,
        warnings=list(scan.preflight.warnings) if scan.preflight else [],
        gap_to_retrain=unlearn.average_gap() if unlearn else None,
        weak_reference=bool(unlearn and unlearn.reference_check and unlearn.reference_check.weak),
        membership_tpr_after=(
            unlearn.membership.after.tpr_at_1pct_fpr.value
            if unlearn and unlearn.membership
            else None
        ),
    )


def gates(
    found: Verdict,
    *,
    max_flagged_accuracy: float | None = None,
    max_localized_fraction: float | None = None,
    max_gap_to_retrain: float | None = None,
    max_membership_tpr: float | None = None,
) -> list[Gate]:
    """The gates that were set (and could be measured), checked against ``found``."""
    checks: list[tuple[GateName, float | None, float | None]] = [
        ("max-flagged-accuracy", max_flagged_accuracy, found.flagged_accuracy_after),
        ("max-localized-fraction", max_localized_fraction, found.localized_fraction),
        ("max-gap-to-retrain", max_gap_to_retrain, found.gap_to_retrain),
        ("max-membership-tpr", max_membership_tpr, found.membership_tpr_after),
    ]
    # A gate that was set but could not be measured fails: a pipeline must not pass silently;
    # so does a gap to a weak reference, which is no evidence.
    return [
        Gate(
            name=name,
            threshold=limit,
            value=value,
            passed=value is not None
            and value <= limit
            and not (name == "max-gap-to-retrain" and found.weak_reference),
            weak_reference=name == "max-gap-to-retrain" and found.weak_reference,
        )
        for name, limit, value in checks
        if limit is not None
    ]
