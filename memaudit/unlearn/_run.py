"""The entry point :func:`unlearn`: run a method on a copy of the model and measure the model
before and after (and the yardsticks: a retrained model, the membership test) on the same data."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memaudit.data import ImageDataset, complement, validate_rows
from memaudit.engine import accuracy, evaluate, pick_device, predict, recipe_for
from memaudit.errors import MemauditError, validated
from memaudit.membership import attack, summarize
from memaudit.models import Classifier
from memaudit.schema import (
    Membership,
    Recipe,
    ReferenceCheck,
    UnlearnReport,
    UnlearnScores,
    UnlearnSettings,
)
from memaudit.schema._inputs import Preflight
from memaudit.unlearn._methods import METHODS, Option, UnlearnJob, UnlearnMethod


@dataclass(frozen=True)
class UnlearnStep:
    """Given to ``on_progress``: ``stage`` (measure, unlearn, retrain), ``step`` of ``total``."""

    stage: str
    step: int
    total: int
    loss: float | None = None


@dataclass(frozen=True)
class UnlearnResult:
    """The unlearned model (a plain :class:`Classifier`) and the report of the run."""

    model: Classifier
    report: UnlearnReport
    retrained: Classifier | None = None
    references: tuple[Classifier, ...] = ()


def mia_auc(member_loss: torch.Tensor, nonmember_loss: torch.Tensor) -> float:
    """AUC of a loss-threshold membership attack: P(a member's loss < a non-member's), ties 1/2.

    Example:
        >>> mia_auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 2.0]))
        1.0
    """
    n_m, n_n = member_loss.numel(), nonmember_loss.numel()
    if not n_m or not n_n:
        return float("nan")
    scores = torch.cat([-member_loss, -nonmember_loss]).double()
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # average 1-based ranks of ties
    return float((ranks[:n_m].sum() - n_m * (n_m + 1) / 2) / (n_m * n_n))


def measure(
    model: Classifier,
    train_set: ImageDataset,
    flagged: torch.Tensor,
    retained: torch.Tensor,
    *,
    test: ImageDataset | None = None,
    device: torch.device,
) -> UnlearnScores:
    """Flagged / retained / test accuracy and the membership AUC of flagged vs test."""
    flag = evaluate(model, train_set, flagged, device=device)
    kept = evaluate(model, train_set, retained, device=device)
    test_acc, auc = None, None
    if test is not None and len(test):
        held = evaluate(model, test, torch.arange(len(test)), device=device)
        test_acc = float(held.correct.float().mean())
        auc = mia_auc(flag.loss, held.loss)
    return UnlearnScores(
        flagged_accuracy=float(flag.correct.float().mean()),
        retained_accuracy=float(kept.correct.float().mean()) if kept.loss.numel() else 0.0,
        test_accuracy=test_acc,
        mia_auc=auc,
    )


def _rows(train_set: ImageDataset, flagged_rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
    rows = validate_rows(train_set, flagged_rows)
    if rows.numel() == len(train_set):
        raise MemauditError("every training example is flagged; nothing would be retained")
    return rows


def _check_reference(model: Classifier, reference: Classifier) -> None:
    """A given reference must be a model of the same architecture and classes."""
    ours, theirs = model.info, reference.info
    if theirs.num_classes != ours.num_classes or theirs.arch != ours.arch:
        raise MemauditError(
            f"the retrained reference {theirs.source} is a {theirs.arch} with "
            f"{theirs.num_classes} classes, but the model is a {ours.arch} with "
            f"{ours.num_classes}: pass a model of the same architecture retrained without the "
            "flagged ids"
        )


def _method(name: str) -> UnlearnMethod:
    if name not in METHODS:
        raise MemauditError(f"unknown unlearning method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def _options(
    method: UnlearnMethod, options: Mapping[str, Option], family: str
) -> dict[str, Option]:
    given = dict(options)
    defaults = method.defaults(family)[1]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise MemauditError(
            f"unknown option(s) {unknown} for this method; it takes {sorted(defaults)}"
        )
    return {**defaults, **given}


def budget_epochs(method: UnlearnMethod, settings: UnlearnSettings, recipe: Recipe) -> int:
    """The epochs ``method`` trains for under ``settings`` and the training ``recipe``:
    ``epochs`` when given; with ``budget``, ``max(1, round(budget * E))`` for a method that
    trains (0 stays 0), ``E`` being the retraining yardstick's epochs (``retrain_epochs``, else
    the recipe's: those the model was trained with when its checkpoint records them); else the
    method's own for the recipe's family (``E`` for training from scratch). Rounded
    half up.

    Example:
        >>> budget_epochs(METHODS["finetune"], UnlearnSettings(budget=0.25), Recipe(family="x"))
        8
    """
    if settings.epochs is not None:
        return settings.epochs
    yardstick = settings.retrain_epochs or recipe.epochs
    own = yardstick if method.from_scratch else method.defaults(recipe.family)[0]
    if settings.budget is None or own == 0:
        return own
    return max(1, math.floor(settings.budget * yardstick + 0.5))


def unlearn_settings(base: UnlearnSettings | None = None, **overrides: Any) -> UnlearnSettings:
    """``base`` (or the defaults) with ``overrides``, validated; one-line errors."""
    values = {**(base or UnlearnSettings()).model_dump(), **overrides}
    return validated(UnlearnSettings, values, "unlearning setting")


def unlearn(
    model: Classifier,
    train_set: ImageDataset,
    ids: Sequence[int],
    *,
    test: ImageDataset | None = None,
    settings: UnlearnSettings | None = None,
    retrained: Classifier | None = None,
    references: Sequence[Classifier] = (),
    device: str | torch.device = "auto",
    on_progress: Callable[[UnlearnStep], None] | None = None,
    preflight: Preflight | None = None,
    **overrides: Any,
) -> UnlearnResult:
    """Remove what ``model`` memorized about example ``ids`` of ``train_set``; measure it.

    ``model`` is left unchanged; the result holds a new plain model. ``settings`` (an
    :class:`~memaudit.schema.UnlearnSettings`, whose fields may also be given as keywords:
    ``method``, ``epochs``, ``lr``, ``options``, ``seed``, ...) say how: ``epochs`` / ``lr``
    default to the method's own (see :data:`METHODS`); ``budget`` gives every training method
    that share of retraining's epochs instead (:func:`budget_epochs`). With
    ``compare_retrain`` a model is also retrained from scratch without the flagged rows and
    measured (the report's ``retrain`` block). ``preflight``: the check of ``model`` on this data
    (:func:`memaudit.preflight.preflight`, which ``Auditor.unlearn`` and the CLI run first),
    recorded in the report. With ``membership_references`` (K >= 2), K models are trained from
    scratch without the flagged rows (the retraining recipe, other seeds) and the membership
    test of :mod:`memaudit.membership` runs on the model before and after (and retrained): the
    report's ``membership`` block. ``retrained``: a reference the user already has (trained
    without the flagged ids), used instead of retraining here; its architecture and class
    count must be the model's. ``references``: membership reference models the caller already
    has (e.g. ``UnlearnResult.references`` of an earlier run on the same ids), used instead of
    training ``membership_references`` new ones.

    Example:
        >>> result = unlearn(model, train, [3, 17], test=test, method="finetune", epochs=1)
        >>> result.report.after.flagged_accuracy  # doctest: +SKIP
    """
    cfg = unlearn_settings(settings, **overrides)
    method, seed, batch_size, lr = cfg.method, cfg.seed, cfg.batch_size, cfg.lr
    chosen = _method(method)
    given = retrained
    for reference in (given, *references):
        if reference is not None:
            _check_reference(model, reference)
    if references and cfg.membership_references:
        raise MemauditError(
            "pass either membership_references (models to train) or references (models you "
            "have), not both"
        )
    if len(references) == 1:  # (one to train is refused by UnlearnSettings)
        raise MemauditError(
            "the membership test needs at least two reference models: pass two or more "
            "references, or none"
        )
    membership_references = cfg.membership_references or len(references)
    rows = _rows(train_set, train_set.rows(ids))
    retained = complement(len(train_set), rows)
    dev = pick_device(device)
    recipe = recipe_for(
        model, optimizer=cfg.optimizer, warmup=cfg.warmup, weight_decay=cfg.weight_decay
    )
    opts = _options(chosen, cfg.options, recipe.family)

    def step(stage: str, k: int, total: int, loss: float | None = None) -> None:
        if on_progress is not None:
            on_progress(UnlearnStep(stage, k, total, loss))

    def run(
        how: UnlearnMethod, n_epochs: int, stage: str, job_seed: int = seed
    ) -> tuple[Classifier, float]:
        job = UnlearnJob(
            model=copy.deepcopy(model),
            train=train_set,
            flagged=rows,
            retained=retained,
            epochs=n_epochs,
            lr=lr if lr is not None and how is chosen else how.lr(recipe),
            batch_size=batch_size,
            seed=job_seed,
            device=dev,
            recipe=recipe,
            options=opts if how is chosen else how.defaults(recipe.family)[1],
            on_epoch=lambda e: step(stage, e.epoch, e.epochs, e.loss),
        )
        start = time.perf_counter()
        step(stage, 0, n_epochs)
        out = how.run(job).eval()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out, time.perf_counter() - start

    n_epochs = budget_epochs(chosen, cfg, recipe)
    if chosen.check is not None:
        chosen.check(opts, n_epochs)
    step("measure", 0, 2)
    before = measure(model, train_set, rows, retained, test=test, device=dev)
    unlearned, seconds = run(chosen, n_epochs, "unlearn")
    step("measure", 1, 2)
    after = measure(unlearned, train_set, rows, retained, test=test, device=dev)
    step("measure", 2, 2)
    retrain_scores, retrain_seconds, agreement = None, None, None
    if cfg.compare_retrain and retrained is None:
        gold = METHODS["retrain"]
        retrained, retrain_seconds = run(gold, cfg.retrain_epochs or recipe.epochs, "retrain")
    if retrained is not None:
        retrain_scores = measure(retrained, train_set, rows, retained, test=test, device=dev)
        agreement = float(
            (
                predict(unlearned, train_set, rows, device=dev)
                == predict(retrained, train_set, rows, device=dev)
            )
            .float()
            .mean()
        )
    membership: Membership | None = None
    refs: list[Classifier] = []
    if membership_references:
        gold = METHODS["retrain"]
        refs = list(references)
        for k in range(len(refs), membership_references):
            stage = f"reference {k + 1}/{membership_references}"  # each its own seed
            refs.append(run(gold, cfg.retrain_epochs or recipe.epochs, stage, seed + 1000 + k)[0])
        scored = {"before": model, "after": unlearned}
        if retrained is not None:
            scored["retrain"] = retrained
        found = attack(scored, refs, train_set, rows, device=dev, seed=seed)
        membership = summarize(found, train_set.ids_of(rows), len(refs))
    check = None
    if test is not None and len(test) and before.test_accuracy is not None:
        check = ReferenceCheck(
            margin=cfg.reference_margin,
            original_test_accuracy=before.test_accuracy,
            retrain_test_accuracy=retrain_scores.test_accuracy if retrain_scores else None,
            references_test_accuracy=[accuracy(m, test, device=dev) for m in refs],
        )
    report = UnlearnReport(
        method=method,
        settings={
            "epochs": n_epochs,
            "lr": chosen.lr(recipe) if lr is None else lr,
            "recipe": recipe.family,
            "optimizer": recipe.optimizer,
            "batch_size": batch_size,
            "seed": seed,
            **({"budget": cfg.budget} if cfg.budget is not None else {}),
            **opts,
        },
        before=before,
        after=after,
        retrain=retrain_scores,
        seconds=seconds,
        retrain_seconds=retrain_seconds,
        retrain_source=given.info.source if given is not None else None,
        agreement_with_retrain=agreement,
        model=f"{model.info.source} ({model.info.arch})",
        data=f"{train_set.ref.source} [{train_set.ref.split}]",
        test_data=f"{test.ref.source} [{test.ref.split}]" if test is not None else None,
        n_flagged=int(rows.numel()),
        n_retained=int(retained.numel()),
        n_test=len(test) if test is not None else 0,
        preflight=preflight,
        membership=membership,
        reference_check=check,
        recipe=recipe,
    )
    return UnlearnResult(
        model=unlearned.cpu(),
        report=report,
        retrained=retrained,
        references=tuple(refs),
    )
