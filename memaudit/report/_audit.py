"""The audit report: one scan, the unlearning step, the re-scan, gates and provenance."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from collections.abc import Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from memaudit.report._base import Report
from memaudit.report._scan import ScanReport, Status
from memaudit.report._unlearn import UnlearnReport

_STRICT = ConfigDict(frozen=True, extra="forbid")
PACKAGES = ("memaudit", "torch", "torchvision", "timm", "transformers", "numpy", "captum")


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


class Gate(BaseModel):
    """A pass/fail threshold a pipeline set on the audit (``value`` must be ``<= threshold``)."""

    model_config = _STRICT
    name: Literal["max-flagged-accuracy", "max-localized-fraction"]
    threshold: float
    value: float
    passed: bool

    @property
    def message(self) -> str:
        """One line: which gate, the measured value, and by how much it missed (or passed)."""
        what = {
            "max-flagged-accuracy": "flagged accuracy after unlearning",
            "max-localized-fraction": "share of flagged examples localized",
        }[self.name]
        if self.passed:
            return f"gate --{self.name} passed: {what} {self.value:.1%} <= {self.threshold:.1%}"
        return (
            f"gate --{self.name} failed: {what} is {self.value:.1%}, above the limit "
            f"{self.threshold:.1%} by {(self.value - self.threshold) * 100:.1f} pts"
        )


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


class AuditReport(Report):
    """Typed result of ``memaudit audit`` / ``Auditor.audit`` (``memaudit schema audit``).

    Example:
        >>> report = AuditReport.from_json("audit/audit.json")          # doctest: +SKIP
        >>> report.verdict.localized_fraction, [g.passed for g in report.gates]  # doctest: +SKIP
    """

    KIND: ClassVar[str] = "audit"
    SCHEMA_VERSION: ClassVar[int] = 2  # 2: preflight and verdict warnings
    kind: Literal["audit"] = "audit"
    schema_version: int = 2

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
    )


def gates(
    found: Verdict,
    *,
    max_flagged_accuracy: float | None = None,
    max_localized_fraction: float | None = None,
) -> list[Gate]:
    """The gates that were set, checked against ``found``."""
    result = []
    if max_flagged_accuracy is not None and found.flagged_accuracy_after is not None:
        value = found.flagged_accuracy_after
        result.append(
            Gate(
                name="max-flagged-accuracy",
                threshold=max_flagged_accuracy,
                value=value,
                passed=value <= max_flagged_accuracy,
            )
        )
    if max_localized_fraction is not None:
        value = found.localized_fraction
        result.append(
            Gate(
                name="max-localized-fraction",
                threshold=max_localized_fraction,
                value=value,
                passed=value <= max_localized_fraction,
            )
        )
    return result


def digest(path: str | os.PathLike[str] | None) -> FileDigest | None:
    """SHA-256 of a file (of every file, in name order, for a directory); None if absent."""
    if path is None:
        return None
    root = Path(path)
    if not root.exists():
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    sha = hashlib.sha256()
    size = 0
    for file in files:
        if root.is_dir():
            sha.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
                size += len(block)
    return FileDigest(path=str(root), sha256=sha.hexdigest(), bytes=size)


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Python and the installed versions of ``packages`` (missing ones omitted)."""
    found = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def verdict_sentences(
    scan: ScanReport,
    found: Verdict,
    *,
    unlearns: Sequence[UnlearnReport] = (),
    rescan: ScanReport | None = None,
    comparisons: Sequence[ScanReport] = (),
    unlearn_skipped: bool = False,
) -> list[str]:
    """The verdict in plain words (plain text: callers escape it for HTML or Markdown)."""
    n, c, k, cap = found.n_flagged, found.n_correct_before, found.n_localized, found.localized_units
    s = scan.summary
    share = _pct(c / n if n else None)
    lines = [f"The model predicts the given label for {c} of {n} flagged examples ({share})."]
    if s.n_misclassified:
        lines[0] += (
            f" The other {s.n_misclassified} are misclassified already and were not searched."
        )
    if c:
        median = (
            f"median {s.median_units_minimal:g} units" if s.median_units_minimal else "none flipped"
        )
        lines.append(
            f"{k} of them ({_pct(found.localized_fraction)} of all flagged) rest on a handful of "
            f"units: zeroing at most {cap} of the model's {scan.model.n_units} units flips their "
            f"prediction ({median} among the {s.n_flipped} that flipped)."
        )
    if s.n_budget_exhausted:
        lines.append(
            f"{s.n_budget_exhausted} did not flip within the budget of "
            f"{scan.settings.max_units} units."
        )
    if s.mean_test_accuracy_drop is not None:
        lines.append(
            f"An edit costs on average {s.mean_test_accuracy_drop * 100:.1f} pts of test accuracy"
            f" (from {_pct(s.test_accuracy_before)})."
        )
    elif s.mean_reference_accuracy_drop is not None:
        lines.append(
            f"An edit costs on average {s.mean_reference_accuracy_drop * 100:.1f} pts of accuracy "
            "on the reference examples."
        )
    for other in comparisons:
        m = other.summary.median_units_minimal
        ratio = (
            f" ({m / s.median_units_minimal:.1f}× the flagged median)"
            if (m and s.median_units_minimal)
            else ""
        )
        lines.append(
            f"For comparison, {other.summary.n_flagged} non-flagged examples: "
            f"{other.summary.n_flipped} flipped, median {'n/a' if m is None else f'{m:g}'} "
            f"units{ratio}."
        )
    for u in unlearns:
        retrain = (
            f" (retraining from scratch: {_pct(u.retrain.flagged_accuracy)})" if u.retrain else ""
        )
        lines.append(
            f"Unlearning with {u.method} ({u.seconds:.0f} s) took flagged accuracy from "
            f"{_pct(u.before.flagged_accuracy)} to {_pct(u.after.flagged_accuracy)}{retrain}; "
            f"retained {_pct(u.before.retained_accuracy)} → {_pct(u.after.retained_accuracy)}, "
            f"test {_pct(u.before.test_accuracy)} → {_pct(u.after.test_accuracy)}, "
            f"MIA AUC {_num(u.before.mia_auc)} → {_num(u.after.mia_auc)}."
        )
    if unlearn_skipped:
        lines.append("Unlearning was not run (--no-unlearn).")
    if rescan is not None and found.n_correct_after is not None:
        lines.append(
            f"After unlearning, the model predicts the given label for {found.n_correct_after} of "
            f"{n} flagged examples; {found.n_localized_after} still flip with ≤ {cap} units."
        )
    return lines + [f"Caution: {w}." for w in found.warnings]


def unlearn_sentences(unlearns: Sequence[UnlearnReport]) -> list[str]:
    """Plain-words lines for unlearning runs without a scan."""
    lines = [
        f"Unlearning with {u.method} ({u.seconds:.0f} s) took flagged accuracy from "
        f"{u.before.flagged_accuracy:.0%} to {u.after.flagged_accuracy:.0%}"
        + (f" (retraining: {u.retrain.flagged_accuracy:.0%})" if u.retrain else "")
        + "."
        for u in unlearns
    ]
    warnings = dict.fromkeys(w for u in unlearns if u.preflight for w in u.preflight.warnings)
    return lines + [f"Caution: {w}." for w in warnings]
