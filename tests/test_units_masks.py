"""Units (addresses, head exclusion) and per-example masks (the mechanism everything uses)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_cnn
from torch import nn

from memaudit.errors import MemauditError
from memaudit.masks import UnitMasks
from memaudit.models import Classifier, load_model
from memaudit.units import Unit, UnitSpace, zero_unit_weights

Builder = Callable[[dict[str, Path]], tuple[Classifier, torch.Tensor]]


def _unmute(model: Classifier) -> Classifier:
    """Fresh timm/HF nets mute residual branches (zero-init last BN, ConvNeXt layer scale 1e-6);
    unmute them so that every unit's effect on the logits is measurable."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gamma", "layer_scale_parameter")) or (
                name.endswith(".weight") and param.ndim == 1 and not param.any()
            ):
                param.fill_(1.0)
    return model


# Each builder returns a tiny classifier and a batch of 3 inputs it takes.
MODELS: dict[str, Builder] = {
    "plain": lambda dirs: (load_model(tiny_cnn()), torch.randn(3, 1, 8, 8)),
    "timm_resnet": lambda dirs: (
        _unmute(load_model("timm:test_resnet", num_classes=3, in_chans=1)),
        torch.randn(3, 1, 16, 16),
    ),
    "timm_convnext": lambda dirs: (
        _unmute(load_model("timm:test_convnext", num_classes=3, in_chans=1)),
        torch.randn(3, 1, 32, 32),
    ),
    "timm_vit": lambda dirs: (
        load_model("timm:test_vit", num_classes=3, in_chans=1),
        torch.randn(3, 1, 16, 16),
    ),
    "hf_vit": lambda dirs: (load_model(dirs["vit"]), torch.randn(3, 3, 16, 16)),
    "hf_resnet": lambda dirs: (load_model(dirs["resnet"]), torch.randn(3, 3, 16, 16)),
    "hf_convnext": lambda dirs: (
        _unmute(load_model(dirs["convnext"])),
        torch.randn(3, 3, 16, 16),
    ),
}

# Layers each family must expose as units, and its head (excluded by default).
EXPECTED: dict[str, tuple[set[str], str]] = {
    "plain": ({"0", "2", "6"}, "8"),
    "timm_resnet": ({"conv1.0", "layer1.0.conv1", "layer2.0.downsample.1"}, "fc"),
    "timm_convnext": (
        {"stem.0", "stages.0.blocks.0.conv_dw", "stages.0.blocks.0.mlp.fc1"},
        "head.fc",
    ),
    "timm_vit": ({"patch_embed.proj", "blocks.0.attn.qkv", "blocks.1.mlp.fc2"}, "head"),
    "hf_vit": (
        {"vit.embeddings.patch_embeddings.projection", "vit.layers.0.mlp.fc1"},
        "classifier",
    ),
    "hf_resnet": (
        {
            "resnet.embedder.embedder.convolution",
            "resnet.encoder.stages.1.layers.0.shortcut.convolution",
        },
        "classifier.1",
    ),
    "hf_convnext": (
        {"convnext.embeddings.patch_embeddings", "convnext.encoder.stages.0.layers.0.pwconv1"},
        "classifier",
    ),
}


@pytest.fixture(params=list(MODELS))
def model_and_input(
    request: pytest.FixtureRequest, hf_dirs: dict[str, Path]
) -> tuple[str, Classifier, torch.Tensor]:
    model, x = MODELS[request.param](hf_dirs)
    return request.param, model, x


def _hooks(model: nn.Module) -> dict[str, int]:
    return {
        name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.named_modules()
    }


def _probe_units(space: UnitSpace) -> list[int]:
    """Units in the first, a quarter-way, middle, three-quarter-way and last unit layer."""
    layers = space.layers
    picks = [layers[round(f * (len(layers) - 1))] for f in (0, 0.25, 0.5, 0.75, 1)]
    return [layer.offset + layer.size // 2 for layer in picks]


# --- units -------------------------------------------------------------------------------------


def test_units_enumerate_every_family(
    model_and_input: tuple[str, Classifier, torch.Tensor],
) -> None:
    name, model, _ = model_and_input
    must_have, head = EXPECTED[name]
    space = model.units()
    names = [layer.name for layer in space.layers]
    assert must_have <= set(names)
    assert head not in names and not any(n.startswith(f"{head}.") for n in names)
    assert head in [layer.name for layer in model.units(include_head=True).layers]
    for layer in space.layers:
        module = model.net.get_submodule(layer.name)
        assert isinstance(module, (nn.Conv2d, nn.Linear))
        assert layer.size == getattr(module, "out_channels", getattr(module, "out_features", 0))
    assert sum(space.counts().values()) == space.total == len(space)


def test_unit_addresses_are_stable(hf_dirs: dict[str, Path]) -> None:
    for name, build in MODELS.items():
        first, second = (build(hf_dirs)[0].units() for _ in range(2))
        assert [(x.name, x.size, x.offset) for x in first.layers] == [
            (x.name, x.size, x.offset) for x in second.layers
        ], name


def test_flat_and_unit_round_trip() -> None:
    space = load_model(tiny_cnn()).units()
    assert space.counts() == {"0": 4, "2": 6, "6": 5}
    flat = torch.arange(space.total)
    units = space.units(flat)
    assert units[0] == Unit("0", 0) and units[4] == Unit("2", 0) and units[-1] == Unit("6", 4)
    assert [space.flat(u) for u in units] == flat.tolist()
    assert space.unit(9) == Unit("2", 5)
    assert space.layer_index(torch.tensor([0, 3, 4, 14])).tolist() == [0, 0, 1, 2]


def test_unit_errors_are_clear() -> None:
    space = load_model(tiny_cnn()).units()
    with pytest.raises(MemauditError, match="out of range"):
        space.flat(Unit("0", 4))
    with pytest.raises(MemauditError, match="no unit layer"):
        space.flat(Unit("nope", 0))
    with pytest.raises(MemauditError, match="no convolution or linear layers"):
        UnitSpace(nn.Sequential(nn.ReLU()))


def test_multihead_attention_projection_is_not_a_unit() -> None:
    # nn.MultiheadAttention computes out_proj functionally: a hook on it would never fire.
    net = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2, batch_first=True))
    assert [layer.name for layer in UnitSpace(net).layers] == ["0"]


# --- masks ---------------------------------------------------------------------------------------


def test_ones_mask_leaves_outputs_unchanged(
    model_and_input: tuple[str, Classifier, torch.Tensor],
) -> None:
    _, model, x = model_and_input
    space = model.units()
    with torch.no_grad():
        ref = model(x)
        with UnitMasks(model.net, space) as masks:
            assert torch.equal(model(x), ref)  # no mask set: hooks pass outputs through
            with masks.applied(torch.ones(x.shape[0], space.total)):
                out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_zeroing_a_unit_is_per_example_and_equals_zeroing_weights(
    model_and_input: tuple[str, Classifier, torch.Tensor],
) -> None:
    name, model, x = model_and_input
    space = model.units()
    changed = []
    with torch.no_grad():
        ref = model(x)
        for unit in _probe_units(space):
            mask = torch.ones(x.shape[0], space.total)
            mask[1, unit] = 0
            with UnitMasks(model.net, space) as masks, masks.applied(mask):
                out = model(x)
            edited = copy.deepcopy(model)
            zero_unit_weights(edited.net, space, [unit])
            zeroed = edited(x)

            where = f"{name}: {space.unit(unit)}"
            torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], rtol=0, atol=1e-6, msg=where)
            torch.testing.assert_close(out[1], zeroed[1], rtol=1e-4, atol=1e-5, msg=where)
            changed.append(float((out[1] - ref[1]).abs().max()))
    # A unit can be dead after a ReLU; the mechanism must still move example 1 for most.
    assert sum(c > 1e-4 for c in changed) >= 3, (name, changed)


def test_batched_masks_equal_one_example_at_a_time(
    model_and_input: tuple[str, Classifier, torch.Tensor],
) -> None:
    _, model, x = model_and_input
    space = model.units()
    mask = (torch.rand(x.shape[0], space.total) > 0.1).float()
    with torch.no_grad(), UnitMasks(model.net, space) as masks:
        with masks.applied(mask):
            batched = model(x)
        single = []
        for i in range(x.shape[0]):
            with masks.applied(mask[i : i + 1]):
                single.append(model(x[i : i + 1]))
    torch.testing.assert_close(batched, torch.cat(single), rtol=1e-4, atol=1e-5)


def test_mask_gradient_is_gradient_times_activation() -> None:
    torch.manual_seed(1)
    net = tiny_cnn()
    space = UnitSpace(net, exclude=["8"])
    x = torch.randn(3, 1, 8, 8)
    target = torch.tensor([0, 1, 2])

    mask = torch.ones(3, space.total, requires_grad=True)
    with UnitMasks(net, space) as masks, masks.applied(mask):
        nn.functional.cross_entropy(net(x), target, reduction="sum").backward()
    assert mask.grad is not None

    # The same quantity by hand: activations of each unit layer, d loss / d activation.
    acts = []
    h = x
    for index, module in enumerate(net):
        h = module(h)
        if str(index) in space.counts():
            h.retain_grad()
            acts.append(h)
    nn.functional.cross_entropy(h, target, reduction="sum").backward()
    expected = torch.cat(
        [(a.grad * a).sum(dim=(2, 3)) if a.ndim == 4 else a.grad * a for a in acts], dim=1
    )
    torch.testing.assert_close(mask.grad, expected, rtol=1e-4, atol=1e-6)


def test_hooks_are_removed_on_exit_and_on_error(
    model_and_input: tuple[str, Classifier, torch.Tensor],
) -> None:
    name, model, x = model_and_input
    before = _hooks(model)
    space = model.units()
    with UnitMasks(model.net, space) as masks:
        assert sum(_hooks(model).values()) == sum(before.values()) + len(space.layers)
        with masks.applied(torch.ones(x.shape[0], space.total)):
            model(x)
    assert _hooks(model) == before
    with pytest.raises(RuntimeError, match="injected"), UnitMasks(model.net, space):
        raise RuntimeError("injected")
    assert _hooks(model) == before
    if name == "plain":
        assert all(not m._forward_hooks for m in model.modules())


def test_nested_contexts_compose_and_own_their_hooks() -> None:
    model = load_model(tiny_cnn())
    space = model.units()
    x = torch.randn(2, 1, 8, 8)
    with UnitMasks(model.net, space) as outer, outer.applied(torch.ones(2, space.total)):
        with UnitMasks(model.net, space) as inner, inner.applied(torch.zeros(2, space.total)):
            assert sum(_hooks(model).values()) == 2 * len(space.layers)
        assert sum(_hooks(model).values()) == len(space.layers)
        with torch.no_grad():
            torch.testing.assert_close(model(x), load_model(model.net)(x))
    assert sum(_hooks(model).values()) == 0


def test_mask_row_count_mismatch_is_an_error() -> None:
    model = load_model(tiny_cnn())
    space = model.units()
    with (
        pytest.raises(ValueError, match="one mask row per example"),
        UnitMasks(model.net, space) as masks,
        masks.applied(torch.ones(2, space.total)),
    ):
        model(torch.randn(3, 1, 8, 8))
    assert all(not m._forward_hooks for m in model.modules())


def test_a_mask_applies_only_inside_its_block_also_on_error() -> None:
    model = load_model(tiny_cnn())
    space = model.units()
    x = torch.randn(2, 1, 8, 8)
    zeros, ones = torch.zeros(2, space.total), torch.ones(2, space.total)
    with torch.no_grad(), UnitMasks(model.net, space) as masks:
        plain = model(x)
        with masks.applied(ones):
            with masks.applied(zeros):
                assert masks.mask is zeros
            assert masks.mask is ones  # the outer mask is back
        assert masks.mask is None
        with pytest.raises(RuntimeError, match="injected"), masks.applied(zeros):
            raise RuntimeError("injected")
        assert masks.mask is None
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


def test_zero_unit_weights_zeroes_weight_and_bias() -> None:
    net = tiny_cnn()
    space = UnitSpace(net, exclude=["8"])
    zero_unit_weights(net, space, [space.flat(Unit("0", 2)), space.flat(Unit("6", 1))])
    conv, linear = net[0], net[6]
    assert isinstance(conv, nn.Conv2d) and isinstance(linear, nn.Linear)
    assert conv.weight[2].abs().sum() == 0 and conv.bias is not None and conv.bias[2] == 0
    assert conv.weight[1].abs().sum() > 0
    assert linear.weight[1].abs().sum() == 0 and linear.bias[1] == 0
