"""Remove what a trained model memorized about flagged examples: :func:`unlearn`.

Every method takes the same :class:`UnlearnJob` (a copy of the model it may change, the data,
flagged and retained rows, a training budget) and returns the unlearned model; :func:`unlearn`
measures the model before and after on the same data and returns an :class:`UnlearnResult`.
Methods live in a registry (:data:`METHODS`, :func:`register_method`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from memaudit.data import ImageDataset, complement, validate_rows
from memaudit.engine import EpochEnd, evaluate, fit, pick_device, predict
from memaudit.errors import MemauditError, validated
from memaudit.localize import flip_units
from memaudit.membership import attack, summarize
from memaudit.models import FAMILIES, Classifier, build_model
from memaudit.schema import Membership, UnlearnReport, UnlearnScores, UnlearnSettings
from memaudit.schema._inputs import Preflight
from memaudit.units import zero_unit_weights

Option = float | int | str | bool


@dataclass(frozen=True)
class UnlearnStep:
    """Given to ``on_progress``: ``stage`` (measure, unlearn, retrain), ``step`` of ``total``."""

    stage: str
    step: int
    total: int
    loss: float | None = None


@dataclass(frozen=True)
class UnlearnJob:
    """What an unlearning method receives. ``model`` is a copy that the method may change."""

    model: Classifier
    train: ImageDataset
    flagged: torch.Tensor
    retained: torch.Tensor
    epochs: int
    lr: float
    batch_size: int
    seed: int
    device: torch.device
    options: Mapping[str, Option] = field(default_factory=dict)
    on_epoch: Callable[[EpochEnd], None] | None = None


@dataclass(frozen=True)
class UnlearnMethod:
    """An unlearning method: ``run(job) -> unlearned model`` and its default budget."""

    run: Callable[[UnlearnJob], Classifier]
    epochs: int
    lr: float
    description: str
    options: Mapping[str, Option] = field(default_factory=dict)


@dataclass(frozen=True)
class UnlearnResult:
    """The unlearned model (a plain :class:`Classifier`) and the report of the run."""

    model: Classifier
    report: UnlearnReport
    retrained: Classifier | None = None
    references: tuple[Classifier, ...] = ()


METHODS: dict[str, UnlearnMethod] = {}


def register_method(name: str, method: UnlearnMethod) -> None:
    """Register an unlearning method; refuses to silently replace an existing one."""
    if name in METHODS:
        raise ValueError(f"unlearning method {name!r} is already registered")
    METHODS[name] = method


# --- measurement -----------------------------------------------------------------------------


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


# --- methods ---------------------------------------------------------------------------------


def _fit(job: UnlearnJob, model: Classifier, rows: torch.Tensor, **kw: Any) -> Classifier:
    fit(
        model,
        job.train,
        rows,
        epochs=job.epochs,
        batch_size=job.batch_size,
        lr=job.lr,
        seed=job.seed,
        device=job.device,
        on_epoch=job.on_epoch,
        **kw,
    )
    return model.eval()


def _example_tied_dropout(job: UnlearnJob) -> Classifier:
    """Fine-tune with example-tied dropout on all rows, then drop the memorization units.

    Design (measured on the label-noise testbed, 400 flagged of 4,000; see
    ``benchmarks/bench_unlearn.py``): with ``tie="flagged"`` only the flagged rows get
    example-tied masks, so what they need beyond the shared features goes to their own
    memorization units, while the retained rows train the drop-mode network (generalization units
    only) directly - the network that is exported. Tying every row (the paper's training-time
    recipe, ``tie="all"``) left the 5-epoch drop-mode model at about 50% retained accuracy with
    ``p_gen=0.2`` and 88% with ``p_gen=0.5``: a few epochs do not move a trained model's function
    into its generalization units. ``p_gen=0.5`` keeps half of each layer in the exported model
    (``p_gen=0.2`` with ``tie="flagged"``: 0.8% flagged, 99.7% retained accuracy). Three epochs
    (0.25% flagged, 99.7% retained, 97.7% test) cost about a sixth of retraining; five gave 0%
    / 99.97% / 97.7%. The fine-tuning uses the one-cycle SGD of :func:`memaudit.testbed.train`.
    The layers go after every conv / linear layer (:func:`~memaudit.dropout.conv_layers`, the
    setting measured here), where the drop-mode scaling folds into any architecture.
    """
    from memaudit.dropout import TiedDropout, conv_layers

    model = job.model
    tie = job.options.get("tie", "all")
    if tie not in ("all", "flagged"):
        raise MemauditError(f"option tie must be 'all' or 'flagged', got {tie!r}")
    etd = TiedDropout(
        model,
        after=conv_layers(model),
        p_gen=float(job.options["p_gen"]),
        p_mem=float(job.options["p_mem"]),
        seed=job.seed,
    )
    flagged = torch.zeros(len(job.train), dtype=torch.bool)
    flagged[job.flagged] = True
    with etd.attached() as masks:

        def tied(ids: torch.Tensor) -> AbstractContextManager[torch.Tensor]:
            return masks.applied(etd.masks(ids, tied=flagged[ids] if tie == "flagged" else None))

        _fit(job, model, torch.arange(len(job.train)), around_batch=tied)
    etd.fold("drop")
    return model.eval()


def _finetune(job: UnlearnJob) -> Classifier:
    """Fine-tune on the retained rows only."""
    return _fit(job, job.model, job.retained)


def _gradient_ascent(job: UnlearnJob) -> Classifier:
    """Raise the loss on the flagged rows by plain SGD (batch-norm statistics frozen).

    Ascent diverges within a few steps once the flagged rows are no longer fit (measured: the
    testbed model collapses to chance between 8 and 12 steps at lr 0.01), so it stops as soon as
    a batch's loss passes ``stop_loss`` (default: ln K, the loss of a uniform guess).
    """
    stop = float(job.options.get("stop_loss", 0) or math.log(max(2, job.model.info.num_classes)))
    return _fit(
        job,
        job.model,
        job.flagged,
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        mode="eval",  # BN statistics stay those of all the data
        ascend=True,
        stop_loss=stop,
    )


def _zero_units(job: UnlearnJob) -> Classifier:
    """Zero the units whose removal flips each flagged example (``memaudit.localize``)."""
    per_row = flip_units(job.model, job.train, job.flagged, device=job.device)
    flat = sorted({int(u) for units in per_row for u in units})
    if flat:
        zero_unit_weights(job.model.net, job.model.units(), flat)
    return job.model.eval()


def fresh_copy(model: Classifier) -> Classifier:
    """The same architecture and info with newly initialized weights."""
    family = model.info.arch.partition(":")[0]
    if family in FAMILIES and family != "hf":
        fresh = build_model(
            model.info.arch,
            num_classes=model.info.num_classes,
            in_chans=model.info.in_chans or 3,
            config=model.info.arch_config,
        )
        fresh.info = model.info.model_copy()
        return fresh
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


def _retrain(job: UnlearnJob) -> Classifier:
    """Train the architecture from scratch on the retained rows (the gold standard; slow). The
    initialization is drawn with the job's seed; the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        fresh = fresh_copy(job.model)
    return _fit(job, fresh, job.retained)


register_method(
    "example-tied-dropout",
    UnlearnMethod(
        _example_tied_dropout,
        epochs=3,
        lr=0.05,
        description="fine-tune with example-tied dropout (flagged rows tied), drop memorization",
        options={"p_gen": 0.5, "p_mem": 0.1, "tie": "flagged"},
    ),
)
register_method(
    "finetune", UnlearnMethod(_finetune, epochs=5, lr=0.05, description="fine-tune on retained")
)
register_method(
    "gradient-ascent",
    UnlearnMethod(
        _gradient_ascent,
        epochs=5,
        lr=0.01,
        description="ascend the flagged loss until it passes stop_loss (0: ln K)",
        options={"stop_loss": 0.0},
    ),
)
register_method(
    "zero-units",
    UnlearnMethod(_zero_units, epochs=0, lr=0.0, description="zero the units scan localizes"),
)
register_method(
    "retrain",
    UnlearnMethod(_retrain, epochs=30, lr=0.05, description="retrain from scratch on retained"),
)


# --- entry point -----------------------------------------------------------------------------


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


def _options(method: UnlearnMethod, options: Mapping[str, Option]) -> dict[str, Option]:
    given = dict(options)
    unknown = sorted(set(given) - set(method.options))
    if unknown:
        raise MemauditError(
            f"unknown option(s) {unknown} for this method; it takes {sorted(method.options)}"
        )
    return {**method.options, **given}


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
    default to the method's own (see :data:`METHODS`). With ``compare_retrain`` a model is also
    retrained from scratch without the flagged rows and measured (the report's ``retrain``
    block). ``preflight``: the check of ``model`` on this data
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
    opts = _options(chosen, cfg.options)
    given = retrained
    for reference in (given, *references):
        if reference is not None:
            _check_reference(model, reference)
    if references and cfg.membership_references:
        raise MemauditError(
            "pass either membership_references (models to train) or references (models you "
            "have), not both"
        )
    membership_references = cfg.membership_references or len(references)
    if membership_references == 1:
        raise MemauditError(
            "the membership test needs at least two reference models: pass "
            "--membership-references 2 or more (0: no membership test)"
        )
    rows = _rows(train_set, train_set.rows(ids))
    retained = complement(len(train_set), rows)
    dev = pick_device(device)

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
            lr=lr if lr is not None and how is chosen else how.lr,
            batch_size=batch_size,
            seed=job_seed,
            device=dev,
            options=opts if how is chosen else how.options,
            on_epoch=lambda e: step(stage, e.epoch, e.epochs, e.loss),
        )
        start = time.perf_counter()
        step(stage, 0, n_epochs)
        out = how.run(job).eval()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out, time.perf_counter() - start

    step("measure", 0, 2)
    before = measure(model, train_set, rows, retained, test=test, device=dev)
    n_epochs = chosen.epochs if cfg.epochs is None else cfg.epochs
    unlearned, seconds = run(chosen, n_epochs, "unlearn")
    step("measure", 1, 2)
    after = measure(unlearned, train_set, rows, retained, test=test, device=dev)
    step("measure", 2, 2)
    retrain_scores, retrain_seconds, agreement = None, None, None
    if cfg.compare_retrain and retrained is None:
        gold = METHODS["retrain"]
        retrained, retrain_seconds = run(gold, cfg.retrain_epochs or gold.epochs, "retrain")
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
            refs.append(run(gold, cfg.retrain_epochs or gold.epochs, stage, seed + 1000 + k)[0])
        scored = {"before": model, "after": unlearned}
        if retrained is not None:
            scored["retrain"] = retrained
        found = attack(scored, refs, train_set, rows, device=dev, seed=seed)
        membership = summarize(found, train_set.ids_of(rows), len(refs))
    report = UnlearnReport(
        method=method,
        settings={
            "epochs": n_epochs,
            "lr": chosen.lr if lr is None else lr,
            "batch_size": batch_size,
            "seed": seed,
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
    )
    return UnlearnResult(
        model=unlearned.cpu(),
        report=report,
        retrained=retrained,
        references=tuple(refs),
    )
