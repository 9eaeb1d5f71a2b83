"""The training engine: one ``fit`` loop, batched evaluation and the device choice.

Everything that trains (the testbed, the unlearning methods, the layer probes, retraining)
runs :func:`fit`; everything that scores a model on rows of a dataset runs :func:`predict`,
:func:`evaluate` or :func:`accuracy`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from memaudit.data import ImageDataset
from memaudit.errors import MemauditError
from memaudit.models import Classifier

BatchHook = Callable[[torch.Tensor], None]  # the example ids (rows) of the batch
BatchScope = Callable[[torch.Tensor], AbstractContextManager[object]]  # a context per batch
LossHook = Callable[[torch.Tensor, torch.Tensor], None]  # (ids, per-example losses)


@dataclass(frozen=True)
class EpochEnd:
    """Passed to ``on_epoch`` after each training epoch (``loss``: mean over its examples)."""

    epoch: int
    epochs: int
    loss: float
    model: nn.Module


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MemauditError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MemauditError("--device cuda was asked for but no CUDA GPU is available; use cpu")
    return dev


def fit(
    model: nn.Module,
    data: ImageDataset,
    rows: torch.Tensor | None = None,
    *,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: Literal["one-cycle", "constant"] = "one-cycle",
    params: Iterable[nn.Parameter] | None = None,
    mode: Literal["train", "eval", "keep"] = "train",
    ascend: bool = False,
    stop_loss: float | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    on_batch: BatchHook | None = None,
    around_batch: BatchScope | None = None,
    on_loss: LossHook | None = None,
    on_epoch: Callable[[EpochEnd], None] | None = None,
) -> nn.Module:
    """Train ``model`` on ``rows`` of ``data`` (all by default) with SGD; returns it in eval mode.

    Nesterov SGD with a one-cycle schedule peaking at ``lr`` (``schedule="constant"``, or
    ``momentum=0`` for plain SGD). ``params``: only these are stepped (default: every parameter
    that requires grad). ``mode``: the modules train (``train``), keep their running statistics
    (``eval``), or stay as the caller set them (``keep``). ``ascend`` raises the loss instead
    (gradient ascent); ``stop_loss`` ends training at the first batch whose mean loss exceeds
    it, before stepping on it. Hooks: ``on_batch(ids)`` before each forward,
    ``around_batch(ids)``: a context each training step runs in (example-tied dropout applies
    the batch's masks in it), ``on_loss(ids, losses)`` with per-example losses still on the graph
    (the gradient probe), ``on_epoch(EpochEnd)`` after each epoch.
    """
    dev = pick_device(device)
    model.to(dev)
    if mode != "keep":
        model.train(mode == "train")
    subset = torch.arange(len(data)) if rows is None else rows
    gen = torch.Generator().manual_seed(seed)
    steps = max(1, -(-len(subset) // batch_size))
    trained = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(
        trained, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0
    )
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
        if schedule == "one-cycle"
        else None
    )
    labels = data.labels.to(dev)
    stopped = False
    for epoch in range(1, epochs + 1):
        order = subset[torch.randperm(len(subset), generator=gen)]
        total, seen = 0.0, 0
        for batch in order.split(batch_size):
            if on_batch is not None:
                on_batch(batch)
            with around_batch(batch) if around_batch is not None else nullcontext():
                losses = F.cross_entropy(
                    model(data.batch(batch, dev)), labels[batch.to(dev)], reduction="none"
                )
                if on_loss is not None:
                    on_loss(batch, losses)
                loss = losses.mean()
                value = float(loss.detach())
                total, seen = total + value * len(batch), seen + len(batch)
                if stop_loss is not None and value > stop_loss:
                    stopped = True
                    break
                opt.zero_grad(set_to_none=True)
                (-loss if ascend else loss).backward()
            opt.step()
            if sched is not None:
                sched.step()
        if on_epoch is not None:
            was_training = model.training
            model.eval()
            on_epoch(EpochEnd(epoch, epochs, total / max(1, seen), model))
            model.train(was_training)
        if stopped:
            break
    return model.eval()


@torch.no_grad()
def logits_of(
    model: Classifier,
    data: ImageDataset,
    rows: torch.Tensor | None = None,
    *,
    batch_size: int = 512,
    device: str | torch.device = "auto",
) -> torch.Tensor:
    """The logits ``[N, K]`` of ``rows`` (all rows by default), batched, on the CPU."""
    dev = pick_device(device)
    model.to(dev).eval()
    rows = torch.arange(len(data)) if rows is None else rows
    out = [model(data.batch(b, dev)).float().cpu() for b in rows.split(batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.info.num_classes)


def predict(
    model: Classifier,
    data: ImageDataset,
    rows: torch.Tensor | None = None,
    *,
    batch_size: int = 512,
    device: str | torch.device = "auto",
) -> torch.Tensor:
    """Predicted class of each row (all rows by default), batched."""
    return logits_of(model, data, rows, batch_size=batch_size, device=device).argmax(1)


@dataclass(frozen=True)
class Outcomes:
    """Per-example cross-entropy loss and correctness (given labels)."""

    loss: torch.Tensor
    correct: torch.Tensor


def evaluate(
    model: Classifier,
    data: ImageDataset,
    rows: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device = "auto",
) -> Outcomes:
    """Loss and correctness of ``model`` on ``rows`` of ``data``, batched."""
    logits = logits_of(model, data, rows, batch_size=batch_size, device=device)
    labels = data.labels[rows]
    return Outcomes(F.cross_entropy(logits, labels, reduction="none"), logits.argmax(1) == labels)


def accuracy(
    model: Classifier,
    data: ImageDataset,
    rows: torch.Tensor | None = None,
    *,
    device: str | torch.device = "auto",
) -> float:
    """Share of ``rows`` predicted as their (given) label (NaN for no rows)."""
    rows = torch.arange(len(data)) if rows is None else rows
    if rows.numel() == 0:
        return float("nan")
    return float((predict(model, data, rows, device=device) == data.labels[rows]).float().mean())
