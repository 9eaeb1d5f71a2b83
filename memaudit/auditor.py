"""``Auditor``: the one object a pipeline needs — a model, its training data, and the audits."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from torch import nn

from memaudit.data import ImageDataset, check_compatible
from memaudit.engine import accuracy, pick_device
from memaudit.errors import MemauditError
from memaudit.localize import (
    edited_accuracy,
    reference_gradient,
    scan_settings,
    search_chunk,
    to_result,
)
from memaudit.masks import UnitMasks
from memaudit.models import Classifier, load_model
from memaudit.preflight import preflight
from memaudit.schema._inputs import Preflight
from memaudit.schema._scan import (
    DataSummary,
    ExampleResult,
    LayerCount,
    ModelSummary,
    ScanReport,
    ScanSettings,
    Status,
    Timing,
    summarize,
)
from memaudit.unlearn import UnlearnResult, unlearn

if TYPE_CHECKING:
    from memaudit.audit import AuditResult

Progress = Callable[[int, int], None]
_JOURNAL = "memaudit-scan-journal/1"


class Auditor:
    """Audit ``model`` for memorization of examples of its training data ``train``.

    Every scan and unlearning first runs the :func:`~memaudit.preflight.preflight` check (once
    per set of flagged ids): a model near chance on its own training rows is refused, below
    ``min_train_accuracy`` (default: a quarter of the way from chance to 100%; 0 never refuses).

    Example:
        >>> auditor = Auditor(model, train, test)                       # doctest: +SKIP
        >>> report = auditor.scan([12, 40, 77], max_units=32)           # doctest: +SKIP
        >>> report.summary.flip_rate, report.examples[0].units          # doctest: +SKIP
    """

    def __init__(
        self,
        model: Classifier | nn.Module,
        train: ImageDataset,
        test: ImageDataset | None = None,
        *,
        device: str | torch.device = "auto",
        min_train_accuracy: float | None = None,
    ) -> None:
        self.model = load_model(model)
        self.train = train
        self.test = test
        self.device = pick_device(device)
        self.min_train_accuracy = min_train_accuracy
        self._preflights: dict[frozenset[int], Preflight] = {}
        check_compatible(self.model, train)
        if test is not None:
            check_compatible(self.model, test)

    def preflight(self, ids: Sequence[int]) -> Preflight:
        """The preflight check of the model on this data, ``ids`` left out (run once per set)."""
        key = frozenset(ids)
        if key not in self._preflights:
            self._preflights[key] = preflight(
                self.model,
                self.train,
                self.train.rows(ids),
                test=self.test,
                min_train_accuracy=self.min_train_accuracy,
                device=self.device,
            )
        return self._preflights[key]

    def scan(
        self,
        ids: Sequence[int],
        *,
        settings: ScanSettings | None = None,
        journal: str | os.PathLike[str] | None = None,
        resume: bool = False,
        on_progress: Progress | None = None,
        **overrides: Any,
    ) -> ScanReport:
        """Find, for each flagged id, a minimal set of units whose zeroing flips its prediction.

        ``overrides`` are :class:`ScanSettings` fields (``max_units=32``, ``scorer="random"``).
        With ``journal``, results are appended there as JSON lines as chunks finish, and
        ``resume=True`` skips the ids a journal already holds (same settings required).
        """
        cfg = scan_settings(settings, **overrides)
        if not ids:
            raise MemauditError("no flagged ids to scan; give at least one")
        start = time.perf_counter()
        rows = self.train.rows(ids)
        checked = self.preflight(ids)
        space = self.model.units()
        model = self.model.to(self.device).eval()
        gen = torch.Generator().manual_seed(cfg.seed)
        ref_rows = _sample(_complement(len(self.train), rows), cfg.reference_size, gen)
        test_rows = _sample(torch.arange(len(self.test)), cfg.eval_size, gen) if self.test else None
        key = self._journal_key(cfg)
        done = _open_journal(journal, key, resume=resume)
        results: dict[int, ExampleResult] = {r.id: r for r in done}
        todo = [(i, int(r)) for i, r in zip(ids, rows.tolist(), strict=True) if i not in results]
        if on_progress:
            on_progress(len(results), len(ids))
        with UnitMasks(model.net, space) as masks:
            ref_grad = reference_gradient(model, masks, self.train, ref_rows, device=self.device)
            ref_batch = None
            if cfg.reference_mode != "shared":
                ref_batch = (
                    self.train.batch(ref_rows, self.device),
                    self.train.labels[ref_rows].to(self.device),
                )
            for chunk in _chunks(todo, cfg.batch_size):
                chunk_rows = torch.tensor([r for _, r in chunk])
                found = search_chunk(
                    model,
                    masks,
                    self.train,
                    chunk_rows,
                    settings=cfg,
                    reference_grad=ref_grad,
                    reference_batch=ref_batch,
                    generator=gen,
                    device=self.device,
                )
                sets = [f.minimal for f in found if f.status is Status.FLIPPED]
                ref_acc = edited_accuracy(
                    model, masks, sets, self.train, ref_rows, device=self.device
                )
                test_acc = (
                    edited_accuracy(model, masks, sets, self.test, test_rows, device=self.device)
                    if self.test is not None and test_rows is not None
                    else None
                )
                k = 0
                new: list[ExampleResult] = []
                for (id_, _), f in zip(chunk, found, strict=True):
                    accs: tuple[float | None, float | None] = (None, None)
                    if f.status is Status.FLIPPED:
                        accs = (
                            float(ref_acc[k]),
                            float(test_acc[k]) if test_acc is not None else None,
                        )
                        k += 1
                    new.append(to_result(f, space, *accs, id_=id_))
                _append_journal(journal, new)
                results.update((r.id, r) for r in new)
                if on_progress:
                    on_progress(len(results), len(ids))
        examples = [results[i] for i in ids]
        seconds = time.perf_counter() - start
        ref_before = (
            accuracy(model, self.train, ref_rows, device=self.device) if len(ref_rows) else None
        )
        test_before = (
            accuracy(model, self.test, test_rows, device=self.device)
            if self.test is not None and test_rows is not None
            else None
        )
        return ScanReport(
            model=self._model_summary(),
            data=self._data_summary(),
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
                examples_per_second=len(todo) / seconds if seconds > 0 else 0.0,
                device=str(self.device),
            ),
            preflight=checked,
        )

    def unlearn(
        self, ids: Sequence[int], *, method: str = "example-tied-dropout", **options: Any
    ) -> UnlearnResult:
        """Remove what the model memorized about ``ids``; see :func:`memaudit.unlearn.unlearn`.

        Returns the unlearned model (``.model``) and the before/after report (``.report``).
        """
        return unlearn(
            self.model,
            self.train,
            self.train.rows(ids),
            test=self.test,
            method=method,
            device=self.device,
            preflight=self.preflight(ids),
            **options,
        )

    def audit(self, ids: Sequence[int], **options: Any) -> AuditResult:
        """Scan ``ids``, unlearn them, re-scan: one :class:`AuditReport` (``.report``).

        ``options`` are those of :func:`memaudit.audit.audit` (method, gates, ...).
        """
        from memaudit.audit import audit  # the audit builds on the Auditor

        return audit(self, ids, **options)

    def _model_summary(self) -> ModelSummary:
        space = self.model.units()
        info = self.model.info
        return ModelSummary(
            source=info.source,
            arch=info.arch,
            n_parameters=sum(p.numel() for p in self.model.parameters()),
            n_units=space.total,
            units_per_layer=[LayerCount(layer=k, count=v) for k, v in space.counts().items()],
            class_names=info.class_names,
        )

    def _data_summary(self) -> DataSummary:
        return DataSummary(
            source=self.train.ref.source,
            split=self.train.ref.split,
            n_examples=len(self.train),
            n_classes=self.train.num_classes,
            test_split=self.test.ref.split if self.test is not None else None,
            n_test=len(self.test) if self.test is not None else None,
        )

    def _journal_key(self, cfg: ScanSettings) -> dict[str, Any]:
        return {
            "settings": cfg.model_dump(mode="json"),
            "model": self.model.info.source,
            "data": self.train.ref.model_dump(mode="json"),
        }


def _complement(n: int, rows: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[rows] = False
    return keep.nonzero().flatten()


def _sample(rows: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    if size >= len(rows):
        return rows
    return rows[torch.randperm(len(rows), generator=gen)[:size]].sort().values


def _chunks(items: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _open_journal(
    journal: str | os.PathLike[str] | None, key: dict[str, Any], *, resume: bool
) -> list[ExampleResult]:
    """Results an earlier run wrote to ``journal`` (when resuming); starts a fresh one otherwise."""
    if journal is None:
        return []
    path = Path(journal)
    if path.exists() and resume:
        lines = path.read_text().splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("format") != _JOURNAL or header.get("key") != key:
            raise MemauditError(
                f"{path} was written by a scan with other settings, model or data; delete it to "
                "start over or rerun with the same options"
            )
        results = []
        for line in lines[1:]:
            try:
                results.append(ExampleResult.model_validate_json(line))
            except ValidationError:
                break  # a line cut short by a crash: redo from there
        # Rewrite without any cut-short tail so later appends stay readable.
        path.write_text("".join([lines[0] + "\n", *(r.model_dump_json() + "\n" for r in results)]))
        return results
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": _JOURNAL, "key": key}) + "\n")
    return []


def _append_journal(journal: str | os.PathLike[str] | None, results: list[ExampleResult]) -> None:
    if journal is None:
        return
    with open(journal, "a") as f:
        f.writelines(r.model_dump_json() + "\n" for r in results)
        f.flush()
        os.fsync(f.fileno())
