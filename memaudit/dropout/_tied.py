"""Example-tied dropout on a model: masks from a hash of (seed, example id, channel), applied
through the unit masks of :mod:`memaudit.masks`; nothing is stored per example and no module of
the model is replaced."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Generic, Literal, TypeVar, get_args

import torch
from torch import nn

from memaudit import keyed
from memaudit.dropout._fold import fold_scale
from memaudit.dropout._placement import (
    conv_layers,
    layer_outputs,
    mlp_hidden_layers,
    net_of,
    stage_outputs,
)
from memaudit.engine import family_of
from memaudit.errors import MemauditError
from memaudit.masks import UnitMasks
from memaudit.units import UnitSpace

DropoutMode = Literal["expectation", "drop"]
MODES: tuple[str, ...] = get_args(DropoutMode)
M = TypeVar("M", bound=nn.Module)


def default_layers(model: nn.Module) -> list[str]:
    """Where dropout goes by default: after each stage / block output, as in the paper.

    Transformers and LayerNorm CNNs get it on the hidden features of their MLPs
    (:func:`mlp_hidden_layers`) when those fold. Otherwise, stages are the modules a model
    lists in ``feature_info`` (timm models, memaudit's nets).
    They are used when their drop-mode scaling folds into a plain model (checked on a copy);
    otherwise (e.g. a stage output that also feeds an identity shortcut), and for models without
    ``feature_info``, dropout goes after every conv / linear layer (:func:`conv_layers`).
    On the label-noise testbed, stage outputs with the drop-mode model's BatchNorm recalibrated
    (:func:`recalibrate_norms`) beat the normally trained model's test accuracy (README).
    """
    if family_of(model) != "batchnorm-cnn":
        hidden = mlp_hidden_layers(model)
        if hidden and _folds(model, hidden):
            return hidden
    stages = stage_outputs(model)
    return stages if stages and _folds(model, stages) else conv_layers(model)


def _folds(model: nn.Module, names: list[str]) -> bool:
    try:
        TiedDropout(copy.deepcopy(model), after=names).fold("drop")
    except (MemauditError, RuntimeError, ValueError):  # e.g. the traced input has a wrong shape
        return False
    return True


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise MemauditError(f"unknown example-tied dropout mode {mode!r}; use one of {MODES}")


class TiedDropout(Generic[M]):
    """Example-tied dropout over whole channels of the outputs of layers ``after`` of ``model``.

    A layer with ``C`` channels keeps its first ``round(p_gen * C)`` (generalization units) on
    for every example; each other channel (a memorization unit) is on for example ``i`` with
    probability ``p_mem``, drawn by a hash of ``(seed, i, channel)``: the same example gets the
    same mask in every epoch, process and device. ``after`` names modules of the model (of
    ``net`` for a :class:`~memaudit.models.Classifier`; default
    :func:`~memaudit.dropout.default_layers`); each draws from its own stream of ``seed``.
    ``example`` (an input batch) sizes outputs that are not a conv / linear / norm layer's.

    The dropout acts only in a scope, through :class:`~memaudit.masks.UnitMasks` over
    :attr:`space` (one unit per dropout channel)::

        with etd.attached() as masks:                      # hooks while open
            with masks.applied(etd.masks(ids)):            # a batch of examples, tied
                loss = loss_fn(model(x), y)
            with masks.applied(etd.mode_mask("drop")):     # memorization units off
                logits = model(x)

    :meth:`fold` writes a mode's scaling into the weights (a plain model, in place);
    :meth:`plain_copy` does it on a copy.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> etd = TiedDropout(net, after=["0"], p_gen=0.5, p_mem=0.5)
        >>> with etd.attached() as masks, masks.applied(etd.masks(torch.tensor([4, 5]))):
        ...     net(torch.ones(2, 3)).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        model: M,
        *,
        after: Sequence[str] | None = None,
        p_gen: float = 0.2,
        p_mem: float = 0.1,
        seed: int = 0,
        example: torch.Tensor | None = None,
    ) -> None:
        if not 0 < p_gen <= 1 or not 0 <= p_mem <= 1:
            raise MemauditError(
                f"example-tied dropout needs 0 < p_gen <= 1 and 0 <= p_mem <= 1, got "
                f"p_gen={p_gen}, p_mem={p_mem}"
            )
        names = list(default_layers(model) if after is None else after)
        if not names:
            raise MemauditError("no layers to put example-tied dropout after; pass after=[names]")
        self.model = model
        self.p_gen, self.p_mem, self.seed = p_gen, p_mem, seed
        self.space = UnitSpace.of(layer_outputs(model, names, example))
        self.seeds = [keyed.subseed(seed, k) for k in range(len(names))]
        self.folded: DropoutMode | None = None

    @property
    def names(self) -> list[str]:
        """The layers whose outputs are masked, in order."""
        return [layer.name for layer in self.space.layers]

    def n_gen(self, channels: int) -> int:
        """Number of generalization units (the first channels) of a layer of ``channels``."""
        return min(channels, max(1, round(self.p_gen * channels)))

    def masks(self, ids: torch.Tensor, *, tied: torch.Tensor | None = None) -> torch.Tensor:
        """Training masks ``[B, U]`` (1 = on) of the examples ``ids``; with ``tied`` (bool per
        example) only those are tied and the others see the drop-mode network."""
        threshold = min(int(self.p_mem * 2**32), 2**32)
        parts = []
        for layer, seed in zip(self.space.layers, self.seeds, strict=True):
            gen = self.n_gen(layer.size)
            mem = torch.arange(gen, layer.size, device=ids.device)
            keep = torch.ones(ids.shape[0], gen, dtype=torch.bool, device=ids.device)
            parts += [keep, keyed.draws(ids, mem, seed=seed) < threshold]
        out = torch.cat(parts, dim=1).float()
        if tied is not None:
            free = ~tied.to(ids.device)
            out[free] = self.scale("drop").to(ids.device)
        return out

    def scale(self, mode: DropoutMode) -> torch.Tensor:
        """Per-unit factor ``[U]`` of a mode: ``expectation`` (memorization units x ``p_mem``)
        or ``drop`` (memorization units 0, generalization units x ``(p_gen + p_mem) / p_gen``)."""
        check_mode(mode)
        parts = []
        for layer in self.space.layers:
            gen = self.n_gen(layer.size)
            part = torch.full((layer.size,), self.p_mem if mode != "drop" else 0.0)
            part[:gen] = (self.p_gen + self.p_mem) / self.p_gen if mode == "drop" else 1.0
            parts.append(part)
        return torch.cat(parts)

    def mode_mask(self, mode: DropoutMode) -> torch.Tensor:
        """The mask ``[1, U]`` of a mode, for a batch of any size."""
        return self.scale(mode)[None]

    def attached(self) -> UnitMasks:
        """The unit masks of the dropout layers (a context: hooks while open)."""
        if self.folded is not None:
            raise MemauditError(
                f"this example-tied dropout was folded into the weights ({self.folded} mode); "
                "the model is plain now"
            )
        return UnitMasks(net_of(self.model)[0], self.space)

    def fold(self, mode: DropoutMode, *, example: torch.Tensor | None = None) -> None:
        """Write ``mode``'s scaling into the weights, in place: the model then computes, with no
        dropout, what it computed with dropout in that mode. Into the preceding conv / linear /
        BatchNorm layer when dropout follows one; after a block or stage, into the layers that
        read the block's output, found and checked with one forward of ``example`` (default:
        random inputs of a :class:`~memaudit.models.Classifier`'s shape). All or nothing: on an
        error the weights are as they were."""
        check_mode(mode)
        fold_scale(self.model, self.space, self.scale(mode), example=example)
        self.folded = mode

    def plain_copy(self, mode: DropoutMode, *, example: torch.Tensor | None = None) -> M:
        """A copy of the model with ``mode``'s scaling folded into its weights."""
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        other.fold(mode, example=example)
        return other.model
