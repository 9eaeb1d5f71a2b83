"""The scan: for each flagged id, the units whose zeroing flips it, and what each edit costs."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from memaudit import journal as journals
from memaudit.data import ImageDataset, complement, sample
from memaudit.engine import accuracy, channels_last, pick_device
from memaudit.errors import MemauditError, validated
from memaudit.localize._scorers import SCORERS
from memaudit.localize._search import (
    Found,
    Reference,
    Stages,
    edited_accuracy,
    reference_gradient,
    resolved,
    search_chunk,
)
from memaudit.localize._shard import World, expected_cost, gather, shard
from memaudit.masks import UnitMasks
from memaudit.models import Classifier
from memaudit.schema import (
    DataSummary,
    ExampleResult,
    LayerCount,
    ModelSummary,
    Preflight,
    ScanReport,
    ScanSettings,
    Status,
    Timing,
    summarize,
)
from memaudit.units import UnitSpace

Progress = Callable[[int, int], None]  # (done, total)


def scan_settings(base: ScanSettings | None = None, **overrides: Any) -> ScanSettings:
    """``base`` (or the defaults) with ``overrides``, validated; one-line errors."""
    values = {**(base or ScanSettings()).model_dump(), **overrides}
    settings = validated(ScanSettings, values, "scan setting")
    if settings.scorer not in SCORERS:
        raise MemauditError(f"unknown scorer {settings.scorer!r}; choose from {', '.join(SCORERS)}")
    return settings


def scan(
    model: Classifier,
    train: ImageDataset,
    ids: Sequence[int],
    *,
    test: ImageDataset | None = None,
    settings: ScanSettings | None = None,
    device: str | torch.device = "auto",
    journal: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_progress: Progress | None = None,
    preflight: Preflight | None = None,
) -> ScanReport:
    """Find, for each flagged id of ``train``, a minimal set of units whose zeroing flips it.

    Reference rows (non-flagged training rows) and test rows are drawn with ``settings.seed``;
    flagged ids are searched ``settings.batch_size`` at a time, and after each chunk the edits'
    accuracy on the reference and test rows is measured. With ``journal``, results are appended
    there as chunks finish, and ``resume=True`` skips the ids it already holds (same settings,
    model and data required). ``preflight`` (the check :class:`~memaudit.Auditor` and the CLI
    run first) is recorded in the report.

    Under an initialized process group (``torchrun``), each rank searches its share of the ids
    (:func:`~memaudit.localize.shard`, balanced by expected cost), appends to its own journal
    file, and every rank returns the merged report: the single-process report of the same
    inputs. A rank that fails leaves its journal; the others stop with an error naming the ids
    missing, and ``resume=True`` (with any world size) searches only those.
    """
    if not ids:
        raise MemauditError("no flagged ids to scan; give at least one")
    start = time.perf_counter()
    dev = pick_device(device)
    cfg = resolved(settings or ScanSettings(), dev)
    rows = train.rows(ids)
    space = model.units()
    model = model.to(dev).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    ref_rows = sample(complement(len(train), rows), cfg.reference_size, gen)
    test_rows = sample(torch.arange(len(test)), cfg.eval_size, gen) if test else None
    key = {
        "settings": cfg.model_dump(mode="json"),
        "model": model.info.source,
        "data": train.ref.model_dump(mode="json"),
    }
    world = World.current()
    held = journals.read(journal, key) if journal is not None and resume else []
    wanted = set(ids)
    results: dict[int, ExampleResult] = {r.id: r for r in held if r.id in wanted}
    if world.size > 1:
        dist.barrier()  # every rank has read the journals before any rewrites its own
    own = journals.start(journal, key, resume=resume, rank=world.rank, world=world.size)
    todo = [(i, int(r)) for i, r in zip(ids, rows.tolist(), strict=True) if i not in results]
    n_searched = len(todo)  # by all ranks together
    if world.size > 1:
        costs = expected_cost(model, train, torch.tensor([r for _, r in todo]), device=dev)
        todo = [todo[k] for k in shard(costs, world.size)[world.rank].tolist()]
    if on_progress:
        on_progress(len(results), len(ids))
    mine: list[ExampleResult] = []  # what this process found (the others' come at the end)

    def found(new: list[ExampleResult]) -> None:
        journals.append(own, new)
        mine.extend(new)
        results.update((r.id, r) for r in new)
        if on_progress:
            on_progress(len(results), len(ids))

    timed = Stages(dev)
    failure: Exception | None = None
    try:
        _search(model, train, test, todo, cfg, space, ref_rows, test_rows, dev, found, timed)
    except Exception as raised:  # with peers, tell them before stopping (Ctrl-C stops all)
        if world.size == 1:
            raise
        failure = raised
    if world.size > 1:
        gathered, unfinished = _gathered(mine, world, journal, key, failed=failure is not None)
        results.update((r.id, r) for r in gathered if r.id in wanted)
        if unfinished is not None and failure is None:
            raise _unfinished(ids, results, journal, unfinished)
    if failure is not None:
        raise failure
    examples = [results[i] for i in ids]
    seconds = time.perf_counter() - start
    with channels_last(model), precision(cfg, dev):  # the accuracies before, as after edits
        ref_before = accuracy(model, train, ref_rows, device=dev) if len(ref_rows) else None
        test_before = (
            accuracy(model, test, test_rows, device=dev)
            if test is not None and test_rows is not None
            else None
        )
    return ScanReport(
        model=_model_summary(model, space),
        data=_data_summary(train, test),
        settings=cfg,
        examples=examples,
        summary=summarize(
            examples,
            [layer.name for layer in space.layers],
            reference_accuracy_before=ref_before,
            test_accuracy_before=test_before,
        ),
        timing=Timing(
            seconds=seconds,
            examples_per_second=n_searched / seconds if seconds > 0 else 0.0,
            device=str(dev),
            stages={k: round(v, 4) for k, v in timed.seconds.items()},
        ),
        preflight=preflight,
    )


def precision(cfg: ScanSettings, device: torch.device) -> torch.autocast:
    """The autocast of the scan's forwards on ``device``: on only for ``bf16``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def flip_units(
    model: Classifier,
    train: ImageDataset,
    rows: torch.Tensor,
    *,
    settings: ScanSettings | None = None,
    device: str | torch.device = "auto",
) -> list[list[int]]:
    """Minimal unit sets (flat indices of ``model.units()``) that flip each row; ``[]`` if none.

    A convenience over :func:`scan` for methods that edit by units.
    """
    report = scan(
        model,
        train,
        train.ids_of(rows),
        settings=scan_settings(settings, eval_size=0),
        device=device,
    )
    space = model.units()
    return [[space.flat(u) for u in e.units] if e.flipped else [] for e in report.examples]


def _search(
    model: Classifier,
    train: ImageDataset,
    test: ImageDataset | None,
    todo: list[tuple[int, int]],
    cfg: ScanSettings,
    space: UnitSpace,
    ref_rows: torch.Tensor,
    test_rows: torch.Tensor | None,
    dev: torch.device,
    found: Callable[[list[ExampleResult]], None],
    timed: Stages,
) -> None:
    """Search ``todo`` (id, row) chunk by chunk; ``found`` gets each chunk's results."""
    evaluate = functools.partial(
        edited_accuracy, model, device=dev, checked_bf16=cfg.precision == "mixed"
    )
    with UnitMasks(model.net, space) as masks, channels_last(model), precision(cfg, dev):
        with timed("reference"):
            ref_grad = reference_gradient(model, masks, train, ref_rows, device=dev)
            reference = None
            if cfg.reference_mode != "shared":
                reference = Reference(train.batch(ref_rows, dev), train.labels[ref_rows].to(dev))
        for chunk in [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]:
            searched = search_chunk(
                model,
                masks,
                train,
                torch.tensor([r for _, r in chunk]),
                settings=cfg,
                reference_grad=ref_grad,
                reference=reference,
                device=dev,
                stages=timed,
            )
            sets = [f.minimal for f in searched if f.status is Status.FLIPPED]
            with timed("evaluation"):
                ref_acc = evaluate(masks, sets, train, ref_rows)
                test_acc = (
                    evaluate(masks, sets, test, test_rows)
                    if test is not None and test_rows is not None
                    else None
                )
            found(_results(chunk, searched, space, ref_acc, test_acc))


def _gathered(
    mine: list[ExampleResult],
    world: World,
    journal: str | os.PathLike[str] | None,
    key: dict[str, Any],
    *,
    failed: bool,
) -> tuple[list[ExampleResult], str | None]:
    """Every rank's results, and why the scan did not finish (None: every rank did)."""
    try:
        results, failed_ranks = gather(mine, world, failed=failed)
    except (RuntimeError, dist.DistError) as lost:  # a peer vanished mid-collective
        held = journals.read(journal, key) if journal is not None else mine
        return held, type(lost).__name__
    if failed_ranks:
        return results, "rank " + ", ".join(map(str, failed_ranks)) + " failed"
    return results, None


def _unfinished(
    ids: Sequence[int], results: dict[int, ExampleResult], journal: object, reason: str
) -> MemauditError:
    missing = [i for i in ids if i not in results]
    shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
    return MemauditError(
        f"the scan did not finish ({reason}): {len(ids) - len(missing)} of {len(ids)} ids are "
        f"in the journals ({journal or 'none kept'}); missing {len(missing)}: {shown}. Rerun "
        "with --resume, with any number of processes, to scan only those"
    )


def to_result(
    found: Found, space: UnitSpace, ref_acc: float | None, test_acc: float | None, id_: int
) -> ExampleResult:
    """The report entry of one searched (or skipped) example."""
    return ExampleResult(
        id=id_,
        label=found.label,
        predicted_before=found.predicted_before,
        status=found.status,
        flipped=found.status is Status.FLIPPED,
        n_units=len(found.greedy),
        n_units_minimal=len(found.minimal),
        units=space.units(found.minimal),
        predicted_after=found.predicted_after,
        steps=found.steps,
        reference_accuracy=ref_acc,
        test_accuracy=test_acc,
    )


def _results(
    chunk: list[tuple[int, int]],
    found: list[Found],
    space: UnitSpace,
    ref_acc: torch.Tensor,
    test_acc: torch.Tensor | None,
) -> list[ExampleResult]:
    """Report entries of one chunk; the k-th flipped example owns the k-th edit's accuracies."""
    out, k = [], 0
    for (id_, _), f in zip(chunk, found, strict=True):
        accs: tuple[float | None, float | None] = (None, None)
        if f.status is Status.FLIPPED:
            accs = (float(ref_acc[k]), float(test_acc[k]) if test_acc is not None else None)
            k += 1
        out.append(to_result(f, space, *accs, id_=id_))
    return out


def _model_summary(model: Classifier, space: UnitSpace) -> ModelSummary:
    info = model.info
    return ModelSummary(
        source=info.source,
        arch=info.arch,
        n_parameters=sum(p.numel() for p in model.parameters()),
        n_units=space.total,
        units_per_layer=[LayerCount(layer=k, count=v) for k, v in space.counts().items()],
        class_names=info.class_names,
    )


def _data_summary(train: ImageDataset, test: ImageDataset | None) -> DataSummary:
    return DataSummary(
        source=train.ref.source,
        split=train.ref.split,
        n_examples=len(train),
        n_classes=train.num_classes,
        test_split=test.ref.split if test is not None else None,
        n_test=len(test) if test is not None else None,
    )
