"""Per-example unit masks, and forward tracing: the only module in memaudit that registers
forward hooks, each in a scoped context that removes them on exit and on error."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from memaudit.units import Layer, UnitSpace


class UnitMasks:
    """Multiply each unit's output by a per-example mask while the context is open.

    A mask applies only inside ``with masks.applied(mask):``, and the previous one (none, or an
    outer ``applied``) is back on exit, also when the body raises. ``mask`` is ``[B, U]`` (one
    row per example of the batch, or one row for every example; one column per unit of
    ``space``), broadcast over spatial positions or tokens; outside ``applied`` the model runs
    unchanged. Copies of the model (``copy.deepcopy``) carry the hooks but are never masked.
    Give the mask ``requires_grad=True`` to read ``d loss / d mask`` (gradient x activation)
    after backward. Every hook this context registers is removed on exit, also when the body raises.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> space = UnitSpace(net, exclude=["2"])
        >>> with UnitMasks(net, space) as masks, masks.applied(torch.ones(5, space.total)):
        ...     logits = net(torch.randn(5, 3))
        >>> logits.shape
        torch.Size([5, 2])
    """

    def __init__(self, model: nn.Module, space: UnitSpace) -> None:
        self.model = model
        self.space = space
        self._mask: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []

    @property
    def mask(self) -> torch.Tensor | None:
        """The mask in force (``None`` outside :meth:`applied`)."""
        return self._mask

    @contextmanager
    def applied(self, mask: torch.Tensor) -> Iterator[torch.Tensor]:
        """Apply ``mask`` ``[B, U]`` to the forward passes run inside the block."""
        previous, self._mask = self._mask, mask
        try:
            yield mask
        finally:
            self._mask = previous

    def __enter__(self) -> UnitMasks:
        try:
            for layer in self.space.layers:
                module = self.model.get_submodule(layer.name)
                self._handles.append(module.register_forward_hook(self._hook(layer, module)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(
        self, layer: Layer, target: nn.Module
    ) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor | None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            if self._mask is None or module is not target:  # not in force, or a copy's hook
                return None
            rows = self._mask[:, layer.offset : layer.offset + layer.size]
            if rows.shape[0] not in (1, output.shape[0]):
                raise ValueError(
                    f"mask has {rows.shape[0]} rows but layer {layer.name!r} saw a batch of "
                    f"{output.shape[0]}; give one mask row per example"
                )
            shape = [rows.shape[0]] + [1] * (output.ndim - 1)
            shape[layer.dim] = layer.size
            return output * rows.reshape(shape).to(output.device, output.dtype)

        return hook


@dataclass(frozen=True)
class Call:
    """One forward call of a traced module: its name, the module, its first input, its output."""

    name: str
    module: nn.Module
    input: torch.Tensor
    output: torch.Tensor


@contextmanager
def traced(modules: Sequence[tuple[str, nn.Module]]) -> Iterator[list[Call]]:
    """Record the tensor calls of ``modules`` (name, module) made inside the block, in order.

    The recorded tensors stay alive with the list, so their storage can be compared
    (``data_ptr``) to follow which module reads which output.
    """
    calls: list[Call] = []

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                calls.append(Call(name, module, inputs[0], output))

        return hook

    handles: list[RemovableHandle] = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(record(name)))
        yield calls
    finally:
        for handle in handles:
            handle.remove()
