"""Example-tied dropout: deterministic per-example masks, modes, insertion, removal and folding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from memaudit.dropout import (
    ExampleTiedDropout,
    bind_ids,
    conv_layers,
    default_layers,
    dropout_layers,
    insert_dropout,
    plain_copy,
    recalibrate_norms,
    remove_dropout,
    set_mode,
    stage_outputs,
    tied_draws,
)
from memaudit.errors import MemauditError
from memaudit.models import build_model, load_model


def tiny_resnet() -> nn.Module:
    return build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 2})


def test_masks_are_deterministic_and_whole_channel() -> None:
    etd = ExampleTiedDropout(p_gen=0.25, p_mem=0.5, seed=3).train()
    x = torch.ones(3, 8, 4, 4)
    etd.ids = torch.tensor([5, 6, 7])
    first = etd(x)
    for _ in range(3):  # "epochs": the same ids always give the same masks
        assert torch.equal(etd(x), first)
    # whole channels: every spatial position of a channel shares the mask
    assert torch.equal(first.amin((2, 3)), first.amax((2, 3)))
    assert torch.equal(first[:, :2], torch.ones(3, 2, 4, 4))  # generalization units always on
    etd.ids = torch.tensor([7])  # an example's mask does not depend on its batch
    assert torch.equal(etd(x[:1]), first[2:])


def test_masks_differ_between_examples_and_match_p_mem() -> None:
    etd = ExampleTiedDropout(p_gen=0.2, p_mem=0.1, seed=0)
    masks = etd.masks(torch.arange(20_000), 50)
    mem = masks[:, 10:]
    assert masks[:, :10].eq(1).all()
    assert abs(float(mem.mean()) - 0.1) < 0.005
    wide = etd.masks(torch.arange(1000), 500)  # with many units every example has its own mask
    assert wide.unique(dim=0).shape[0] == 1000
    other_seed = ExampleTiedDropout(p_gen=0.2, p_mem=0.1, seed=1).masks(torch.arange(100), 50)
    assert not torch.equal(other_seed, masks[:100])


def test_masks_are_the_same_in_another_process() -> None:
    code = (
        "import torch; from memaudit.dropout import tied_draws; "
        "print(tied_draws(torch.tensor([0, 9, 123456789]), torch.arange(6), seed=42).tolist())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    here = tied_draws(torch.tensor([0, 9, 123456789]), torch.arange(6), seed=42).tolist()
    assert other == str(here)


def test_no_table_grows_with_examples() -> None:
    etd = ExampleTiedDropout()
    assert not list(etd.parameters()) and not list(etd.buffers())
    huge = etd.masks(torch.tensor([10**12, 10**12 + 1]), 16)  # ids far beyond any dataset
    assert huge.shape == (2, 16)


def test_drop_and_expectation_modes_scale_exactly() -> None:
    x = torch.rand(2, 10, 3, 3) + 0.5
    drop = ExampleTiedDropout(p_gen=0.2, p_mem=0.1, mode="drop")(x)
    assert drop[:, 2:].eq(0).all()  # exactly the memorization units are zero
    torch.testing.assert_close(drop[:, :2], x[:, :2] * 1.5)
    expect = ExampleTiedDropout(p_gen=0.2, p_mem=0.1, mode="expectation")(x)
    torch.testing.assert_close(expect[:, :2], x[:, :2])
    torch.testing.assert_close(expect[:, 2:], x[:, 2:] * 0.1)
    eval_train_mode = ExampleTiedDropout(p_gen=0.2, p_mem=0.1).eval()(x)
    torch.testing.assert_close(eval_train_mode, expect)  # eval in train mode = expectation


def test_token_outputs_mask_the_last_dim() -> None:
    etd = ExampleTiedDropout(p_gen=0.5, p_mem=0.5, dim=-1).train()
    etd.ids = torch.tensor([1, 2])
    out = etd(torch.ones(2, 5, 8))  # [batch, tokens, features]
    assert torch.equal(out.amin(1), out.amax(1))  # all tokens share the feature mask
    assert torch.equal(out[:, 0], etd.masks(torch.tensor([1, 2]), 8))


def test_batched_equals_one_at_a_time() -> None:
    net = tiny_resnet().train()
    insert_dropout(net, seed=1)
    for m in net.modules():  # batch norm mixes examples; compare with fixed statistics
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x, ids = torch.randn(4, 1, 8, 8), torch.tensor([3, 1, 4, 1])
    with bind_ids(net, ids):
        batched = net(x)
    for k in range(4):
        with bind_ids(net, ids[k : k + 1]):
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
def test_insert_then_remove_restores_the_model(make: object) -> None:
    net = make()  # type: ignore[operator]  # a factory
    net.eval()
    x = torch.randn(2, 6) if isinstance(net, nn.Sequential) else torch.randn(2, 1, 16, 16)
    before, keys = net(x), list(net.state_dict())
    names = insert_dropout(net)
    assert names == list(dropout_layers(net)) and names
    with torch.no_grad():
        set_mode(net, "drop")
        dropped = net(x)
        set_mode(net, "expectation")
        expected = net(x)
    torch.testing.assert_close(plain_copy(net, mode="drop")(x), dropped, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        plain_copy(net, mode="expectation")(x), expected, atol=1e-5, rtol=1e-4
    )
    assert remove_dropout(net) == names
    assert torch.equal(net(x), before) and list(net.state_dict()) == keys


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
    assert insert_dropout(net, p_gen=0.25, p_mem=0.5) == stage_outputs(net)
    x = torch.randn(2, 3, 40, 40)  # another size than the traced example
    set_mode(net, "drop")
    with torch.no_grad():
        torch.testing.assert_close(plain_copy(net)(x), net(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["drop", "expectation"])
def test_stage_dropout_folds_into_the_layers_that_read_it(mode: str) -> None:
    """After a block, the scaling folds into the next convs and, through the max-pool, into the
    head: the plain model computes what the model with dropout computed."""
    net = tiny_resnet().eval()
    x = torch.randn(3, 1, 12, 12)
    insert_dropout(net, p_gen=0.5, p_mem=0.5)
    set_mode(net, mode)  # type: ignore[arg-type]
    with torch.no_grad():
        expected = net(x)
        plain = plain_copy(net, mode=mode)  # type: ignore[arg-type]
        torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-6)
    assert not dropout_layers(plain)


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
    insert_dropout(net, after=["block"], p_gen=0.5, p_mem=0.5)
    set_mode(net, "expectation")
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        before = net(x)
    with pytest.raises(MemauditError, match="cannot fold the example-tied dropout after 'block'"):
        remove_dropout(net, fold="drop", example=x)
    assert list(dropout_layers(net)) == ["block"]
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=0)


def test_training_without_ids_is_a_clear_error() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    insert_dropout(net)
    with pytest.raises(MemauditError, match="bind_ids"):
        net.train()(torch.ones(2, 3))
    with bind_ids(net, torch.tensor([0])), pytest.raises(MemauditError, match="one id"):
        net(torch.ones(2, 3))
    with pytest.raises(MemauditError, match="already has"):
        insert_dropout(net)


def test_untied_examples_see_the_drop_mode_network() -> None:
    etd = ExampleTiedDropout(p_gen=0.25, p_mem=0.5).train()
    x = torch.rand(3, 8, 2, 2)
    etd.ids, etd.tied = torch.tensor([1, 2, 3]), torch.tensor([True, False, True])
    out = etd(x)
    torch.testing.assert_close(out[1], x[1] * etd.scale(8, "drop")[:, None, None])
    etd.tied = None
    torch.testing.assert_close(out[[0, 2]], etd(x)[[0, 2]])


def test_bindings_nest_and_restore() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    insert_dropout(net)
    (etd,) = dropout_layers(net).values()
    with bind_ids(net, torch.tensor([1])):
        with bind_ids(net, torch.tensor([2, 3])):
            assert etd.ids is not None and etd.ids.tolist() == [2, 3]
        assert etd.ids is not None and etd.ids.tolist() == [1]
    assert etd.ids is None


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(MemauditError, match="p_gen"):
        ExampleTiedDropout(p_gen=0, p_mem=0.1)
    with pytest.raises(MemauditError, match="mode"):
        ExampleTiedDropout(mode="sometimes")  # type: ignore[arg-type]  # the point of the test
    with pytest.raises(MemauditError, match="no module named"):
        insert_dropout(nn.Sequential(nn.Linear(2, 2)), after=["nope"])
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    insert_dropout(net, after=["1"])
    with pytest.raises(MemauditError, match="needs an example input"):
        remove_dropout(net, fold="drop")  # a plain module has no known input shape
    assert remove_dropout(net, fold="drop", example=torch.randn(2, 2)) == ["1"]


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_hugging_face_models_insert_fold_and_restore(kind: str, hf_dirs: dict[str, Path]) -> None:
    model = load_model(hf_dirs[kind])
    x = torch.randn(2, 3, 16, 16)
    before, keys = model(x), list(model.state_dict())
    names = insert_dropout(model)
    assert names and all(not n.startswith(model.info.head or "-") for n in names)
    with torch.no_grad(), bind_ids(model, torch.tensor([0, 1])):
        model.train()(x)  # token outputs of ViT linear layers: masks on the last dim
        set_mode(model, "drop")
        dropped = model.eval()(x)
    torch.testing.assert_close(plain_copy(model, mode="drop")(x), dropped, atol=1e-4, rtol=1e-3)
    remove_dropout(model)
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
