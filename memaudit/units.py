"""Units: the output channels of convolutions and output features of linear layers.

A unit is addressed by ``(layer, index)``. A :class:`UnitSpace` lays all units of a model out on
one flat axis, so a per-example mask is one row ``[U]`` and a batch of masks is ``[B, U]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from memaudit.errors import MemauditError
from memaudit.schema import Unit

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Layer:
    """A module whose outputs are units. ``dim`` is the unit axis of its output."""

    name: str
    size: int
    dim: int
    offset: int

    @property
    def kind(self) -> str:
        return "conv" if self.dim == 1 else "linear"


def _unit_axis(module: nn.Module) -> tuple[int, int] | None:
    """(number of units, axis of the output that holds them), or None for other modules."""
    if isinstance(module, _CONV):
        return module.out_channels, 1
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    return None


def _is_mha(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention)


def last_unit_layer(model: nn.Module) -> str | None:
    """Name of the last conv/linear module in registration order (the head of a plain model)."""
    names = [name for name, module in model.named_modules() if _unit_axis(module) is not None]
    return names[-1] if names else None


class UnitSpace:
    """All units of ``model`` (minus ``exclude``) on one flat axis, in network order.

    Example:
        >>> space = UnitSpace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
        >>> space.total, space.unit(3)
        (4, Unit(layer='0', index=3))
    """

    def __init__(self, model: nn.Module, *, exclude: Iterable[str] = ()) -> None:
        skip = set(exclude)
        # nn.MultiheadAttention applies its out_proj weights functionally: no hook would fire.
        skip.update(f"{name}.out_proj" for name, m in model.named_modules() if _is_mha(m))
        found = [
            (name, *axis)
            for name, module in model.named_modules()
            if (axis := _unit_axis(module)) is not None
            and name not in skip
            and not any(name.startswith(s + ".") for s in skip)
        ]
        if not found:
            raise MemauditError(
                "the model has no convolution or linear layers outside its head to audit; "
                "pass a model with Conv/Linear modules"
            )
        self._lay_out(found)

    @classmethod
    def of(cls, layers: Sequence[tuple[str, int, int]]) -> UnitSpace:
        """A space over given ``(module name, units, unit axis)`` outputs, in that order (e.g.
        the layers example-tied dropout masks, which need not be conv / linear layers)."""
        space = cls.__new__(cls)
        space._lay_out(list(layers))
        return space

    def _lay_out(self, found: Sequence[tuple[str, int, int]]) -> None:
        layers, offset = [], 0
        for name, size, dim in found:
            layers.append(Layer(name=name, size=size, dim=dim, offset=offset))
            offset += size
        self.layers: tuple[Layer, ...] = tuple(layers)
        self.total = offset
        self._index = {layer.name: i for i, layer in enumerate(layers)}
        self._starts = torch.tensor([layer.offset for layer in layers])

    def __len__(self) -> int:
        return self.total

    def layer(self, name: str) -> Layer:
        try:
            return self.layers[self._index[name]]
        except KeyError:
            raise MemauditError(f"no unit layer named {name!r}; see UnitSpace.layers") from None

    def layer_index(self, flat: torch.Tensor) -> torch.Tensor:
        """Position in :attr:`layers` of each flat unit index."""
        return torch.bucketize(flat.cpu(), self._starts, right=True) - 1

    def unit(self, flat: int) -> Unit:
        layer = self.layers[int(self.layer_index(torch.tensor([flat]))[0])]
        return Unit(layer.name, flat - layer.offset)

    def units(self, flat: Sequence[int] | torch.Tensor) -> list[Unit]:
        flat_t = torch.as_tensor(flat, dtype=torch.long).reshape(-1)
        which = self.layer_index(flat_t).tolist()
        return [
            Unit(self.layers[w].name, int(f) - self.layers[w].offset)
            for w, f in zip(which, flat_t.tolist(), strict=True)
        ]

    def flat(self, unit: Unit) -> int:
        layer = self.layer(unit.layer)
        if not 0 <= unit.index < layer.size:
            raise MemauditError(
                f"unit index {unit.index} is out of range for layer {unit.layer!r} "
                f"({layer.size} units)"
            )
        return layer.offset + unit.index

    def counts(self) -> dict[str, int]:
        """Units per layer, in network order."""
        return {layer.name: layer.size for layer in self.layers}


def _by_layer(space: UnitSpace, flat: Sequence[int]) -> Iterator[tuple[Layer, torch.Tensor]]:
    """The distinct units of ``flat`` grouped by layer: each layer and its units' indices."""
    if not len(flat):
        return
    wanted = torch.as_tensor(flat, dtype=torch.long).reshape(-1).unique()
    which = space.layer_index(wanted)
    for k in which.unique().tolist():
        layer = space.layers[k]
        yield layer, wanted[which == k] - layer.offset


def _unit_params(module: nn.Module) -> Iterator[torch.Tensor]:
    """The weight and (if any) bias of a conv / linear layer: output units on axis 0."""
    for name in ("weight", "bias"):
        param = getattr(module, name, None)
        if isinstance(param, torch.Tensor):
            yield param


@torch.no_grad()
def zero_unit_weights(model: nn.Module, space: UnitSpace, flat: Sequence[int]) -> None:
    """Zero the weights and bias of the given units in place (a permanent edit of ``model``),
    one indexed write per layer.

    Equivalent to a mask of 0 on those units for every example.
    """
    for layer, index in _by_layer(space, flat):
        for param in _unit_params(model.get_submodule(layer.name)):
            param[index.to(param.device)] = 0


@torch.no_grad()
def reset_unit_weights(
    model: nn.Module, space: UnitSpace, flat: Sequence[int], source: nn.Module
) -> None:
    """Set the weights and bias of the given units in place to those of the same units in
    ``source`` (e.g. a freshly initialized copy of the architecture): what
    :func:`zero_unit_weights` zeros, with ``source``'s values instead of zeros.

    One indexed copy per layer (output units on axis 0 of conv and linear weights).
    """
    for layer, index in _by_layer(space, flat):
        ours = _unit_params(model.get_submodule(layer.name))
        theirs = _unit_params(source.get_submodule(layer.name))
        for mine, fresh in zip(ours, theirs, strict=True):
            mine[index.to(mine.device)] = fresh[index.to(fresh.device)].to(mine.device, mine.dtype)
