"""One audit, one report: scan the flagged ids, unlearn them, re-scan the unlearned model.

:func:`audit` is the call an MLOps pipeline makes (``memaudit audit`` on the command line,
``Auditor.audit`` in Python). It returns an :class:`AuditResult`: the typed
:class:`~memaudit.report.AuditReport` (scan, unlearning before/after, re-scan, gates,
provenance) and the unlearned model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memaudit.data import complement, sample
from memaudit.errors import MemauditError
from memaudit.models import Classifier, save_model
from memaudit.provenance import digest, versions
from memaudit.schema._audit import AuditReport, Provenance, StageTime, gates, verdict
from memaudit.schema._scan import ScanReport, ScanSettings
from memaudit.schema._unlearn import UnlearnReport

if TYPE_CHECKING:
    from memaudit.auditor import Auditor

OnStage = Callable[[str], None]
OnProgress = Callable[[str, int, int], None]  # stage, done, total


@dataclass(frozen=True)
class AuditResult:
    """What :func:`audit` returns: the report and the unlearned model (None with no_unlearn)."""

    report: AuditReport
    model: Classifier | None


class _Clock:
    """Times the stages of an audit (wall clock and start time)."""

    def __init__(self, on_stage: OnStage | None, prior: Sequence[StageTime]) -> None:
        self.stages = list(prior)
        self.on_stage = on_stage

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.on_stage is not None:
            self.on_stage(name)
        started = datetime.now(timezone.utc)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.stages.append(StageTime(stage=name, started=started, seconds=seconds))


def audit(
    auditor: Auditor,
    ids: Sequence[int],
    *,
    unlearn_method: str = "example-tied-dropout",
    no_unlearn: bool = False,
    localized_units: int = 5,
    compare: int = 0,
    scan_settings: ScanSettings | None = None,
    unlearn_options: Mapping[str, Any] | None = None,
    max_flagged_accuracy: float | None = None,
    max_localized_fraction: float | None = None,
    out_model: str | os.PathLike[str] | None = None,
    command: str | None = None,
    weights_file: str | os.PathLike[str] | None = None,
    flagged_file: str | os.PathLike[str] | None = None,
    stages: Sequence[StageTime] = (),
    on_stage: OnStage | None = None,
    on_progress: OnProgress | None = None,
) -> AuditResult:
    """Scan ``ids``, unlearn them with ``unlearn_method``, re-scan the unlearned model.

    ``localized_units`` (N): an example "rests on a handful of units" when it flips with at most
    N units. ``compare``: also scan that many random non-flagged ids as a comparison group.
    ``unlearn_options`` go to :func:`memaudit.unlearn.unlearn` (``epochs``, ``lr``, ``seed``,
    ``options``, ``compare_retrain``). Gates (``max_*``) are recorded in the report; a failed gate
    is a result, not an error. ``command``, ``weights_file`` (default: the model's source when it
    is a file), ``flagged_file`` and ``stages`` (e.g. loading, timed by the caller) go to the
    report's provenance. The unlearned model is saved to ``out_model`` when given.

    Example:
        >>> auditor = Auditor(model, train, test)                          # doctest: +SKIP
        >>> result = audit(auditor, [3, 17, 40], max_flagged_accuracy=0.1)  # doctest: +SKIP
        >>> result.report.verdict.localized_fraction, result.report.passed  # doctest: +SKIP
    """
    _check(ids, no_unlearn, localized_units, compare, max_flagged_accuracy, max_localized_fraction)
    clock = _Clock(on_stage, stages)
    settings = scan_settings or ScanSettings()

    def progress(stage: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: on_progress(stage, done, total)) if on_progress else None

    with clock.stage("scan"):
        scan = auditor.scan(ids, settings=settings, on_progress=progress("scan"))
    comparison = None
    if compare:
        with clock.stage("comparison"):
            others = _comparison_ids(auditor, ids, compare, seed=settings.seed)
            comparison = auditor.scan(others, settings=settings, on_progress=progress("comparison"))
    unlearned, report, rescan = None, None, None
    if not no_unlearn:
        with clock.stage("unlearn"):
            unlearned, report = _unlearn(auditor, ids, unlearn_method, unlearn_options, progress)
        if out_model is not None:
            with clock.stage("save"):
                saved = save_model(
                    unlearned,
                    out_model,
                    train_data=auditor.train.ref,
                    preprocess=auditor.train.preprocess,
                )
                report = report.model_copy(update={"out_model": str(saved)})
        with clock.stage("rescan"):
            rescan = _rescan(auditor, unlearned, ids, scan.settings, progress("rescan"))
    found = verdict(scan, localized_units=localized_units, unlearn=report, rescan=rescan)
    provenance = _provenance(
        auditor,
        command=command,
        weights_file=weights_file,
        flagged_file=flagged_file,
        out_model=out_model if unlearned is not None else None,
        seeds={"scan": settings.seed, **({"unlearn": _seed(report)} if report else {})},
        stages=clock.stages,
    )
    audit_report = AuditReport(
        verdict=found,
        scan=scan,
        unlearn=report,
        rescan=rescan,
        comparison=comparison,
        gates=gates(
            found,
            max_flagged_accuracy=max_flagged_accuracy,
            max_localized_fraction=max_localized_fraction,
        ),
        provenance=provenance,
    )
    return AuditResult(report=audit_report, model=unlearned)


def _check(
    ids: Sequence[int],
    no_unlearn: bool,
    localized_units: int,
    compare: int,
    max_flagged_accuracy: float | None,
    max_localized_fraction: float | None,
) -> None:
    if not ids:
        raise MemauditError("no flagged ids to audit; give at least one")
    if localized_units < 1:
        raise MemauditError(f"localized units must be at least 1, got {localized_units}")
    if compare < 0:
        raise MemauditError(f"the comparison group size must be >= 0, got {compare}")
    for name, value in (
        ("--max-flagged-accuracy", max_flagged_accuracy),
        ("--max-localized-fraction", max_localized_fraction),
    ):
        if value is not None and not 0 <= value <= 1:
            raise MemauditError(f"{name} is a fraction in [0, 1], got {value}")
    if no_unlearn and max_flagged_accuracy is not None:
        raise MemauditError(
            "--max-flagged-accuracy gates the accuracy after unlearning; drop --no-unlearn or "
            "the gate"
        )


def _comparison_ids(auditor: Auditor, ids: Sequence[int], n: int, *, seed: int) -> list[int]:
    """``n`` random ids of the training split that are not flagged (seeded)."""
    free = complement(len(auditor.train), auditor.train.rows(ids))
    if not len(free):
        raise MemauditError("no non-flagged examples left for a comparison group; drop --compare")
    picked = sample(free, n, torch.Generator().manual_seed(seed + 1))
    if auditor.train.ids is not None:
        return [int(v) for v in auditor.train.ids[picked].tolist()]
    return [int(v) for v in picked.tolist()]


def _unlearn(
    auditor: Auditor,
    ids: Sequence[int],
    method: str,
    options: Mapping[str, Any] | None,
    progress: Callable[[str], Callable[[int, int], None] | None],
) -> tuple[Classifier, UnlearnReport]:
    from memaudit.unlearn import UnlearnStep, unlearn

    report_to = progress("unlearn")

    def on_progress(step: UnlearnStep) -> None:
        if report_to is not None:
            report_to(step.step, step.total)

    result = unlearn(
        auditor.model,
        auditor.train,
        auditor.train.rows(ids),
        test=auditor.test,
        method=method,
        device=auditor.device,
        on_progress=on_progress,
        preflight=auditor.preflight(ids),
        **dict(options or {}),
    )
    return result.model, result.report


def _rescan(
    auditor: Auditor,
    model: Classifier,
    ids: Sequence[int],
    settings: ScanSettings,
    on_progress: Callable[[int, int], None] | None,
) -> ScanReport:
    from memaudit.auditor import Auditor

    # The unlearned model is measured, never refused: its damage is the audit's finding.
    again = Auditor(model, auditor.train, auditor.test, device=auditor.device, min_train_accuracy=0)
    return again.scan(ids, settings=settings, on_progress=on_progress)


def _seed(report: UnlearnReport | None) -> int:
    value = report.settings.get("seed", 0) if report else 0
    return int(value) if isinstance(value, int | float) else 0


def _provenance(
    auditor: Auditor,
    *,
    command: str | None,
    weights_file: str | os.PathLike[str] | None,
    flagged_file: str | os.PathLike[str] | None,
    out_model: str | os.PathLike[str] | None,
    seeds: dict[str, int],
    stages: list[StageTime],
) -> Provenance:
    source = auditor.model.info.source
    if weights_file is None and source and Path(source).exists():
        weights_file = source
    device = torch.device(auditor.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return Provenance(
        command=command,
        weights=digest(weights_file),
        flagged_ids=digest(flagged_file),
        unlearned_model=digest(out_model),
        seeds=seeds,
        versions=versions(),
        device=str(device),
        device_name=name,
        stages=stages,
    )
