"""Layer probes of the paper: which layers do memorized examples use?

Three probes over *layer groups* (the parameters that form one layer or one block):

* gradient accounting: per layer, the norms of the summed gradients of the flagged and of the
  other examples (divided by sqrt(#parameters)) and their cosine, on a checkpoint
  (:func:`gradient_accounting`), over a folder of per-epoch checkpoints
  (:func:`gradient_history`) or while training (:class:`GradientTracker`);
* layer rewinding (:func:`rewind_layers`): one layer at a time set back to an earlier epoch;
* layer retraining (:func:`retrain_layers`): one layer rewound, then retrained alone on the
  non-flagged examples.

Rewinding and retraining copy one group's tensors into the live model and copy them back after:
the model is never deep-copied.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from memaudit.data import ImageDataset
from memaudit.errors import MemauditError
from memaudit.models import Classifier
from memaudit.report import (
    Accuracies,
    GradientsReport,
    Grouping,
    LayerGradients,
    LayerRetrain,
    LayerRewind,
    RetrainReport,
    RewindReport,
)
from memaudit.testbed import EpochEnd, pick_device, predict

__all__ = [
    "Checkpoint",
    "GradientStats",
    "GradientTracker",
    "Grouping",
    "LayerGroup",
    "ProbeStep",
    "find_checkpoints",
    "gradient_accounting",
    "gradient_history",
    "layer_groups",
    "retrain_layers",
    "rewind_layers",
]

_UNIT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
GradientMode = Literal["training", "checkpoint"]
NormStats = Literal["batch", "running"]
_CHECKPOINT_NAME = re.compile(r"epoch_(\d+)\.(safetensors|pt|pth)$")


# --- layer groups ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerGroup:
    """One layer of a probe: ``keys`` are the state-dict keys (of ``model.net``) it owns,
    parameters and buffers; ``params`` the parameter names among them; ``size`` their count."""

    name: str
    keys: tuple[str, ...]
    params: tuple[str, ...]
    size: int


def _net(model: nn.Module) -> nn.Module:
    return model.net if isinstance(model, Classifier) else model


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_MODULES) or "norm" in type(module).__name__.lower()


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _block_names(net: nn.Module) -> list[str]:
    """Top-level children, descending into timm stages and ``ModuleList`` s of blocks."""
    stages = {str(f["module"]) for f in getattr(net, "feature_info", None) or [] if "module" in f}

    def expand(module: nn.Module, prefix: str) -> Iterator[str]:
        for name, child in module.named_children():
            full = prefix + name
            if not _has_params(child):
                continue
            if full in stages:
                yield full
                continue
            below = any(s.startswith(full + ".") for s in stages) or (
                not stages and any(isinstance(m, nn.ModuleList) for m in child.modules())
            )
            if below:
                yield from expand(child, full + ".")
            else:
                yield full

    return list(expand(net, ""))


def _anchors(net: nn.Module, grouping: Grouping) -> set[str]:
    modules = dict(net.named_modules())
    if grouping == Grouping.MODULE:
        return {n for n, m in modules.items() if isinstance(m, _UNIT_MODULES)}
    return {
        n
        for n in _block_names(net)
        if not (_is_norm(modules[n]) and next(modules[n].children(), None) is None)
    }


def layer_groups(
    model: nn.Module,
    *,
    grouping: Grouping | str = Grouping.MODULE,
    names: Sequence[str] | None = None,
) -> list[LayerGroup]:
    """The layer groups of ``model`` in network (registration) order, with stable names.

    ``module``: each conv/linear module with the norm that follows it (named after the conv or
    linear). ``block``: each top-level child, timm stage (``feature_info``) or block of a
    ``ModuleList`` (Hugging Face encoder layers), with a trailing norm joined to the block
    before it. Parameters outside any such module (a ViT's ``cls_token``) form a group named
    after their owner. The classifier head is a group too. ``names`` keeps only those groups.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
        ...                     nn.Linear(4, 2))
        >>> [(g.name, g.size) for g in layer_groups(net)]
        [('0', 48), ('3', 10)]
    """
    net = _net(model)
    grouping = Grouping(grouping)
    anchors = _anchors(net, grouping)
    modules = dict(net.named_modules())
    keys: dict[str, list[str]] = {}
    current: str | None = None
    for key in net.state_dict():
        owner = key.rpartition(".")[0]
        anchor = next((a for a in _ancestors(owner) if a in anchors), None)
        if anchor is None:
            attach = current is not None and _is_norm(modules[owner])
            anchor = current if attach and current is not None else owner
        keys.setdefault(anchor, []).append(key)
        current = anchor
    return _select(_finish_groups(net, keys), names)


def _ancestors(name: str) -> Iterator[str]:
    parts = name.split(".") if name else []
    for end in range(len(parts), 0, -1):
        yield ".".join(parts[:end])


def _finish_groups(net: nn.Module, keys: dict[str, list[str]]) -> list[LayerGroup]:
    """Name root-owned groups after their keys; fold groups without parameters into the last."""
    sizes = {name: p.numel() for name, p in net.named_parameters()}
    groups: list[LayerGroup] = []
    for name, owned in keys.items():
        params = tuple(k for k in owned if k in sizes)
        if not params and groups:
            last = groups[-1]
            groups[-1] = LayerGroup(last.name, last.keys + tuple(owned), last.params, last.size)
            continue
        label = name or "+".join(owned)
        groups.append(LayerGroup(label, tuple(owned), params, sum(sizes[p] for p in params)))
    return [g for g in groups if g.params]


def _select(groups: list[LayerGroup], names: Sequence[str] | None) -> list[LayerGroup]:
    if not names:
        return groups
    known = {g.name: g for g in groups}
    missing = [n for n in names if n not in known]
    if missing:
        raise MemauditError(
            f"no layer group named {missing[0]!r}; choose from {', '.join(known)} "
            "(or change --grouping)"
        )
    return [known[n] for n in names]


# --- checkpoints -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A per-epoch checkpoint file (``epoch_NNN.safetensors``, as the testbed writes them)."""

    epoch: int
    path: Path


def find_checkpoints(
    folder: str | Path, *, epochs: Sequence[int] | None = None
) -> list[Checkpoint]:
    """The ``epoch_NNN.{safetensors,pt,pth}`` files of ``folder`` (or only ``epochs``), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise MemauditError(
            f"checkpoint folder {str(folder)!r} not found; pass --checkpoints DIR with files "
            "epoch_NNN.safetensors (memaudit testbed writes them)"
        )
    found: dict[int, Path] = {}
    for path in sorted(root.iterdir()):
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(1)), path)
    if not found:
        raise MemauditError(
            f"{root} holds no epoch_NNN.safetensors/.pt checkpoints; save one per epoch there"
        )
    if epochs is not None:
        missing = [e for e in epochs if e not in found]
        if missing:
            raise MemauditError(
                f"no checkpoint for epoch {missing[0]} in {root}; available: "
                f"{_ranges(sorted(found))}"
            )
        return [Checkpoint(e, found[e]) for e in sorted(set(epochs))]
    return [Checkpoint(e, found[e]) for e in sorted(found)]


def _ranges(values: list[int]) -> str:
    return (
        f"{values[0]}-{values[-1]}"
        if values == list(range(values[0], values[-1] + 1))
        else (", ".join(map(str, values)))
    )


def read_state(path: str | Path, net: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint for ``net``; a clear error if they do not fit it."""
    from memaudit.models import _read_file

    payload, _ = _read_file(Path(path), trust_pickle=False)
    if isinstance(payload, nn.Module):  # only reachable with trust_pickle
        payload = payload.state_dict()
    expected = net.state_dict()
    missing = [k for k in expected if k not in payload]
    if missing:
        raise MemauditError(
            f"checkpoint {path} does not fit the model: {len(missing)} of its tensors are "
            f"missing (e.g. {missing[0]!r}); give checkpoints of this model's architecture"
        )
    for key, value in expected.items():
        if payload[key].shape != value.shape:
            raise MemauditError(
                f"checkpoint {path} does not fit the model: {key} has shape "
                f"{tuple(payload[key].shape)}, the model {tuple(value.shape)}"
            )
    return {k: payload[k] for k in expected}


@contextmanager
def swapped(
    model: nn.Module, state: Mapping[str, torch.Tensor], keys: Sequence[str]
) -> Iterator[None]:
    """Within the block, ``keys`` of the live model hold ``state``'s values; restored after."""
    live = _net(model).state_dict(keep_vars=True)
    saved = {k: live[k].detach().clone() for k in keys}
    try:
        with torch.no_grad():
            for k in keys:
                live[k].copy_(state[k])
        yield
    finally:
        with torch.no_grad():
            for k in keys:
                live[k].copy_(saved[k])


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
        self._sums = {True: [torch.zeros_like(p) for p in self._params]}
        self._sums[False] = [torch.zeros_like(p) for p in self._params]
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
            for i, grad in zip(trainable, grads, strict=True):
                if grad is not None:
                    self._sums[flag][i].add_(grad.detach())
            self._counts[flag] += count

    def end_epoch(self, epoch: int | None) -> GradientStats:
        """Close the epoch: its per-group numbers (also kept in :attr:`history`)."""
        stats = self._stats(epoch)
        self.history.append(stats)
        self._reset()
        return stats

    def on_epoch(self, event: EpochEnd) -> None:
        """``on_epoch`` callback for :func:`memaudit.testbed.train`."""
        self.end_epoch(event.epoch)

    def _stats(self, epoch: int | None) -> GradientStats:
        flagged, clean, cosine = [], [], []
        start = 0
        for group in self.groups:
            end = start + len(group.params)
            f = torch.cat([g.flatten() for g in self._sums[True][start:end]]).double()
            c = torch.cat([g.flatten() for g in self._sums[False][start:end]]).double()
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


def _num(value: torch.Tensor | float) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number


def _source(model: nn.Module) -> str:
    return model.info.source if isinstance(model, Classifier) else type(model).__name__


def _data_name(data: ImageDataset) -> str:
    return f"{data.ref.source}:{data.ref.split}"


def _rows(data: ImageDataset, rows: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    return torch.arange(len(data)) if rows is None else torch.as_tensor(rows, dtype=torch.long)


def _flagged(data: ImageDataset, flagged_rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
    rows = torch.as_tensor(flagged_rows, dtype=torch.long).reshape(-1)
    if rows.numel() == 0:
        raise MemauditError("no flagged examples given; pass a file of example ids with --flagged")
    bad = rows[(rows < 0) | (rows >= len(data))]
    if bad.numel():
        raise MemauditError(
            f"flagged row {int(bad[0])} is out of range: the data has {len(data)} examples"
        )
    return rows.unique()


def _complement(n: int, rows: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[rows] = False
    return keep.nonzero().flatten()


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


@dataclass(frozen=True)
class ProbeStep:
    """Progress of a probe: ``done`` of ``total`` steps, the last one described by ``label``."""

    done: int
    total: int
    label: str


ProgressHook = Callable[[ProbeStep], None]


def gradient_accounting(
    model: Classifier,
    data: ImageDataset,
    flagged_rows: torch.Tensor | Sequence[int],
    *,
    rows: torch.Tensor | Sequence[int] | None = None,
    grouping: Grouping | str = Grouping.MODULE,
    layers: Sequence[str] | None = None,
    epoch: int | None = None,
    batch_size: int = 128,
    norm_stats: NormStats = "batch",
    device: str | torch.device = "auto",
) -> GradientsReport:
    """Gradient accounting of one model, post hoc: flagged vs other rows of ``data``.

    Every row of ``rows`` (all by default) contributes once, in seeded random batches. With
    ``norm_stats="batch"`` (default) batch-norm layers use batch statistics as in training (their
    running statistics are restored after); ``"running"`` evaluates the model in eval mode,
    which mid-training checkpoints answer with inflated losses. ``epoch`` labels the column.
    """
    flagged = _flagged(data, flagged_rows)
    tracker = GradientTracker(
        model, flagged, grouping=grouping, layers=layers, mode="checkpoint", norm_stats=norm_stats
    )
    _accumulate(
        model,
        tracker,
        data,
        _rows(data, rows),
        batch_size=batch_size,
        norm_stats=norm_stats,
        device=pick_device(device),
    )
    tracker.end_epoch(epoch)
    return tracker.report(data=_data_name(data))


def gradient_history(
    model: Classifier,
    data: ImageDataset,
    flagged_rows: torch.Tensor | Sequence[int],
    checkpoints: str | Path | Sequence[Checkpoint],
    *,
    rows: torch.Tensor | Sequence[int] | None = None,
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
    flagged = _flagged(data, flagged_rows)
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
                _rows(data, rows),
                batch_size=batch_size,
                norm_stats=norm_stats,
                device=dev,
            )
        tracker.end_epoch(point.epoch)
        if on_progress is not None:
            on_progress(ProbeStep(i + 1, len(points), f"epoch {point.epoch}"))
    return tracker.report(data=_data_name(data))


def _checkpoint_list(checkpoints: str | Path | Sequence[Checkpoint]) -> list[Checkpoint]:
    if isinstance(checkpoints, (str, Path)):
        return find_checkpoints(checkpoints)
    if not checkpoints:
        raise MemauditError("no checkpoints given; pass a folder of epoch_NNN.safetensors")
    return list(checkpoints)


# --- layer rewinding and retraining ----------------------------------------------------------


@dataclass(frozen=True)
class _Split:
    """The rows a probe evaluates: flagged and clean training rows, and an optional test set."""

    data: ImageDataset
    flagged: torch.Tensor
    clean: torch.Tensor
    test: ImageDataset | None


def _split(
    data: ImageDataset,
    flagged_rows: torch.Tensor | Sequence[int],
    clean_rows: torch.Tensor | Sequence[int] | None,
    test: ImageDataset | None,
) -> _Split:
    flagged = _flagged(data, flagged_rows)
    clean = (
        _complement(len(data), flagged)
        if clean_rows is None
        else torch.as_tensor(clean_rows, dtype=torch.long)
    )
    return _Split(data, flagged, clean, test)


def _evaluate(
    model: nn.Module, split: _Split, *, batch_size: int, device: torch.device
) -> Accuracies:
    """Flagged (given-label), clean and test accuracy, in one batched pass over the rows."""
    rows = torch.cat([split.flagged, split.clean])
    hits = predict(model, split.data, rows, batch_size=batch_size, device=device)  # type: ignore[arg-type]
    hits = (hits == split.data.labels[rows]).float()
    n = split.flagged.numel()
    test = None
    if split.test is not None and len(split.test):
        preds = predict(model, split.test, batch_size=batch_size, device=device)  # type: ignore[arg-type]
        test = float((preds == split.test.labels).float().mean())
    return Accuracies(flagged=_mean(hits[:n]), clean=_mean(hits[n:]), test=test)


def _mean(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None


def rewind_layers(
    model: Classifier,
    data: ImageDataset,
    flagged_rows: torch.Tensor | Sequence[int],
    checkpoints: str | Path | Sequence[Checkpoint],
    *,
    clean_rows: torch.Tensor | Sequence[int] | None = None,
    test: ImageDataset | None = None,
    grouping: Grouping | str = Grouping.MODULE,
    layers: Sequence[str] | None = None,
    batch_size: int = 512,
    device: str | torch.device = "auto",
    on_progress: ProgressHook | None = None,
) -> RewindReport:
    """Set one layer group at a time to its weights of each checkpoint's epoch and evaluate.

    Flagged accuracy uses the given labels (memorization); clean accuracy the other rows of
    ``data`` (or ``clean_rows``). Only the rewound group's tensors are copied in, and copied back.

    Example:
        >>> report = rewind_layers(model, train, noisy_ids, "tb/checkpoints")  # doctest: +SKIP
        >>> report.flagged_at(0)  # doctest: +SKIP
    """
    split = _split(data, flagged_rows, clean_rows, test)
    points = _checkpoint_list(checkpoints)
    groups = layer_groups(model, grouping=grouping, names=layers)
    dev = pick_device(device)
    net = _net(model.to(dev))
    baseline = _evaluate(model, split, batch_size=batch_size, device=dev)
    table = [[baseline] * len(points) for _ in groups]
    total = len(points) * len(groups)
    for j, point in enumerate(points):
        state = read_state(point.path, net)
        for i, group in enumerate(groups):
            with swapped(model, state, group.keys):
                table[i][j] = _evaluate(model, split, batch_size=batch_size, device=dev)
            if on_progress is not None:
                on_progress(
                    ProbeStep(j * len(groups) + i + 1, total, f"{group.name} @ {point.epoch}")
                )
    rows = [
        LayerRewind(
            name=group.name,
            params=group.size,
            flagged=[a.flagged or 0.0 for a in accs],
            clean=[a.clean if a.clean is not None else math.nan for a in accs],
            test=[a.test for a in accs if a.test is not None] if test is not None else None,
        )
        for group, accs in zip(groups, table, strict=True)
    ]
    return RewindReport(
        model=_source(model),
        data=_data_name(data),
        grouping=Grouping(grouping),
        n_flagged=split.flagged.numel(),
        n_clean=split.clean.numel(),
        n_test=len(test) if test is not None else None,
        baseline=baseline,
        epochs=[p.epoch for p in points],
        layers=rows,
    )


@contextmanager
def _only_trains(model: nn.Module, group: LayerGroup) -> Iterator[list[nn.Parameter]]:
    """Only ``group``'s parameters require grad and only its modules are in train mode (norm
    statistics of the other layers stay frozen); flags, modes and ``.grad`` restored after."""
    net = _net(model)
    named = dict(net.named_parameters())
    flags = {name: p.requires_grad for name, p in named.items()}
    modes = {name: m.training for name, m in net.named_modules()}
    keys = set(group.keys)
    try:
        for name, p in named.items():
            p.requires_grad_(name in group.params)
        net.eval()
        for name, module in net.named_modules():
            own = [
                f"{name}.{k}" if name else k
                for k, _ in [
                    *module.named_parameters(recurse=False),
                    *module.named_buffers(recurse=False),
                ]
            ]
            if own and all(k in keys for k in own):
                module.train()
        yield [named[p] for p in group.params]
    finally:
        for name, module in net.named_modules():
            module.train(modes[name])
        for name, p in named.items():
            p.requires_grad_(flags[name])
            if name in group.params:
                p.grad = None


def _train_group(
    model: nn.Module,
    params: list[nn.Parameter],
    data: ImageDataset,
    rows: torch.Tensor,
    *,
    settings: _TrainSettings,
    device: torch.device,
) -> None:
    """SGD (Nesterov, one-cycle) on ``params`` only; the caller sets the modules' modes."""
    s = settings
    steps = max(1, math.ceil(len(rows) / s.batch_size))
    opt = torch.optim.SGD(
        params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=True
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.epochs * steps)
    gen = torch.Generator().manual_seed(s.seed)
    labels = data.labels.to(device)
    for _ in range(s.epochs):
        for batch in rows[torch.randperm(len(rows), generator=gen)].split(s.batch_size):
            loss = F.cross_entropy(model(data.batch(batch, device)), labels[batch.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@dataclass(frozen=True)
class _TrainSettings:
    epochs: int
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    seed: int


def retrain_layers(
    model: Classifier,
    data: ImageDataset,
    flagged_rows: torch.Tensor | Sequence[int],
    checkpoints: str | Path | Sequence[Checkpoint],
    *,
    rewind_epoch: int = 0,
    epochs: int = 5,
    lr: float = 0.05,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    clean_rows: torch.Tensor | Sequence[int] | None = None,
    eval_clean_rows: torch.Tensor | Sequence[int] | None = None,
    test: ImageDataset | None = None,
    grouping: Grouping | str = Grouping.MODULE,
    layers: Sequence[str] | None = None,
    batch_size_eval: int = 512,
    device: str | torch.device = "auto",
    on_progress: ProgressHook | None = None,
) -> RetrainReport:
    """Per layer group: rewind it to ``rewind_epoch``, retrain it alone on the clean rows.

    The other groups stay frozen (their norm statistics too). Flagged accuracy can come back
    only from memorization the frozen layers hold. The model is restored after each group.
    Training uses ``clean_rows`` (default: every non-flagged row); clean accuracy is measured
    on ``eval_clean_rows`` (default: the same rows).

    Example:
        >>> report = retrain_layers(model, train, noisy_ids, "tb/checkpoints")  # doctest: +SKIP
        >>> {r.name: r.flagged_recovered for r in report.layers}  # doctest: +SKIP
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise MemauditError("retraining needs epochs >= 1, lr > 0 and batch size >= 1")
    split = _split(data, flagged_rows, clean_rows, test)
    train_rows = split.clean
    if eval_clean_rows is not None:
        split = _Split(data, split.flagged, torch.as_tensor(eval_clean_rows), test)
    if isinstance(checkpoints, (str, Path)):
        point = find_checkpoints(checkpoints, epochs=[rewind_epoch])[0]
    else:
        point = next((c for c in checkpoints if c.epoch == rewind_epoch), None)  # type: ignore[assignment]
        if point is None:
            raise MemauditError(f"no checkpoint for epoch {rewind_epoch} among those given")
    groups = layer_groups(model, grouping=grouping, names=layers)
    dev = pick_device(device)
    net = _net(model.to(dev))
    state = read_state(point.path, net)
    settings = _TrainSettings(epochs, lr, batch_size, momentum, weight_decay, seed)
    baseline = _evaluate(model, split, batch_size=batch_size_eval, device=dev)
    rows = []
    for i, group in enumerate(groups):
        with swapped(model, state, group.keys):
            rewound = _evaluate(model, split, batch_size=batch_size_eval, device=dev)
            with _only_trains(model, group) as params:
                _train_group(model, params, data, train_rows, settings=settings, device=dev)
            retrained = _evaluate(model, split, batch_size=batch_size_eval, device=dev)
        rows.append(
            LayerRetrain(name=group.name, params=group.size, rewound=rewound, retrained=retrained)
        )
        if on_progress is not None:
            on_progress(ProbeStep(i + 1, len(groups), group.name))
    return RetrainReport(
        model=_source(model),
        data=_data_name(data),
        grouping=Grouping(grouping),
        rewind_epoch=point.epoch,
        train_epochs=epochs,
        lr=lr,
        n_flagged=split.flagged.numel(),
        n_clean=split.clean.numel(),
        n_test=len(test) if test is not None else None,
        baseline=baseline,
        layers=rows,
    )
