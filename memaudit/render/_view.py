"""The reports of one HTML page, sorted by role (:class:`View`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from memaudit.schema._audit import AuditReport, Verdict, verdict
from memaudit.schema._base import Report, ReportError
from memaudit.schema._probes import GradientsReport, RetrainReport, RewindReport
from memaudit.schema._scan import ScanReport
from memaudit.schema._unlearn import UnlearnReport

LOCALIZED_UNITS = 5  # the paper: about 5 units flip a memorized example


@dataclass
class View:
    """The reports of one page, sorted by role."""

    scan: ScanReport | None = None
    comparisons: list[ScanReport] = field(default_factory=list)
    rescan: ScanReport | None = None
    unlearns: list[UnlearnReport] = field(default_factory=list)
    probes: list[Report] = field(default_factory=list)
    audit: AuditReport | None = None
    verdict: Verdict | None = None
    command: str | None = None


def make_view(reports: Sequence[Report], comparison: ScanReport | None, localized: int) -> View:
    view = View()
    for report in reports:
        if isinstance(report, AuditReport):
            if view.audit is not None or view.scan is not None:
                raise ReportError("one audit per page: render other reports on their own pages")
            view.audit, view.scan, view.rescan = report, report.scan, report.rescan
            view.unlearns += [report.unlearn] if report.unlearn else []
            view.comparisons += [report.comparison] if report.comparison else []
        elif isinstance(report, ScanReport):
            if view.scan is None:
                view.scan = report
            else:  # later scans are comparison groups (e.g. clean examples)
                view.comparisons.append(report)
        elif isinstance(report, UnlearnReport):
            view.unlearns.append(report)
        elif isinstance(report, GradientsReport | RewindReport | RetrainReport):
            view.probes.append(report)
        else:
            raise ReportError(f"no HTML view for a {report.kind!r} report")
    if comparison is not None:
        view.comparisons.append(comparison)
    if view.audit is not None:
        view.verdict = view.audit.verdict
    elif view.scan is not None:
        first = view.unlearns[0] if view.unlearns else None
        view.verdict = verdict(view.scan, localized_units=localized, unlearn=first)
    return view
