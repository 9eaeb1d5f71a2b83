"""Example-tied dropout: deterministic per-example masks, modes, placement and folding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from memaudit.dropout import (
    TiedDropout,
    conv_layers,
    default_layers,
    mlp_hidden_layers,
    recalibrate_norms,
    stage_outputs,
)
from memaudit.errors import MemauditError
from memaudit.keyed import draws
from memaudit.models import build_model, load_model


def tiny_resnet() -> nn.Module:
    return build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 2})


def one_layer(channels: int, *, p_gen: float = 0.2, p_mem: float = 0.1, seed: int = 0) -> Any:
    """Dropout after one conv layer of ``channels`` (the net, its dropout)."""
    net = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(channels)[:, :, None, None])  # the identity map
    return net, TiedDropout(net, after=["0"], p_gen=p_gen, p_mem=p_mem, seed=seed)


def test_masks_are_deterministic_and_whole_channel() -> None:
    net, etd = one_layer(8, p_gen=0.25, p_mem=0.5, seed=3)
    x = torch.ones(3, 8, 4, 4)
    ids = torch.tensor([5, 6, 7])
    with etd.attached() as masks:
        with masks.applied(etd.masks(ids)):
            first = net(x)
        for _ in range(3):  # "epochs": the same ids always give the same masks
            with masks.applied(etd.masks(ids)):
                assert torch.equal(net(x), first)
        # whole channels: every spatial position of a channel shares the mask
        assert torch.equal(first.amin((2, 3)), first.amax((2, 3)))
        assert torch.equal(first[:, :2], torch.ones(3, 2, 4, 4))  # generalization units on
        with masks.applied(etd.masks(torch.tensor([7]))):  # a mask does not depend on its batch
            assert torch.equal(net(x[:1]), first[2:])
    assert torch.equal(net(x), x)  # outside the scope the model runs unchanged


def test_masks_differ_between_examples_and_match_p_mem() -> None:
    _, etd = one_layer(50, p_gen=0.2, p_mem=0.1, seed=0)
    masks = etd.masks(torch.arange(20_000))
    mem = masks[:, 10:]
    assert masks[:, :10].eq(1).all()
    assert abs(float(mem.mean()) - 0.1) < 0.005
    _, wide = one_layer(500)
    assert wide.masks(torch.arange(1000)).unique(dim=0).shape[0] == 1000  # each its own mask
    _, other_seed = one_layer(50, seed=1)
    assert not torch.equal(other_seed.masks(torch.arange(100)), masks[:100])


def test_masks_are_the_same_in_another_process() -> None:
    code = (
        "import torch; from memaudit.keyed import draws; "
        "print(draws(torch.tensor([0, 9, 123456789]), torch.arange(6), seed=42).tolist())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    here = draws(torch.tensor([0, 9, 123456789]), torch.arange(6), seed=42).tolist()
    assert other == str(here)


def test_no_table_grows_with_examples() -> None:
    net, etd = one_layer(16)
    assert not any(torch.is_tensor(v) for v in vars(etd).values())  # no per-example state
    keys = list(net.state_dict())
    huge = etd.masks(torch.tensor([10**12, 10**12 + 1]))  # ids far beyond any dataset
    assert huge.shape == (2, 16) and list(net.state_dict()) == keys


def test_drop_and_expectation_modes_scale_exactly() -> None:
    net, etd = one_layer(10, p_gen=0.2, p_mem=0.1)
    x = torch.rand(2, 10, 3, 3) + 0.5
    with torch.no_grad(), etd.attached() as masks:
        with masks.applied(etd.mode_mask("drop")):
            drop = net(x)
        with masks.applied(etd.mode_mask("expectation")):
            expect = net(x)
    assert drop[:, 2:].eq(0).all()  # exactly the memorization units are zero
    torch.testing.assert_close(drop[:, :2], x[:, :2] * 1.5)
    torch.testing.assert_close(expect[:, :2], x[:, :2])
    torch.testing.assert_close(expect[:, 2:], x[:, 2:] * 0.1)


def test_token_outputs_mask_the_last_dim() -> None:
    net = nn.Sequential(nn.Linear(8, 8))
    etd = TiedDropout(net, after=["0"], p_gen=0.5, p_mem=0.5)
    assert [(layer.size, layer.dim) for layer in etd.space.layers] == [(8, -1)]
    ids = torch.tensor([1, 2])
    with etd.attached() as masks, masks.applied(etd.masks(ids)):
        out = net(torch.ones(2, 5, 8))  # [batch, tokens, features]
    plain = net(torch.ones(2, 5, 8))
    assert torch.equal(out.amin(1) / plain.amin(1), out.amax(1) / plain.amax(1))  # tokens share
    torch.testing.assert_close(out[:, 0], plain[:, 0] * etd.masks(ids))


def test_batched_equals_one_at_a_time() -> None:
    net = tiny_resnet().eval()  # batch norm mixes examples; compare with fixed statistics
    etd = TiedDropout(net, seed=1)
    x, ids = torch.randn(4, 1, 8, 8), torch.tensor([3, 1, 4, 1])
    with etd.attached() as masks:
        with masks.applied(etd.masks(ids)):
            batched = net(x)
        for k in range(4):
            with masks.applied(etd.masks(ids[k : k + 1])):
                torch.testing.assert_close(net(x[k : k + 1]), batched[k : k + 1])


@pytest.mark.parametrize(
    "make",
    [
        tiny_resnet,
        lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3)),
        lambda: build_model("timm:resnet10t", num_classes=3, in_chans=1),
    ],
    ids=["resnet9", "mlp", "timm-resnet10t"],
)
def test_attached_dropout_folds_exactly_and_leaves_the_model_as_it_was(make: object) -> None:
    net = make()  # type: ignore[operator]  # a factory
    net.eval()
    x = torch.randn(2, 6) if isinstance(net, nn.Sequential) else torch.randn(2, 1, 16, 16)
    before, state = net(x), {k: v.clone() for k, v in net.state_dict().items()}
    etd = TiedDropout(net, example=x)
    assert etd.names
    with torch.no_grad(), etd.attached() as masks:
        with masks.applied(etd.mode_mask("drop")):
            dropped = net(x)
        with masks.applied(etd.mode_mask("expectation")):
            expected = net(x)
    torch.testing.assert_close(etd.plain_copy("drop", example=x)(x), dropped, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        etd.plain_copy("expectation", example=x)(x), expected, atol=1e-5, rtol=1e-4
    )
    assert torch.equal(net(x), before)  # no module replaced, no hook left, no weight changed
    assert net.state_dict().keys() == state.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert not any(m._forward_hooks for m in net.modules())


def test_conv_layers_follow_batch_norm_and_skip_the_head() -> None:
    names = conv_layers(tiny_resnet())
    assert names[0] == "prep.1"
    assert all(not n.endswith("fc") for n in names)


def test_default_layers_are_stage_outputs_when_they_fold() -> None:
    """Stages (feature_info) by default; a timm ResNet's stages feed identity shortcuts, which
    a plain model cannot fold the scaling into, so it gets dropout after every conv layer."""
    assert default_layers(tiny_resnet()) == ["prep", "layer1", "layer2", "layer3"]
    timm_net = build_model("timm:test_resnet", num_classes=3, in_chans=1)
    assert stage_outputs(timm_net)[1:] == ["layer1", "layer2", "layer3", "layer4"]
    assert default_layers(timm_net) == conv_layers(timm_net)


def test_timm_stages_that_fold_get_stage_dropout_and_fold_exactly() -> None:
    net = build_model("timm:test_efficientnet", num_classes=3, in_chans=3).eval()
    etd = TiedDropout(net, p_gen=0.25, p_mem=0.5)
    assert etd.names == stage_outputs(net)
    x = torch.randn(2, 3, 40, 40)  # another size than the traced example
    with torch.no_grad():
        with etd.attached() as masks, masks.applied(etd.mode_mask("drop")):
            dropped = net(x)
        torch.testing.assert_close(etd.plain_copy("drop")(x), dropped, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["drop", "expectation"])
def test_stage_dropout_folds_into_the_layers_that_read_it(mode: str) -> None:
    """After a block, the scaling folds into the next convs and, through the max-pool, into the
    head: the plain model computes what the model with dropout computed."""
    net = tiny_resnet().eval()
    x = torch.randn(3, 1, 12, 12)
    etd = TiedDropout(net, p_gen=0.5, p_mem=0.5)
    with torch.no_grad():
        with etd.attached() as masks, masks.applied(etd.mode_mask(mode)):  # type: ignore[arg-type]
            expected = net(x)
        etd.fold(mode)  # type: ignore[arg-type]
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(MemauditError, match="folded into the weights"):
        etd.attached()


def test_unfoldable_dropout_is_a_clear_error_and_changes_nothing() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.block(x)
            return (h + self.conv(h)).mean((2, 3))  # h also feeds a residual sum

    net = Skip().eval()
    x = torch.randn(2, 4, 5, 5)
    etd = TiedDropout(net, after=["block"], p_gen=0.5, p_mem=0.5, example=x)
    with torch.no_grad():
        before = net(x)
    with pytest.raises(MemauditError, match="cannot fold the example-tied dropout after 'block'"):
        etd.fold("drop", example=x)
    assert etd.folded is None
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=0)


def test_a_mask_for_another_batch_size_is_a_clear_error() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    etd = TiedDropout(net)
    three = etd.masks(torch.tensor([0, 1, 2]))
    with etd.attached() as masks, masks.applied(three), pytest.raises(ValueError, match="one"):
        net(torch.ones(2, 3))


def test_untied_examples_see_the_drop_mode_network() -> None:
    net, etd = one_layer(8, p_gen=0.25, p_mem=0.5)
    x = torch.rand(3, 8, 2, 2)
    ids, tied = torch.tensor([1, 2, 3]), torch.tensor([True, False, True])
    with etd.attached() as masks:
        with masks.applied(etd.masks(ids, tied=tied)):
            out = net(x)
        torch.testing.assert_close(out[1], x[1] * etd.scale("drop")[:, None, None])
        with masks.applied(etd.masks(ids)):
            torch.testing.assert_close(out[[0, 2]], net(x)[[0, 2]])


def test_masks_nest_and_restore() -> None:
    net, etd = one_layer(4, p_gen=0.5, p_mem=0.5)
    x = torch.ones(1, 4, 1, 1)
    with etd.attached() as masks:
        with masks.applied(etd.mode_mask("drop")):
            with masks.applied(etd.mode_mask("expectation")):
                assert net(x).flatten().tolist() == [1, 1, 0.5, 0.5]
            assert net(x).flatten().tolist() == [2, 2, 0, 0]  # the outer mask is back
        assert masks.mask is None and torch.equal(net(x), x)


def test_bad_settings_are_clear_errors() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(MemauditError, match="p_gen"):
        TiedDropout(net, p_gen=0, p_mem=0.1)
    with pytest.raises(MemauditError, match="mode"):
        TiedDropout(net).scale("sometimes")  # type: ignore[arg-type]  # the point of the test
    with pytest.raises(MemauditError, match="no module named"):
        TiedDropout(net, after=["nope"])
    with pytest.raises(MemauditError, match="needs an example input"):
        TiedDropout(net, after=["1"])  # a plain module has no known input shape
    etd = TiedDropout(net, after=["1"], example=torch.randn(2, 2))
    etd.fold("drop", example=torch.randn(2, 2))
    assert etd.folded == "drop"


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_hugging_face_models_attach_and_fold(kind: str, hf_dirs: dict[str, Path]) -> None:
    model = load_model(hf_dirs[kind])
    x = torch.randn(2, 3, 16, 16)
    before, keys = model(x), list(model.state_dict())
    etd = TiedDropout(model)
    assert etd.names and all(not n.startswith(model.info.head or "-") for n in etd.names)
    with torch.no_grad(), etd.attached() as masks:
        with masks.applied(etd.masks(torch.tensor([0, 1]))):
            model.train()(x)  # token outputs of ViT linear layers: masks on the last dim
        with masks.applied(etd.mode_mask("drop")):
            dropped = model.eval()(x)
    torch.testing.assert_close(etd.plain_copy("drop")(x), dropped, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(model(x), before)
    assert list(model.state_dict()) == keys


def test_recalibrate_norms_recomputes_batch_norm_statistics_only() -> None:
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU()).eval()
    weights = {k: v.clone() for k, v in net.named_parameters()}
    batches = [torch.randn(4, 1, 6, 6) * 2 + 1 for _ in range(3)]
    assert recalibrate_norms(net, iter(batches)) == 1
    with torch.no_grad():
        features = net[0](torch.cat(batches))
    norm = net[1]
    assert isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None
    torch.testing.assert_close(norm.running_mean, features.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert norm.momentum == 0.3 and not net.training
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())


@pytest.mark.parametrize("kind", ["hf-vit", "hf-convnext", "timm-vit", "timm-convnext"])
def test_transformers_get_dropout_on_mlp_features_and_fold_exactly(
    kind: str, hf_dirs: dict[str, Path]
) -> None:
    """Drop-mode outputs of the model with dropout equal the exported plain model's."""
    if kind.startswith("hf-"):
        model = load_model(hf_dirs[kind[3:]])
    else:
        arch = {"timm-vit": "timm:test_vit", "timm-convnext": "timm:test_convnext"}[kind]
        model = build_model(arch, num_classes=3, in_chans=3).eval()
        with torch.no_grad():  # a trained model's layer scale: timm's 1e-6 hid a wrong fold
            for name, param in model.named_parameters():
                if name.endswith("gamma"):
                    param.fill_(1.0)
    hidden = mlp_hidden_layers(model)
    assert hidden and all("act" in name.rpartition(".")[2] for name in hidden)
    etd = TiedDropout(model)
    assert etd.names == hidden  # the default placement for these families
    if kind.startswith("timm-"):  # the hidden features, also in channels-last ConvNeXt blocks
        fc1 = [model.net.get_submodule(n.rpartition(".")[0]).fc1.out_features for n in hidden]
        assert [layer.size for layer in etd.space.layers] == fc1
    size = 16 if kind.startswith("hf-") else 32
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        with etd.attached() as masks, masks.applied(etd.mode_mask("drop")):
            dropped = model.eval()(x)
        torch.testing.assert_close(etd.plain_copy("drop")(x), dropped, rtol=1e-4, atol=1e-5)
