"""The example-tied dropout layer: masks from a hash of (seed, example id, channel), bound to
the ids of the current batch; nothing is stored per example."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Literal, get_args

import torch
from torch import nn

from memaudit.errors import MemauditError
from memaudit.units import last_unit_layer

DropoutMode = Literal["train", "expectation", "drop"]
MODES: tuple[str, ...] = get_args(DropoutMode)
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (lowbias32) on int64 tensors; bijective on [0, 2^32)."""
    h = h & _M32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32  # int64 products may wrap; their low 32 bits stay exact
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def _key(seed: int) -> int:
    return int(_mix32(torch.tensor([seed & _M32])) ^ _mix32(torch.tensor([seed >> 32]) + _GOLDEN))


def tied_draws(ids: torch.Tensor, units: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Uniform 32-bit draws ``[B, M]`` keyed on ``(seed, id, unit)``: a pure function of its keys.

    Example:
        >>> a = tied_draws(torch.tensor([7, 8]), torch.arange(4), seed=0)
        >>> torch.equal(a, tied_draws(torch.tensor([7, 8]), torch.arange(4), seed=0))
        True
    """
    ids = ids.to(torch.int64)
    h_id = _mix32(_mix32(ids ^ _key(seed)) + ((ids >> 32) & _M32) * _GOLDEN)
    h_unit = _mix32(units.to(device=ids.device, dtype=torch.int64) * _GOLDEN + 0x632BE5AB)
    return _mix32(h_id[:, None] ^ h_unit[None, :])


def _check_rates(p_gen: float, p_mem: float) -> None:
    if not 0 < p_gen <= 1 or not 0 <= p_mem <= 1:
        raise MemauditError(
            f"example-tied dropout needs 0 < p_gen <= 1 and 0 <= p_mem <= 1, got p_gen={p_gen}, "
            f"p_mem={p_mem}"
        )


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise MemauditError(f"unknown example-tied dropout mode {mode!r}; use one of {MODES}")


class ExampleTiedDropout(nn.Module):
    """Example-tied dropout over whole channels (axis ``dim``: 1 for conv maps, -1 for tokens,
    ``None``: by the input's rank).

    Modes: ``train`` (example-tied masks while ``training``, expectation in eval, as
    ``nn.Dropout`` does), ``expectation`` (memorization units × ``p_mem``) and ``drop``
    (memorization units 0, generalization units × ``(p_gen + p_mem) / p_gen``). It holds no
    parameters or buffers: its masks are a function of ``seed`` and the bound example ids.

    Example:
        >>> etd = ExampleTiedDropout(p_gen=0.5, p_mem=0.5, seed=1)
        >>> etd.ids = torch.tensor([3, 4])
        >>> etd(torch.ones(2, 4, 2, 2)).shape
        torch.Size([2, 4, 2, 2])
    """

    def __init__(
        self,
        *,
        p_gen: float = 0.2,
        p_mem: float = 0.1,
        seed: int = 0,
        dim: int | None = 1,
        mode: DropoutMode = "train",
    ) -> None:
        super().__init__()
        _check_rates(p_gen, p_mem)
        _check_mode(mode)
        self.p_gen, self.p_mem, self.seed, self.dim = p_gen, p_mem, seed, dim
        self.mode: DropoutMode = mode
        self.ids: torch.Tensor | None = None  # the current batch's example ids (bind_ids)
        self.tied: torch.Tensor | None = None  # which of them are tied (bind_ids); None: all

    def extra_repr(self) -> str:
        return f"p_gen={self.p_gen}, p_mem={self.p_mem}, seed={self.seed}, mode={self.mode}"

    def channel_dim(self, x: torch.Tensor) -> int:
        """The channel axis of ``x``: ``dim``, or by rank when ``dim`` is None (4-D/5-D: 1)."""
        if self.dim is not None:
            return self.dim
        return 1 if x.ndim in (4, 5) else -1

    def n_gen(self, channels: int) -> int:
        """Number of generalization units (the first channels) of a layer of ``channels``."""
        return min(channels, max(1, round(self.p_gen * channels)))

    def masks(self, ids: torch.Tensor, channels: int) -> torch.Tensor:
        """Train-mode masks ``[B, channels]`` (1 = on) of the examples ``ids``."""
        gen = self.n_gen(channels)
        mem = torch.arange(gen, channels, device=ids.device)
        threshold = min(int(self.p_mem * 2**32), 2**32)
        on = tied_draws(ids, mem, seed=self.seed) < threshold
        keep = torch.ones(ids.shape[0], gen, dtype=torch.bool, device=ids.device)
        return torch.cat([keep, on], dim=1).float()

    def scale(self, channels: int, mode: DropoutMode | None = None) -> torch.Tensor:
        """Per-channel factor ``[channels]`` of the expectation or drop mode."""
        mode = mode or self.mode
        gen = self.n_gen(channels)
        out = torch.full((channels,), self.p_mem if mode != "drop" else 0.0)
        out[:gen] = (self.p_gen + self.p_mem) / self.p_gen if mode == "drop" else 1.0
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim(x)
        channels = x.shape[dim]
        shape = [1] * x.ndim
        shape[dim] = channels
        if self.mode != "train" or not self.training:
            return x * self.scale(channels).to(x.device, x.dtype).reshape(shape)
        if self.ids is None:
            raise MemauditError(
                "example-tied dropout in training needs the batch's example ids: run the forward "
                "inside `with bind_ids(model, ids):` (or pass on_batch=binding.set to train)"
            )
        if self.ids.shape[0] != x.shape[0]:
            raise MemauditError(
                f"{self.ids.shape[0]} example ids are bound but the batch has {x.shape[0]} "
                "examples; bind one id per example"
            )
        shape[0] = x.shape[0]
        masks = self.masks(self.ids.to(x.device), channels)
        if self.tied is not None:  # untied examples see the drop-mode network
            free = ~self.tied.to(x.device)
            masks[free] = self.scale(channels, "drop").to(x.device)
        return x * masks.to(x.dtype).reshape(shape)


class WithDropout(nn.Module):
    """``inner`` followed by example-tied dropout (what :func:`insert_dropout` puts in place)."""

    def __init__(self, inner: nn.Module, dropout: ExampleTiedDropout) -> None:
        super().__init__()
        self.inner = inner
        self.dropout = dropout

    def __getattr__(self, name: str) -> Any:
        """Attributes of ``inner`` (models read e.g. ``projection.weight.dtype``) show through."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__["_modules"].get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        out = self.inner(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise MemauditError(
                f"example-tied dropout follows a {type(self.inner).__name__} that returns "
                f"{type(out).__name__}; insert it after layers that return a tensor"
            )
        return self.dropout(out)


def _net(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The module to edit and the name of its head (a Classifier's ``net`` and ``info.head``)."""
    net = getattr(model, "net", None)
    info = getattr(model, "info", None)
    if isinstance(net, nn.Module) and info is not None:
        return net, getattr(info, "head", None)
    return model, last_unit_layer(model)


def _layer_seed(seed: int, layer: int) -> int:
    return int(_mix32(torch.tensor([_key(seed) ^ int(_mix32(torch.tensor([layer + 1])))])))


def dropout_layers(model: nn.Module) -> dict[str, ExampleTiedDropout]:
    """The example-tied dropout layers of ``model``, by the name of the module they follow."""
    net, _ = _net(model)
    return {
        name: module.dropout
        for name, module in net.named_modules()
        if isinstance(module, WithDropout)
    }


def set_mode(model: nn.Module, mode: DropoutMode) -> None:
    """Switch every example-tied dropout layer of ``model`` to ``mode``."""
    _check_mode(mode)
    for etd in dropout_layers(model).values():
        etd.mode = mode


class bind_ids:  # lower case: used like a function, `with bind_ids(model, ids):`
    """Bind the example ids of the current batch to the model's example-tied dropout layers.

    Use it around a forward, or keep it open over a training loop and pass ``binding.set`` as
    ``on_batch`` (it receives each batch's ids before the forward). The previous binding comes
    back on exit, so bindings nest. ``tied`` (bool per example, default all) marks the examples
    that get example-tied masks; the others see the drop-mode network (generalization units only).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4))
        >>> _ = insert_dropout(net, after=["0"])
        >>> with bind_ids(net, torch.tensor([0, 1])):
        ...     net.train()(torch.ones(2, 3)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        ids: torch.Tensor | None = None,
        *,
        tied: torch.Tensor | None = None,
    ) -> None:
        self._layers = list(dropout_layers(model).values())
        self._ids, self._tied = ids, tied
        self._saved: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []

    def set(self, ids: torch.Tensor, *, tied: torch.Tensor | None = None) -> None:
        """Bind ``ids`` (one per example of the next batch) and which of them are tied."""
        for etd in self._layers:
            etd.ids, etd.tied = ids, tied

    def __enter__(self) -> bind_ids:
        self._saved = [(etd.ids, etd.tied) for etd in self._layers]
        if self._ids is not None:
            self.set(self._ids, tied=self._tied)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for etd, (ids, tied) in zip(self._layers, self._saved, strict=True):
            etd.ids, etd.tied = ids, tied
