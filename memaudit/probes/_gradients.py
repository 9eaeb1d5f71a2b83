"""Gradient accounting: per layer, the summed gradients of flagged and of other examples."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from memaudit.data import ImageDataset, validate_rows
from memaudit.engine import EpochEnd, pick_device
from memaudit.errors import MemauditError
from memaudit.models import Classifier
from memaudit.probes._layers import (
    Checkpoint,
    LayerGroup,
    ProbeStep,
    ProgressHook,
    _checkpoint_list,
    _data_name,
    _net,
    _num,
    _source,
    layer_groups,
    read_state,
    swapped,
)
from memaudit.schema import GradientsReport, Grouping, LayerGradients

GradientMode = Literal["training", "checkpoint"]
NormStats = Literal["batch", "running"]

# --- gradient accounting ---------------------------------------------------------------------


@dataclass(frozen=True)
class GradientStats:
    """Gradient accounting of one epoch or checkpoint; tensors have one value per group."""

    epoch: int | None
    groups: tuple[LayerGroup, ...]
    flagged_norm: torch.Tensor
    clean_norm: torch.Tensor
    cosine: torch.Tensor
    n_flagged: int
    n_clean: int


class GradientTracker:
    """Sums the gradients of the flagged and of the other examples per layer group.

    One backward pass per group of examples per batch. A hook for any training loop: compute
    per-example losses (``reduction="none"``), call :meth:`observe` before your backward,
    and :meth:`end_epoch` after each epoch. With memaudit's trainer::

        tracker = GradientTracker(model, flagged_rows)
        train(model, data, epochs=30, on_loss=tracker.observe, on_epoch=tracker.on_epoch)
        report = tracker.report(data="mnist")

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> tracker = GradientTracker(net, torch.tensor([0]))
        >>> losses = F.cross_entropy(net(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1]),
        ...                          reduction="none")
        >>> tracker.observe(torch.arange(4), losses)
        >>> stats = tracker.end_epoch(1)
        >>> stats.n_flagged, stats.n_clean, stats.cosine.shape
        (1, 3, torch.Size([1]))
    """

    def __init__(
        self,
        model: nn.Module,
        flagged_rows: torch.Tensor | Sequence[int],
        *,
        grouping: Grouping | str = Grouping.MODULE,
        layers: Sequence[str] | None = None,
        mode: GradientMode = "training",
        norm_stats: NormStats = "batch",
    ) -> None:
        self.model = model
        self.norm_stats = norm_stats
        self.grouping = Grouping(grouping)
        self.mode = mode
        self.groups = tuple(layer_groups(model, grouping=self.grouping, names=layers))
        self.flagged = torch.as_tensor(flagged_rows, dtype=torch.long).reshape(-1)
        named = dict(_net(model).named_parameters())
        self._params = [named[p] for g in self.groups for p in g.params]
        self.history: list[GradientStats] = []
        self._reset()

    def _reset(self) -> None:
        # Sums start empty and take the device of the first gradient (models move to devices).
        self._sums: dict[bool, list[torch.Tensor | None]] = {
            flag: [None] * len(self._params) for flag in (True, False)
        }
        self._counts = {True: 0, False: 0}

    def observe(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Add the gradients of ``losses`` (per example, on the graph) of rows ``ids``."""
        is_flagged = torch.isin(ids.to(losses.device), self.flagged.to(losses.device))
        trainable = [i for i, p in enumerate(self._params) if p.requires_grad]
        for flag in (True, False):
            picked = is_flagged if flag else ~is_flagged
            count = int(picked.sum())
            if count == 0 or not trainable:
                continue
            grads = torch.autograd.grad(
                losses[picked].sum(),
                [self._params[i] for i in trainable],
                retain_graph=True,
                allow_unused=True,
            )
            sums = self._sums[flag]
            for i, grad in zip(trainable, grads, strict=True):
                if grad is not None:
                    total = sums[i]
                    sums[i] = grad.detach().clone() if total is None else total.add_(grad)
            self._counts[flag] += count

    def end_epoch(self, epoch: int | None) -> GradientStats:
        """Close the epoch: its per-group numbers (also kept in :attr:`history`)."""
        stats = self._stats(epoch)
        self.history.append(stats)
        self._reset()
        return stats

    def _flat(self, flag: bool, start: int, end: int) -> torch.Tensor:
        parts = [
            torch.zeros(p.numel()) if g is None else g.detach().flatten().cpu()
            for p, g in zip(self._params[start:end], self._sums[flag][start:end], strict=True)
        ]
        return torch.cat(parts).double()

    def on_epoch(self, event: EpochEnd) -> None:
        """``on_epoch`` callback for :func:`memaudit.testbed.train`."""
        self.end_epoch(event.epoch)

    def _stats(self, epoch: int | None) -> GradientStats:
        flagged, clean, cosine = [], [], []
        start = 0
        for group in self.groups:
            end = start + len(group.params)
            f, c = (self._flat(flag, start, end) for flag in (True, False))
            scale = math.sqrt(group.size)
            fn, cn = f.norm(), c.norm()
            flagged.append(float(fn) / scale)
            clean.append(float(cn) / scale)
            cosine.append(float(f @ c / (fn * cn)) if fn > 0 and cn > 0 else math.nan)
            start = end
        return GradientStats(
            epoch=epoch,
            groups=self.groups,
            flagged_norm=torch.tensor(flagged),
            clean_norm=torch.tensor(clean),
            cosine=torch.tensor(cosine),
            n_flagged=self._counts[True],
            n_clean=self._counts[False],
        )

    def report(self, *, data: str = "", model: str | None = None) -> GradientsReport:
        """The :class:`GradientsReport` of every closed epoch."""
        return gradients_report(
            self.history,
            model=model or _source(self.model),
            data=data,
            grouping=self.grouping,
            mode=self.mode,
            norm_stats=self.norm_stats,
        )


def gradients_report(
    history: Sequence[GradientStats],
    *,
    model: str,
    data: str,
    grouping: Grouping | str,
    mode: GradientMode,
    norm_stats: NormStats = "batch",
) -> GradientsReport:
    """Layer x epoch rows of a sequence of :class:`GradientStats`."""
    if not history:
        raise MemauditError("no gradient statistics to report: observe at least one epoch")
    rows = [
        LayerGradients(
            name=group.name,
            params=group.size,
            flagged_norm=[_num(s.flagged_norm[i]) for s in history],
            clean_norm=[_num(s.clean_norm[i]) for s in history],
            cosine=[_num(s.cosine[i]) for s in history],
        )
        for i, group in enumerate(history[0].groups)
    ]
    return GradientsReport(
        model=model,
        data=data,
        grouping=Grouping(grouping),
        mode=mode,
        norm_stats=norm_stats,
        n_flagged=history[-1].n_flagged,
        n_clean=history[-1].n_clean,
        epochs=[s.epoch for s in history],
        layers=rows,
    )


def _accumulate(
    model: nn.Module,
    tracker: GradientTracker,
    data: ImageDataset,
    rows: torch.Tensor,
    *,
    batch_size: int,
    norm_stats: NormStats,
    device: torch.device,
) -> None:
    """Observe every row once, in seeded random batches (as in training), on ``model``."""
    model.to(device).eval()
    labels = data.labels.to(device)
    order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    with _batch_stats(model, on=norm_stats == "batch"):
        for batch in order.split(batch_size):
            logits = model(data.batch(batch, device))
            losses = F.cross_entropy(logits, labels[batch.to(device)], reduction="none")
            tracker.observe(batch, losses)


@contextmanager
def _batch_stats(model: nn.Module, *, on: bool) -> Iterator[None]:
    """Batch-norm layers normalize with batch statistics, as in training; their running
    statistics are put back after. Everything else (dropout) stays in eval mode."""
    net = _net(model)
    norms = {
        name: m
        for name, m in net.named_modules()
        if on and isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    live = net.state_dict()
    keys = [k for k in live if k.rpartition(".")[0] in norms]
    with swapped(model, {k: live[k].clone() for k in keys}, keys):
        for module in norms.values():
            module.train()
        try:
            yield
        finally:
            for module in norms.values():
                module.eval()


def gradient_accounting(
    model: Classifier,
    data: ImageDataset,
    ids: Sequence[int],
    *,
    grouping: Grouping | str = Grouping.MODULE,
    layers: Sequence[str] | None = None,
    epoch: int | None = None,
    batch_size: int = 128,
    norm_stats: NormStats = "batch",
    device: str | torch.device = "auto",
) -> GradientsReport:
    """Gradient accounting of one model, post hoc: the flagged example ``ids`` vs the other
    examples of ``data``.

    Every example contributes once, in seeded random batches. With
    ``norm_stats="batch"`` (default) batch-norm layers use batch statistics as in training (their
    running statistics are restored after); ``"running"`` evaluates the model in eval mode,
    which mid-training checkpoints answer with inflated losses. ``epoch`` labels the column.
    """
    flagged = validate_rows(data, data.rows(ids))
    tracker = GradientTracker(
        model, flagged, grouping=grouping, layers=layers, mode="checkpoint", norm_stats=norm_stats
    )
    _accumulate(
        model,
        tracker,
        data,
        torch.arange(len(data)),
        batch_size=batch_size,
        norm_stats=norm_stats,
        device=pick_device(device),
    )
    tracker.end_epoch(epoch)
    return tracker.report(data=_data_name(data))


def gradient_history(
    model: Classifier,
    data: ImageDataset,
    ids: Sequence[int],
    checkpoints: str | Path | Sequence[Checkpoint],
    *,
    grouping: Grouping | str = Grouping.MODULE,
    layers: Sequence[str] | None = None,
    batch_size: int = 128,
    norm_stats: NormStats = "batch",
    device: str | torch.device = "auto",
    on_progress: ProgressHook | None = None,
) -> GradientsReport:
    """Gradient accounting on each per-epoch checkpoint: a layer x epoch table.

    Each checkpoint's weights are loaded into ``model`` in turn; its own weights come back after.
    ``norm_stats`` as in :func:`gradient_accounting`.
    """
    flagged = validate_rows(data, data.rows(ids))
    points = _checkpoint_list(checkpoints)
    net = _net(model)
    dev = pick_device(device)
    tracker = GradientTracker(
        model, flagged, grouping=grouping, layers=layers, mode="checkpoint", norm_stats=norm_stats
    )
    everything = list(net.state_dict())
    for i, point in enumerate(points):
        with swapped(model, read_state(point.path, net), everything):
            _accumulate(
                model,
                tracker,
                data,
                torch.arange(len(data)),
                batch_size=batch_size,
                norm_stats=norm_stats,
                device=dev,
            )
        tracker.end_epoch(point.epoch)
        if on_progress is not None:
            on_progress(ProbeStep(i + 1, len(points), f"epoch {point.epoch}"))
    return tracker.report(data=_data_name(data))
