"""The training engine: one ``fit`` loop, batched evaluation and the device choice.

Everything that trains (the testbed, the unlearning methods, the layer probes, retraining)
runs :func:`fit`; everything that scores a model on rows of a dataset runs :func:`predict`,
:func:`evaluate` or :func:`accuracy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from memaudit.data import ImageDataset
from memaudit.errors import MemauditError, validated
from memaudit.models import Classifier
from memaudit.schema import Recipe

BatchHook = Callable[[torch.Tensor], None]  # the example ids (rows) of the batch
BatchScope = Callable[[torch.Tensor], AbstractContextManager[object]]  # a context per batch
LossHook = Callable[[torch.Tensor, torch.Tensor], None]  # (ids, per-example losses)


@dataclass(frozen=True)
class Mixed:
    """The rows a training step runs on and each one's loss weight: the step descends
    ``sum(weights * losses)`` (a plain step: the batch's rows, each at ``1 / len``).
    ``targets``: class probabilities ``[len(ids), K]`` each row's cross-entropy is taken
    against instead of its label (a label is a one-hot row); ``None``: the labels."""

    ids: torch.Tensor
    weights: torch.Tensor
    targets: torch.Tensor | None = None


BatchMix = Callable[[torch.Tensor], Mixed]  # the epoch's batch of rows -> the step's rows


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (a CUDA GPU with bf16, a
    CPU with AMX or AVX512-BF16): elsewhere autocast to bfloat16 is slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# AdamW + warm-up + cosine, the usual recipe for ViTs trained from scratch (DeiT) and for
# LayerNorm CNNs (ConvNeXt). Fine-tuning (unlearning) runs at its full rate, as in the
# BatchNorm CNN recipe: at a tenth, example-tied dropout left a small HF ViT predicting 82% of
# its 400 flagged mislabeled ids as labelled, and fine-tuning on the retained rows 70%
# (bench_unlearn.py --arch; the method's docstring has the numbers).
_ADAMW = Recipe(
    family="transformer",
    optimizer="adamw",
    lr=1e-3,
    weight_decay=0.05,
    schedule="cosine",
    warmup=0.1,
    clip_grad_norm=1.0,
)
RECIPES: dict[str, Recipe] = {
    # SGD + one-cycle: what memaudit's CNN testbed was measured with (README).
    "batchnorm-cnn": Recipe(family="batchnorm-cnn"),
    "layernorm-cnn": _ADAMW.model_copy(update={"family": "layernorm-cnn", "lr": 2e-3}),
    "transformer": _ADAMW,
}


def family_of(model: nn.Module) -> str:
    """The model's family: ``transformer`` (attention), ``batchnorm-cnn``, ``layernorm-cnn``
    (LayerNorm and no BatchNorm, e.g. ConvNeXt); a plain net counts as a BatchNorm CNN."""
    kinds = {type(m).__name__.lower() for m in model.modules()}
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()) or any(
        "attention" in k for k in kinds
    ):
        return "transformer"
    if any(isinstance(m, _BATCHNORM) for m in model.modules()):
        return "batchnorm-cnn"
    if any(isinstance(m, nn.LayerNorm) for m in model.modules()) or any(
        "layernorm" in k for k in kinds
    ):
        return "layernorm-cnn"
    return "batchnorm-cnn"


def recipe_for(model: nn.Module, **overrides: object) -> Recipe:
    """The recipe the model was trained with when its info records one (memaudit trained it),
    else its family's (:data:`RECIPES`), with ``overrides`` that are not None (e.g. ``lr``,
    ``optimizer``, ``warmup``, ``weight_decay``). The fine-tuning share of the rate is always
    the family's: it is how memaudit unlearns, not how the model was trained."""
    family = RECIPES[family_of(model)]
    recorded = getattr(getattr(model, "info", None), "recipe", None)
    base = (
        recorded.model_copy(update={"finetune_lr_scale": family.finetune_lr_scale})
        if isinstance(recorded, Recipe)
        else family
    )
    given = {k: v for k, v in overrides.items() if v is not None}
    return validated(Recipe, {**base.model_dump(), **given}, "training setting")


def _optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(
        params,
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        nesterov=recipe.momentum > 0,
    )


def _scheduler(
    recipe: Recipe, opt: torch.optim.Optimizer, total: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if recipe.schedule == "one-cycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total)
    if recipe.schedule == "constant":
        return None
    warm = int(recipe.warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _world() -> tuple[int, int]:
    """This process's rank and the size of the initialized process group (else 0 of 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _replicated(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model`` under DDP: one replica per rank, gradients all-reduced (averaged over ranks).
    ``static_graph``: every step uses the same parameters, and a parameter the forward never
    uses (e.g. an unused head) is allowed without a graph search per step."""
    ids = None
    if dev.type == "cuda":
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)


def _share(batch: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, float]:
    """This rank's part of a global batch and the weight of its summed loss, ``world / len``,
    so that DDP's mean over ranks is the global batch's mean gradient. A rank left without a
    part (a last batch shorter than the world) runs the whole batch at weight 0: it still
    joins the all-reduce and adds nothing."""
    mine = batch[rank::world]
    return (mine, world / len(batch)) if len(mine) else (batch, 0.0)


def _step_loss(
    losses: torch.Tensor, *, weight: float, n: int, world: int
) -> tuple[torch.Tensor, float]:
    """The loss to step on, and the mean loss of the global batch of ``n`` (on every rank)."""
    if world == 1:
        loss = losses.mean()
        return loss, float(loss.detach())
    total = (losses.detach().sum() if weight else losses.new_zeros(())).float()
    dist.all_reduce(total)
    return losses.sum() * weight, float(total) / max(1, n)


def _share_mixed(mixed: Mixed, rank: int, world: int) -> Mixed:
    """This rank's rows of a mixed global step, with their weights and targets (as
    :func:`_share`: a rank left without rows runs them all at weight 0)."""
    if rank >= len(mixed.ids):
        return Mixed(mixed.ids, torch.zeros_like(mixed.weights), mixed.targets)
    part = slice(rank, None, world)
    targets = None if mixed.targets is None else mixed.targets[part]
    return Mixed(mixed.ids[part], mixed.weights[part], targets)


def _mixed_loss(
    losses: torch.Tensor, weights: torch.Tensor, *, world: int
) -> tuple[torch.Tensor, float]:
    """The loss to step on, ``sum(weights * losses)`` over the global step (times ``world``
    on each rank: DDP averages the ranks' gradients), and its value (on every rank)."""
    loss = (losses * weights.to(losses.dtype)).sum()
    if world == 1:
        return loss, float(loss.detach())
    total = loss.detach().float().clone()
    dist.all_reduce(total)
    return loss * world, float(total)


def fit(
    model: nn.Module,
    data: ImageDataset,
    rows: torch.Tensor | None = None,
    *,
    epochs: int,
    recipe: Recipe | None = None,
    lr: float | None = None,
    batch_size: int = 128,
    momentum: float | None = None,
    weight_decay: float | None = None,
    schedule: Literal["one-cycle", "cosine", "constant"] | None = None,
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
    mix: BatchMix | None = None,
) -> nn.Module:
    """Train ``model`` on ``rows`` of ``data`` (all by default); returns it in eval mode.

    ``recipe`` (default: the model family's, :func:`recipe_for`) sets the optimizer (Nesterov
    SGD or AdamW), the schedule (one-cycle, cosine after a linear warm-up, or constant) peaking
    at its ``lr``, weight decay and gradient clipping; ``lr``, ``momentum``, ``weight_decay``
    and ``schedule`` override it (``momentum=0``: plain SGD). ``params``: only these are
    stepped (default: every parameter that requires grad). ``mode``: the modules train
    (``train``), keep their running statistics (``eval``), or stay as the caller set them
    (``keep``). ``ascend`` raises the loss instead (gradient ascent); ``stop_loss`` ends
    training at the first batch whose mean loss exceeds it, before stepping on it. Hooks:
    ``on_batch(ids)`` before each forward; ``around_batch(ids)``, a context each training step
    runs in (example-tied dropout applies the batch's masks in it); ``on_loss(ids, losses)``
    with per-example losses still on the graph (the gradient probe); ``on_epoch(EpochEnd)``
    after each epoch. ``mix(batch)``: the rows and per-example loss weights (a :class:`Mixed`)
    each step trains on instead of the batch at ``1 / len`` each, and optionally their soft
    targets; the step descends the weighted sum, which is also the loss ``stop_loss`` and the
    epoch losses see (NegGrad+ adds forget rows at a negative weight; example-tied dropout's
    distillation, rows fit to a teacher's probabilities).

    Under an initialized process group of several processes (``torchrun``) the model trains
    under DDP: every rank draws the same order and global batches of ``batch_size`` and
    trains on its share ``batch[rank::world]``, its summed loss weighted so that the
    all-reduced gradient is the global batch's mean. The steps, the schedule, ``stop_loss``
    (decided on the global batch's mean loss) and the epoch losses are those of one process;
    ``on_batch`` and ``around_batch`` get this rank's ids. ``mix`` is called with the global
    batch, and its rows and weights are shared out together. BatchNorm normalizes with each
    rank's own batch statistics (the running statistics are rank 0's, broadcast each step).
    ``on_loss`` is refused there: it would see one rank's losses.
    """
    rank, world = _world()
    if world > 1 and on_loss is not None:
        raise MemauditError(
            "on_loss (e.g. the gradient probe) sees only one rank's losses under DDP: run it in "
            "one process, without torchrun"
        )
    dev = pick_device(device)
    model.to(dev)
    if mode != "keep":
        model.train(mode == "train")
    subset = torch.arange(len(data)) if rows is None else rows
    gen = torch.Generator().manual_seed(seed)
    steps = max(1, -(-len(subset) // batch_size))
    trained = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    r = (recipe or recipe_for(model)).model_copy(
        update={
            k: v
            for k, v in {
                "lr": lr,
                "momentum": momentum,
                "weight_decay": weight_decay,
                "schedule": schedule,
            }.items()
            if v is not None
        }
    )
    opt = _optimizer(r, trained)
    sched = _scheduler(r, opt, max(1, epochs * steps))  # epochs=0: no step, no schedule
    labels = data.labels.to(dev)
    net = model if world == 1 else _replicated(model, dev)
    stopped = False
    for epoch in range(1, epochs + 1):
        order = subset[torch.randperm(len(subset), generator=gen)]
        total, seen = 0.0, 0
        for batch in order.split(batch_size):
            weights: torch.Tensor | None = None
            targets: torch.Tensor | None = None
            if mix is None:
                ids, weight = (batch, 1.0) if world == 1 else _share(batch, rank, world)
            else:
                mixed = mix(batch) if world == 1 else _share_mixed(mix(batch), rank, world)
                ids, weights, targets = mixed.ids, mixed.weights, mixed.targets
            if on_batch is not None:
                on_batch(ids)
            with around_batch(ids) if around_batch is not None else nullcontext():
                logits = net(data.batch(ids, dev))
                target = labels[ids.to(dev)] if targets is None else targets.to(dev, logits.dtype)
                losses = F.cross_entropy(logits, target, reduction="none")
                if on_loss is not None:
                    on_loss(ids, losses)
                if weights is None:
                    loss, value = _step_loss(losses, weight=weight, n=len(batch), world=world)
                else:
                    loss, value = _mixed_loss(losses, weights.to(dev), world=world)
                total, seen = total + value * len(batch), seen + len(batch)
                if stop_loss is not None and value > stop_loss:
                    stopped = True
                    break
                opt.zero_grad(set_to_none=True)
                (-loss if ascend else loss).backward()
            if r.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trained, r.clip_grad_norm)
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


@contextmanager
def channels_last(model: nn.Module) -> Iterator[None]:
    """The model's 4-d (convolution) weights in channels-last layout for the block, restored
    after. The same arithmetic in another memory order. The testbed's ResNet-9 on the 2-core
    test CPU, masked passes of 256 rows, best of three: 24-27% less time per row for a forward
    and backward and 33-40% for a forward with two threads; 18% for a forward and backward
    with one thread (as each rank of a two-rank launch there runs), in one run."""
    if not any(p.ndim == 4 for p in model.parameters()):
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


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
