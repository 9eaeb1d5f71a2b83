"""Where example-tied dropout goes: after stage outputs (the paper), or after every conv layer;
and the size and channel axis of each of those outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from memaudit.errors import MemauditError
from memaudit.masks import traced
from memaudit.units import last_unit_layer

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def net_of(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The module to mask and the name of its head (a Classifier's ``net`` and ``info.head``)."""
    net = getattr(model, "net", None)
    info = getattr(model, "info", None)
    if isinstance(net, nn.Module) and info is not None:
        return net, getattr(info, "head", None)
    return model, last_unit_layer(model)


def stage_outputs(model: nn.Module) -> list[str]:
    """The stage / block outputs a model names in ``feature_info`` (timm's convention), or []."""
    net, _ = net_of(model)
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
    net, head = net_of(model)
    names: list[str] = []
    for parent_name, parent in net.named_modules():
        children = list(parent.named_children())
        for k, (child_name, child) in enumerate(children):
            if not isinstance(child, (*CONV, nn.Linear)):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if head is not None and (name == head or name.startswith(head + ".")):
                continue
            after = children[k + 1] if k + 1 < len(children) else None
            size = child.out_channels if isinstance(child, CONV) else child.out_features
            if after is not None and type(after[1]) in BATCHNORM and after[1].num_features == size:
                name = f"{parent_name}.{after[0]}" if parent_name else after[0]
            names.append(name)
    return names


def mlp_hidden_layers(model: nn.Module) -> list[str]:
    """The hidden features of each MLP (after its activation), outside the head: where
    example-tied dropout goes in transformers and LayerNorm CNNs (ViT, DeiT, ConvNeXt).

    A channel there belongs to one example across all its tokens (the mask is shared by every
    token), and the next linear layer reads it directly, so the drop-mode scaling folds into
    that layer's input columns. Dropping features of the attention projections or of the
    residual stream (every linear layer, as :func:`conv_layers` does) breaks the attention and
    the shortcuts. Found by name: the activation module of an MLP (``...mlp.act`` in timm,
    ``...mlp.activation_fn`` / ``...intermediate_act_fn`` / ``...act`` in Hugging Face).
    """
    net, head = net_of(model)
    found = []
    for name, module in net.named_modules():
        last = name.rpartition(".")[2]
        if list(module.children()) or "act" not in last.lower():
            continue
        if head is not None and (name == head or name.startswith(head + ".")):
            continue
        if isinstance(module, nn.Identity):
            continue
        found.append(name)
    return found


def _known_axis(module: nn.Module) -> tuple[int, int] | None:
    """(channels, channel axis) of a conv / linear / norm layer's output; None for a block."""
    if isinstance(module, CONV):
        return module.out_channels, 1
    if isinstance(module, BATCHNORM):
        return int(module.num_features), 1
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1]), -1
    return None


def layer_outputs(
    model: nn.Module, names: Sequence[str], example: torch.Tensor | None = None
) -> list[tuple[str, int, int]]:
    """``(name, channels, channel axis)`` of each output of ``names``: from the layer's type,
    or (after a block) from one traced forward of ``example``: the axis of the conv / linear
    layer whose output the block reads, if one does (an MLP's activation after its linear
    layer: the last axis, also in a channels-last ConvNeXt block); else axis 1 for 4-D and 5-D
    maps, the last axis for features and tokens."""
    net, _ = net_of(model)
    modules = []
    for name in names:
        try:
            modules.append((name, net.get_submodule(name)))
        except AttributeError:
            raise MemauditError(
                f"no module named {name!r} to put example-tied dropout after; see "
                "model.named_modules()"
            ) from None
    known = {name: _known_axis(module) for name, module in modules}
    blocks = [(n, m) for n, m in modules if known[n] is None]
    if blocks:
        x = example_input(model) if example is None else example
        layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (*CONV, nn.Linear))]
        with torch.no_grad(), traced([*blocks, *layers]) as calls:
            was_training = model.training
            model.eval()(x)
            model.train(was_training)
        axis_of = {  # the channel axis of each conv / linear output, by its storage
            c.output.data_ptr(): 1 if isinstance(c.module, CONV) else -1
            for c in calls
            if isinstance(c.module, (*CONV, nn.Linear))
        }
        for call in calls:  # the first call of a module that is called twice
            if call.name not in known or known[call.name] is not None:
                continue
            default = 1 if call.output.ndim in (4, 5) else -1
            dim = axis_of.get(call.input.data_ptr(), default)
            known[call.name] = (int(call.output.shape[dim]), dim)
    missing = [n for n, axis in known.items() if axis is None]
    if missing:
        raise MemauditError(f"layer {missing[0]!r} is not called in the model's forward")
    return [(name, *known[name]) for name, _ in modules]  # type: ignore[misc]


def example_input(model: nn.Module) -> torch.Tensor:
    """Random inputs shaped for a Classifier (its channels and image size; 32 px if unknown)."""
    info = getattr(model, "info", None)
    if info is None:
        raise MemauditError(
            "example-tied dropout after a block needs an example input; pass example="
        )
    size = info.preprocess.image_size if info.preprocess and info.preprocess.image_size else 32
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, info.in_chans or 3, size, size, generator=gen).to(device)
