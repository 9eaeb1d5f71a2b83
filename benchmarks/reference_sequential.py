"""A faithful sequential re-implementation of the authors' localization procedure.

One example at a time: copy the model, then per greedy step run a forward and backward pass over
a whole batch (the target example plus the reference rows) with the paper's single loss — mean
cross-entropy with the target's term multiplied by ``-batch_size`` — score every unit by
``sum(w * dJ/dw)`` over its weights and bias, zero the best unit's weights and bias, and stop when
the prediction changes. Not part of the package API: it exists to check memaudit's batched search
against the paper's procedure, for answers and for speed, in the same run.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memaudit.data import ImageDataset
from memaudit.models import Classifier
from memaudit.units import UnitSpace, zero_unit_weights


@dataclass
class SequentialResult:
    row: int
    flipped: bool
    units: list[int]  # flat indices of a UnitSpace of the model, in the order zeroed
    reference_accuracy: float | None  # of the edited model, when it flipped
    test_accuracy: float | None
    seconds: float  # search and evaluation
    eval_seconds: float  # evaluation alone


def _unit_scores(model: Classifier, space: UnitSpace) -> torch.Tensor:
    """``sum(w * grad)`` per output unit of every layer of ``space``, on one flat axis."""
    parts = []
    for layer in space.layers:
        module = model.net.get_submodule(layer.name)
        weight = module.weight
        assert isinstance(weight, torch.Tensor) and weight.grad is not None
        score = (weight * weight.grad).flatten(1).sum(1)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.grad is not None:
            score = score + bias * bias.grad
        parts.append(score)
    return torch.cat(parts).detach()


@torch.no_grad()
def _accuracy(
    net: Classifier, data: ImageDataset, rows: torch.Tensor, device: torch.device
) -> float:
    correct = sum(
        int((net(data.batch(c, device)).argmax(1) == data.labels[c].to(device)).sum())
        for c in rows.split(256)  # the fastest CPU batch, as in memaudit's evaluation
    )
    return correct / max(1, len(rows))


def sequential_flip(
    model: Classifier,
    data: ImageDataset,
    row: int,
    reference_rows: torch.Tensor,
    *,
    max_units: int,
    device: torch.device,
    test: ImageDataset | None = None,
    test_rows: torch.Tensor | None = None,
) -> SequentialResult:
    """The authors' greedy weight-zeroing search for one example, then the edit's accuracy."""
    start = time.perf_counter()
    net = copy.deepcopy(model).to(device).eval()
    space = net.units()
    rows = torch.cat([torch.tensor([row]), reference_rows])
    x, y = data.batch(rows, device), data.labels[rows].to(device)
    weights = torch.ones(len(rows), device=device)
    weights[0] = -len(rows)
    zeroed: list[int] = []
    flipped = False
    while True:
        with torch.no_grad():
            flipped = bool(net(x[:1]).argmax(1)[0] != y[0])
        if flipped or len(zeroed) >= max_units:
            break
        net.zero_grad(set_to_none=True)
        loss = (F.cross_entropy(net(x), y, reduction="none") * weights).mean()
        loss.backward()
        scores = _unit_scores(net, space)
        if zeroed:
            scores[zeroed] = float("-inf")
        best = int(scores.argmax())
        zero_unit_weights(net.net, space, [best])
        zeroed.append(best)
    evaluated = time.perf_counter()
    ref_acc = _accuracy(net, data, reference_rows, device) if flipped else None
    test_acc = (
        _accuracy(net, test, test_rows, device)
        if flipped and test is not None and test_rows is not None
        else None
    )
    end = time.perf_counter()
    return SequentialResult(row, flipped, zeroed, ref_acc, test_acc, end - start, end - evaluated)
