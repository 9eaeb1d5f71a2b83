"""One audit, one report: scan the flagged ids, unlearn them, re-scan the unlearned model.

:func:`audit` is the call an MLOps pipeline makes (``memaudit audit`` on the command line,
``Auditor.audit`` in Python): a model, its data, the flagged ids and an
:class:`~memaudit.schema.AuditPlan`. It returns an :class:`AuditResult`: the typed
:class:`~memaudit.schema.AuditReport` (scan, unlearning before/after, re-scan, gates,
provenance) and the unlearned model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from memaudit.data import ImageDataset, complement, sample
from memaudit.engine import pick_device
from memaudit.errors import MemauditError, validated
from memaudit.localize import scan
from memaudit.models import Classifier, save_model
from memaudit.preflight import preflight as check_model
from memaudit.provenance import digest, versions
from memaudit.schema import (
    AuditPlan,
    AuditReport,
    Preflight,
    Provenance,
    StageTime,
    UnlearnReport,
    gates,
    verdict,
)
from memaudit.unlearn import UnlearnStep, unlearn

OnStage = Callable[[str], None]
OnProgress = Callable[[str, int, int], None]  # stage, done, total


@dataclass(frozen=True)
class AuditResult:
    """What :func:`audit` returns: the report and the unlearned model (None with no_unlearn)."""

    report: AuditReport
    model: Classifier | None


@dataclass(frozen=True)
class AuditSources:
    """Where the audit's inputs came from, for its provenance: the command line, the weights
    and flagged-ids files (hashed), and stages the caller timed before (e.g. loading)."""

    command: str | None = None
    weights_file: str | os.PathLike[str] | None = None
    flagged_file: str | os.PathLike[str] | None = None
    stages: Sequence[StageTime] = ()


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


def audit_plan(**options: Any) -> tuple[AuditPlan, dict[str, Any]]:
    """Split keyword options into an :class:`AuditPlan` (validated) and :func:`audit`'s own.

    ``plan`` is a base the other options override; ``scan_settings`` is the plan's ``scan``;
    ``command``, ``weights_file``, ``flagged_file``
    and ``stages`` become the ``sources``.
    """
    fields = set(AuditPlan.model_fields)
    base: AuditPlan | None = options.pop("plan", None)
    values = {
        **(base.model_dump() if base is not None else {}),
        **{k: options.pop(k) for k in list(options) if k in fields},
    }
    if "scan_settings" in options and options["scan_settings"] is not None:
        values["scan"] = options.pop("scan_settings")
    options.pop("scan_settings", None)
    source_keys = ("command", "weights_file", "flagged_file", "stages")
    found = {k: options.pop(k) for k in source_keys if k in options}
    if found:
        options["sources"] = AuditSources(**found)
    return validated(AuditPlan, values, "audit setting"), options


def audit(
    model: Classifier,
    train: ImageDataset,
    ids: Sequence[int],
    *,
    test: ImageDataset | None = None,
    plan: AuditPlan | None = None,
    device: str | torch.device = "auto",
    preflight: Preflight | None = None,
    out_model: str | os.PathLike[str] | None = None,
    sources: AuditSources | None = None,
    on_stage: OnStage | None = None,
    on_progress: OnProgress | None = None,
) -> AuditResult:
    """Scan ``ids``, unlearn them as ``plan`` says, re-scan the unlearned model.

    ``preflight``: the check of ``model`` (the :class:`~memaudit.Auditor` and the CLI run it
    first), recorded with the scan and the unlearning; the unlearned model's own is measured
    for the re-scan, never refused (its damage is the audit's finding). The unlearned model is
    saved to ``out_model`` when given, with the data and preprocessing it was measured with.

    Example:
        >>> plan = AuditPlan(max_flagged_accuracy=0.1)                          # doctest: +SKIP
        >>> result = audit(model, train, [3, 17, 40], test=test, plan=plan)    # doctest: +SKIP
        >>> result.report.verdict.localized_fraction, result.report.passed     # doctest: +SKIP
    """
    plan = plan or AuditPlan()
    if not ids:
        raise MemauditError("no flagged ids to audit; give at least one")
    check_plan(plan)
    dev = pick_device(device)
    src = sources or AuditSources()
    clock = _Clock(on_stage, src.stages)
    settings = plan.scan

    def progress(stage: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: on_progress(stage, done, total)) if on_progress else None

    common: dict[str, Any] = {"test": test, "settings": settings, "device": dev}
    with clock.stage("scan"):
        found = scan(model, train, ids, **common, on_progress=progress("scan"), preflight=preflight)
    comparison = None
    if plan.compare:
        with clock.stage("comparison"):
            others = _comparison_ids(train, ids, plan.compare, seed=settings.seed)
            comparison = scan(model, train, others, **common, on_progress=progress("comparison"))
    unlearned, report, rescan = None, None, None
    if not plan.no_unlearn:
        with clock.stage("unlearn"):
            unlearned, report = _unlearn(model, train, ids, test, plan, dev, preflight, progress)
        if out_model is not None:
            with clock.stage("save"):
                saved = save_model(
                    unlearned, out_model, train_data=train.ref, preprocess=train.preprocess
                )
                report = report.model_copy(update={"out_model": str(saved)})
        with clock.stage("rescan"):
            rows = train.rows(ids)
            again = check_model(unlearned, train, rows, test=test, min_train_accuracy=0, device=dev)
            rescan = scan(
                unlearned, train, ids, **common, on_progress=progress("rescan"), preflight=again
            )
    headline = verdict(found, localized_units=plan.localized_units, unlearn=report, rescan=rescan)
    seeds = {"scan": settings.seed, **({"unlearn": _seed(report)} if report else {})}
    audit_report = AuditReport(
        verdict=headline,
        scan=found,
        unlearn=report,
        rescan=rescan,
        comparison=comparison,
        gates=gates(
            headline,
            max_flagged_accuracy=plan.max_flagged_accuracy,
            max_localized_fraction=plan.max_localized_fraction,
            max_gap_to_retrain=plan.max_gap_to_retrain,
            max_membership_tpr=plan.max_membership_tpr,
        ),
        provenance=_provenance(
            model,
            dev,
            src,
            out_model=out_model if unlearned is not None else None,
            seeds=seeds,
            stages=clock.stages,
        ),
    )
    return AuditResult(report=audit_report, model=unlearned)


def check_plan(plan: AuditPlan) -> None:
    """One-line errors for a plan that cannot run (a gate outside [0, 1], ...)."""
    if plan.localized_units < 1:
        raise MemauditError(f"localized units must be at least 1, got {plan.localized_units}")
    if plan.compare < 0:
        raise MemauditError(f"the comparison group size must be >= 0, got {plan.compare}")
    after = (
        ("--max-flagged-accuracy", plan.max_flagged_accuracy),
        ("--max-gap-to-retrain", plan.max_gap_to_retrain),
        ("--max-membership-tpr", plan.max_membership_tpr),
    )
    for name, value in (*after, ("--max-localized-fraction", plan.max_localized_fraction)):
        if value is not None and not 0 <= value <= 1:
            raise MemauditError(f"{name} is a fraction in [0, 1], got {value}")
    for name, value in after:
        if plan.no_unlearn and value is not None:
            raise MemauditError(
                f"{name} gates the model after unlearning; drop --no-unlearn or the gate"
            )
    if plan.max_gap_to_retrain is not None and not plan.unlearn.compare_retrain:
        raise MemauditError("--max-gap-to-retrain needs a reference: add --compare-retrain")
    if plan.max_membership_tpr is not None and plan.unlearn.membership_references < 2:
        raise MemauditError(
            "--max-membership-tpr needs the membership test: add --membership-references 2"
        )


def _comparison_ids(train: ImageDataset, ids: Sequence[int], n: int, *, seed: int) -> list[int]:
    """``n`` random ids of the training split that are not flagged (seeded)."""
    free = complement(len(train), train.rows(ids))
    if not len(free):
        raise MemauditError("no non-flagged examples left for a comparison group; drop --compare")
    return train.ids_of(sample(free, n, torch.Generator().manual_seed(seed + 1)))


def _unlearn(
    model: Classifier,
    train: ImageDataset,
    ids: Sequence[int],
    test: ImageDataset | None,
    plan: AuditPlan,
    device: torch.device,
    preflight: Preflight | None,
    progress: Callable[[str], Callable[[int, int], None] | None],
) -> tuple[Classifier, UnlearnReport]:
    report_to = progress("unlearn")

    def on_progress(step: UnlearnStep) -> None:
        if report_to is not None:
            report_to(step.step, step.total)

    result = unlearn(
        model,
        train,
        ids,
        test=test,
        settings=plan.unlearn,
        device=device,
        on_progress=on_progress,
        preflight=preflight,
    )
    return result.model, result.report


def _seed(report: UnlearnReport | None) -> int:
    value = report.settings.get("seed", 0) if report else 0
    return int(value) if isinstance(value, int | float) else 0


def _provenance(
    model: Classifier,
    device: torch.device,
    sources: AuditSources,
    *,
    out_model: str | os.PathLike[str] | None,
    seeds: dict[str, int],
    stages: list[StageTime],
) -> Provenance:
    weights_file = sources.weights_file
    source = model.info.source
    if weights_file is None and source and Path(source).exists():
        weights_file = source
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return Provenance(
        command=sources.command,
        weights=digest(weights_file),
        flagged_ids=digest(sources.flagged_file),
        unlearned_model=digest(out_model),
        seeds=seeds,
        versions=versions(),
        device=str(device),
        device_name=name,
        stages=stages,
    )
