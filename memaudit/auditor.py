"""``Auditor``: the one object a pipeline needs - a model bound to its data, and the checks.

A thin binder: every call runs the :func:`~memaudit.preflight.preflight` check once per set of
flagged ids, then the function that does the work (:func:`memaudit.localize.scan`,
:func:`memaudit.unlearn.unlearn`, :func:`memaudit.audit.audit`). Nothing inside memaudit
imports it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from memaudit.audit import AuditResult, audit, audit_plan
from memaudit.data import ImageDataset, check_compatible
from memaudit.engine import pick_device
from memaudit.errors import MemauditError
from memaudit.localize import scan, scan_settings
from memaudit.localize._scan import Progress
from memaudit.models import Classifier, load_model
from memaudit.preflight import preflight
from memaudit.schema import Preflight, ScanReport, ScanSettings, UnlearnSettings
from memaudit.unlearn import UnlearnResult, unlearn


class Auditor:
    """Audit ``model`` for memorization of examples of its training data ``train``.

    Every scan, unlearning and audit first runs the :func:`~memaudit.preflight.preflight` check
    (once per set of flagged ids): a model near chance on its own training rows is refused,
    below ``min_train_accuracy`` (default: a quarter of the way from chance to 100%; 0 never
    refuses).

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

        ``overrides`` are :class:`ScanSettings` fields (``max_units=32``, ``scorer="random"``);
        see :func:`memaudit.localize.scan` for ``journal`` and ``resume``.
        """
        cfg = scan_settings(settings, **overrides)
        if not ids:
            raise MemauditError("no flagged ids to scan; give at least one")
        return scan(
            self.model,
            self.train,
            ids,
            test=self.test,
            settings=cfg,
            device=self.device,
            journal=journal,
            resume=resume,
            on_progress=on_progress,
            preflight=self.preflight(ids),
        )

    def unlearn(
        self, ids: Sequence[int], settings: UnlearnSettings | None = None, **options: Any
    ) -> UnlearnResult:
        """Remove what the model memorized about ``ids``; see :func:`memaudit.unlearn.unlearn`
        (``options``: the fields of :class:`~memaudit.schema.UnlearnSettings`, ``retrained``,
        ``references``, ``on_progress``).

        Returns the unlearned model (``.model``) and the before/after report (``.report``).
        """
        return unlearn(
            self.model,
            self.train,
            ids,
            test=self.test,
            settings=settings,
            device=self.device,
            preflight=self.preflight(ids),
            **options,
        )

    def audit(self, ids: Sequence[int], **options: Any) -> AuditResult:
        """Scan ``ids``, unlearn them, re-scan: one :class:`AuditReport` (``.report``).

        ``options`` are the fields of :class:`~memaudit.schema.AuditPlan` (``unlearn``,
        gates, ...) and the other keywords of :func:`memaudit.audit.audit`.
        """
        plan, rest = audit_plan(**options)
        if not ids:
            raise MemauditError("no flagged ids to audit; give at least one")
        return audit(
            self.model,
            self.train,
            ids,
            test=self.test,
            plan=plan,
            device=self.device,
            preflight=self.preflight(ids),
            **rest,
        )
