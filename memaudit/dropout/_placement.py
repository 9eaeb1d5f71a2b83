"""Where example-tied dropout goes: after stage outputs (the paper), or after every conv layer."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from memaudit.dropout._fold import remove_dropout
from memaudit.dropout._layer import (
    _BATCHNORM,
    _CONV,
    ExampleTiedDropout,
    WithDropout,
    _check_rates,
    _layer_seed,
    _net,
)
from memaudit.errors import MemauditError


def default_layers(model: nn.Module) -> list[str]:
    """Where dropout goes by default: after each stage / block output, as in the paper.

    Stages are the modules a model lists in ``feature_info`` (timm models, memaudit's nets).
    They are used when their drop-mode scaling folds into a plain model (checked on a copy);
    otherwise (e.g. a stage output that also feeds an identity shortcut), and for models without
    ``feature_info``, dropout goes after every conv / linear layer (:func:`conv_layers`).
    On the label-noise testbed, stage outputs with the drop-mode model's BatchNorm recalibrated
    (:func:`recalibrate_norms`) beat the normally trained model's test accuracy (README).
    """
    stages = stage_outputs(model)
    return stages if stages and _folds(model, stages) else conv_layers(model)


def _folds(model: nn.Module, names: list[str]) -> bool:
    trial = copy.deepcopy(model)
    insert_dropout(trial, after=names)
    try:
        remove_dropout(trial, fold="drop")
    except (MemauditError, RuntimeError, ValueError):  # e.g. the traced input has a wrong shape
        return False
    return True


def stage_outputs(model: nn.Module) -> list[str]:
    """The stage / block outputs a model names in ``feature_info`` (timm's convention), or []."""
    net, _ = _net(model)
    try:
        return [str(info["module"]) for info in getattr(net, "feature_info", None) or []]
    except (KeyError, TypeError):
        return []


def conv_layers(model: nn.Module) -> list[str]:
    """After every conv / linear layer outside the head (all foldable into the layer itself).

    A conv directly followed by its ``BatchNorm`` (the next sibling, same channels) gets the
    dropout after the norm, so that dropped channels are exactly 0 and the drop-mode scaling acts
    on what the next layer sums.
    """
    net, head = _net(model)
    names: list[str] = []
    for parent_name, parent in net.named_modules():
        children = list(parent.named_children())
        for k, (child_name, child) in enumerate(children):
            if not isinstance(child, (*_CONV, nn.Linear)):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if head is not None and (name == head or name.startswith(head + ".")):
                continue
            after = children[k + 1] if k + 1 < len(children) else None
            size = child.out_channels if isinstance(child, _CONV) else child.out_features
            if after is not None and type(after[1]) in _BATCHNORM and after[1].num_features == size:
                name = f"{parent_name}.{after[0]}" if parent_name else after[0]
            names.append(name)
    return names


def _channel_dim(module: nn.Module) -> int | None:
    """The channel axis after ``module``: 1 for conv maps, -1 for features / tokens, ``None``
    (decided per input: 1 for 4-D and 5-D maps, else -1) after a block."""
    if isinstance(module, (nn.Linear, nn.LayerNorm)):
        return -1
    if isinstance(module, (*_CONV, *_BATCHNORM)):
        return 1
    return None


def insert_dropout(
    model: nn.Module,
    *,
    after: Sequence[str] | None = None,
    p_gen: float = 0.2,
    p_mem: float = 0.1,
    seed: int = 0,
) -> list[str]:
    """Put example-tied dropout after the layers ``after`` of ``model`` (in place); their names.

    ``after`` names modules of the model (of ``net`` for a :class:`~memaudit.models.Classifier`);
    default: :func:`default_layers`. Each layer draws from its own stream of ``seed``. While the
    layers are in, state-dict keys of the wrapped modules gain an ``inner.`` step; remove them
    with :func:`remove_dropout` before saving.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> insert_dropout(net)
        ['0']
    """
    _check_rates(p_gen, p_mem)
    net, _ = _net(model)
    if any(isinstance(m, WithDropout) for m in net.modules()):
        raise MemauditError("the model already has example-tied dropout; remove_dropout first")
    names = list(default_layers(model) if after is None else after)
    if not names:
        raise MemauditError("no layers to put example-tied dropout after; pass after=[names]")
    for k, name in enumerate(names):
        try:
            target = net.get_submodule(name)
        except AttributeError:
            raise MemauditError(
                f"no module named {name!r} to put example-tied dropout after; see "
                "model.named_modules()"
            ) from None
        parent_name, _, child = name.rpartition(".")
        etd = ExampleTiedDropout(
            p_gen=p_gen, p_mem=p_mem, seed=_layer_seed(seed, k), dim=_channel_dim(target)
        )
        setattr(net.get_submodule(parent_name), child, WithDropout(target, etd))
    return names
