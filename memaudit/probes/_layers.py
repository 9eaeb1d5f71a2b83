"""Layer groups, per-epoch checkpoints and the helpers every layer probe shares."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memaudit.data import ImageDataset
from memaudit.errors import MemauditError
from memaudit.models import Classifier, read_weights
from memaudit.schema import Grouping

_UNIT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
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
    payload, _ = read_weights(Path(path), trust_pickle=False)
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


def _checkpoint_list(checkpoints: str | Path | Sequence[Checkpoint]) -> list[Checkpoint]:
    if isinstance(checkpoints, (str, Path)):
        return find_checkpoints(checkpoints)
    if not checkpoints:
        raise MemauditError("no checkpoints given; pass a folder of epoch_NNN.safetensors")
    return list(checkpoints)


@dataclass(frozen=True)
class ProbeStep:
    """Progress of a probe: ``done`` of ``total`` steps, the last one described by ``label``."""

    done: int
    total: int
    label: str


ProgressHook = Callable[[ProbeStep], None]


def _num(value: torch.Tensor | float) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number


def _source(model: nn.Module) -> str:
    return model.info.source if isinstance(model, Classifier) else type(model).__name__


def _data_name(data: ImageDataset) -> str:
    return f"{data.ref.source}:{data.ref.split}"


def _rows(data: ImageDataset, rows: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    return torch.arange(len(data)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
