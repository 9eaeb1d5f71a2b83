"""Layer rewinding and layer retraining: one layer group at a time, the model restored after."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memaudit.data import ImageDataset, complement, validate_rows
from memaudit.engine import fit, pick_device, predict
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
    _source,
    find_checkpoints,
    layer_groups,
    read_state,
    swapped,
)
from memaudit.schema import (
    Accuracies,
    Grouping,
    LayerRetrain,
    LayerRewind,
    RetrainReport,
    RewindReport,
)

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
    ids: Sequence[int],
    clean_ids: Sequence[int] | None,
    test: ImageDataset | None,
) -> _Split:
    flagged = validate_rows(data, data.rows(ids))
    clean = complement(len(data), flagged) if clean_ids is None else data.rows(clean_ids)
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
    ids: Sequence[int],
    checkpoints: str | Path | Sequence[Checkpoint],
    *,
    clean_ids: Sequence[int] | None = None,
    test: ImageDataset | None = None,
    grouping: Grouping | str = Grouping.MODULE,
    layers: Sequence[str] | None = None,
    batch_size: int = 512,
    device: str | torch.device = "auto",
    on_progress: ProgressHook | None = None,
) -> RewindReport:
    """Set one layer group at a time to its weights of each checkpoint's epoch and evaluate.

    Flagged accuracy (of the example ``ids``) uses the given labels (memorization); clean
    accuracy the other examples of ``data`` (or ``clean_ids``). Only the rewound group's
    tensors are copied in, and copied back.

    Example:
        >>> report = rewind_layers(model, train, noisy_ids, "tb/checkpoints")  # doctest: +SKIP
        >>> report.flagged_at(0)  # doctest: +SKIP
    """
    split = _split(data, ids, clean_ids, test)
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
            flagged=[a.flagged for a in accs],
            clean=[a.clean for a in accs],
            test=[a.test for a in accs] if test is not None else None,
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
    fit(
        model,
        data,
        rows,
        params=params,
        mode="keep",
        epochs=s.epochs,
        lr=s.lr,
        batch_size=s.batch_size,
        momentum=s.momentum,
        weight_decay=s.weight_decay,
        seed=s.seed,
        device=device,
    )


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
    ids: Sequence[int],
    checkpoints: str | Path | Sequence[Checkpoint],
    *,
    rewind_epoch: int = 0,
    epochs: int = 5,
    lr: float = 0.05,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    clean_ids: Sequence[int] | None = None,
    eval_clean_ids: Sequence[int] | None = None,
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
    Training uses the examples ``clean_ids`` (default: every example not in ``ids``); clean
    accuracy is measured on ``eval_clean_ids`` (default: the same examples).

    Example:
        >>> report = retrain_layers(model, train, noisy_ids, "tb/checkpoints")  # doctest: +SKIP
        >>> {r.name: r.flagged_recovered for r in report.layers}  # doctest: +SKIP
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise MemauditError("retraining needs epochs >= 1, lr > 0 and batch size >= 1")
    split = _split(data, ids, clean_ids, test)
    train_rows = split.clean
    if eval_clean_ids is not None:
        split = _Split(data, split.flagged, data.rows(eval_clean_ids), test)
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
