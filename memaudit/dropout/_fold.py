"""Folding example-tied dropout into the weights (a plain model that computes what the model
with dropout computed in one mode), and recalibrating BatchNorm after the drop."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from memaudit.dropout._placement import BATCHNORM, CONV, example_input, net_of
from memaudit.errors import MemauditError
from memaudit.masks import UnitMasks, traced
from memaudit.units import Layer, UnitSpace


@torch.no_grad()
def fold_scale(
    model: nn.Module, space: UnitSpace, scale: torch.Tensor, *, example: torch.Tensor | None
) -> None:
    """Multiply the outputs of ``space``'s layers by ``scale`` ``[U]`` in the weights, in place
    (see :meth:`TiedDropout.fold <memaudit.dropout.TiedDropout.fold>`)."""
    net, _ = net_of(model)
    remaining = scale.clone()  # the mask still to apply: 1 where folded
    backup = {k: v.clone() for k, v in net.state_dict().items()}
    was_training = model.training
    model.eval()
    try:
        for layer in space.layers:
            part = slice(layer.offset, layer.offset + layer.size)
            module = net.get_submodule(layer.name)
            if _out_channels(module) is not None:
                _fold_outputs(module, scale[part])
            else:
                x = example_input(model) if example is None else example
                _fold_into_readers(model, space, layer, remaining, x)
            remaining[part] = 1.0
    except BaseException:
        net.load_state_dict(backup)
        raise
    finally:
        model.train(was_training)


def _fold_outputs(module: nn.Module, scale: torch.Tensor) -> None:
    """Multiply the output channels of a conv / linear / affine batch-norm layer by ``scale``."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]  # see _out_channels
    weight.mul_(scale.to(weight).reshape([-1] + [1] * (weight.ndim - 1)))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.mul_(scale.to(bias))


def _unfoldable(name: str) -> MemauditError:
    return MemauditError(
        f"cannot fold the example-tied dropout after {name!r} into the model's weights: neither "
        "that layer nor the layers reading its output are conv / linear / BatchNorm layers it "
        "can be folded into; put it elsewhere (see conv_layers) to export a plain model"
    )


# Layers whose output scales with a non-negative per-channel factor on their input.
_SCALE_COMMUTING = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
)


def _fold_into_readers(
    model: nn.Module, space: UnitSpace, layer: Layer, remaining: torch.Tensor, example: torch.Tensor
) -> None:
    """Fold the scaling after ``layer`` into the input channels of the layers reading it.

    One traced forward of ``example`` finds the leaf modules reading the masked output, through
    layers that commute with the scaling (ReLU, pooling, flatten). The folded model is then
    checked against the model with dropout on ``example``; any reader the trace cannot see (a
    residual sum, a functional op) makes the check fail.
    """
    net, _ = net_of(model)
    module = net.get_submodule(layer.name)
    leaves = [(n, m) for n, m in net.named_modules() if not list(m.children())]
    with UnitMasks(net, space) as masks, masks.applied(remaining[None]):
        with traced([*leaves, (layer.name, module)]) as calls:  # after the masks: sees them
            expected = model(example)
        seen = [(c.name, c.module, c.input, c.output) for c in calls]
    frontier = [out for name, _, _, out in seen if name == layer.name]
    if not frontier:
        raise _unfoldable(layer.name)
    scale = remaining[layer.offset : layer.offset + layer.size]
    done: set[int] = set()
    ok = True
    while frontier and ok:
        out = frontier.pop()
        for name, reader, inp, res in seen:
            if name == layer.name or inp.data_ptr() != out.data_ptr() or id(reader) in done:
                continue
            done.add(id(reader))
            if isinstance(reader, _SCALE_COMMUTING):
                frontier.append(res)
            elif isinstance(reader, (*CONV, nn.Linear)) and getattr(reader, "groups", 1) == 1:
                _fold_inputs(reader, scale)
            else:
                ok = False
                break
    rest = remaining.clone()
    rest[layer.offset : layer.offset + layer.size] = 1.0
    with UnitMasks(net, space) as masks, masks.applied(rest[None]):
        folded = model(example)
    if not ok or not torch.allclose(folded, expected, rtol=1e-4, atol=1e-5):
        raise _unfoldable(layer.name)


def _fold_inputs(module: nn.Module, scale: torch.Tensor) -> None:
    """Multiply the input channels of a conv / linear layer by ``scale`` (repeated for a linear
    layer that reads a flattened map)."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]  # conv / linear
    factor = scale.to(weight).repeat_interleave(weight.shape[1] // len(scale))
    weight.mul_(factor.reshape([1, -1] + [1] * (weight.ndim - 2)))


def _out_channels(module: nn.Module) -> int | None:
    """Output channels of a layer the scaling folds into (conv / linear / affine BatchNorm)."""
    if isinstance(module, (*CONV, nn.Linear)):
        return int(module.out_channels if isinstance(module, CONV) else module.out_features)
    if type(module) in BATCHNORM and getattr(module, "affine", False):
        return int(module.num_features)  # type: ignore[arg-type]
    return None


@torch.no_grad()
def recalibrate_norms(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute the running statistics of every BatchNorm layer from ``batches`` of inputs.

    Dropping the memorization units changes the statistics the next layers see, while their
    BatchNorm layers still normalize with those of training (all units on). One pass over the
    training images (no labels, no gradients: nothing is learned) fixes that. On the testbed
    (width 32) it took drop-mode test accuracy from 94.1% to 98.1%, noisy-train from 2.5% to
    1.25%. Returns the number of layers recalibrated; the model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, BATCHNORM) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all batches
        norm.train()
    try:
        for x in batches:
            model(x)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.eval()
    return len(norms)
