"""Layer probes: groups, gradient accounting, rewinding, retraining, their CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memaudit.cli import main
from memaudit.data import ImageDataset, load_dataset, write_ids
from memaudit.engine import fit
from memaudit.errors import MemauditError
from memaudit.models import Classifier, DataRef, ModelInfo, build_model, load_model, save_model
from memaudit.probes import (
    GradientTracker,
    find_checkpoints,
    gradient_accounting,
    gradient_history,
    layer_groups,
    retrain_layers,
    rewind_layers,
    swapped,
)
from memaudit.schema import GradientsReport, RetrainReport, RewindReport

FLAGGED = [1, 4, 7]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the user's net (the keys checkpoints and layer groups use)."""
    net = model.net if isinstance(model, Classifier) else model
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny testbed on disk: data.npz, model.safetensors, checkpoints/epoch_000..002."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bed")
    gen = np.random.default_rng(0)
    np.savez(
        root / "data.npz",
        train_images=gen.integers(0, 255, (24, 8, 8), dtype=np.uint8),
        train_labels=gen.integers(0, 3, 24),
        test_images=gen.integers(0, 255, (6, 8, 8), dtype=np.uint8),
        test_labels=gen.integers(0, 3, 6),
    )
    model = build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 2})
    model.info.train_data = DataRef(source=str(root / "data.npz"))
    data = load_dataset(root / "data.npz", split="train", model=model)
    save_model(model, root / "checkpoints" / "epoch_000.safetensors")
    fit(
        model,
        data,
        epochs=2,
        batch_size=8,
        device="cpu",
        on_epoch=lambda e: save_model(
            e.model, root / "checkpoints" / f"epoch_{e.epoch:03d}.safetensors"
        ),
    )
    save_model(model, root / "model.safetensors")
    write_ids(root / "flagged.txt", FLAGGED)
    return root


def _load(bed: Path) -> tuple[Classifier, ImageDataset]:
    model = load_model(bed / "model.safetensors")
    return model, load_dataset(bed / "data.npz", split="train", model=model)


# --- layer groups ----------------------------------------------------------------------------


def test_module_groups_join_the_following_norm() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten()
    )
    groups = layer_groups(net)
    assert [g.name for g in groups] == ["0", "3"]
    assert groups[0].keys == (
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    )
    assert groups[0].params == ("0.weight", "0.bias", "1.weight", "1.bias")
    assert groups[0].size == 4 * 9 + 4 + 4 + 4


@pytest.mark.parametrize("grouping", ["module", "block"])
def test_groups_cover_every_parameter_once(grouping: str) -> None:
    model = build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 2})
    groups = layer_groups(model, grouping=grouping)
    params = [p for g in groups for p in g.params]
    assert sorted(params) == sorted(n for n, _ in model.net.named_parameters())
    assert sum(g.size for g in groups) == sum(p.numel() for p in model.parameters())
    if grouping == "block":
        assert [g.name for g in groups] == ["prep", "layer1", "layer2", "layer3", "fc"]


def test_block_groups_of_a_timm_vit_are_its_blocks() -> None:
    model = build_model(
        "timm:vit_tiny_patch16_224", num_classes=3, in_chans=1, config={"img_size": 16, "depth": 2}
    )
    names = [g.name for g in layer_groups(model, grouping="block")]
    assert names == ["cls_token+pos_embed", "patch_embed", "blocks.0", "blocks.1", "head"]


# --- gradient accounting ---------------------------------------------------------------------


def test_gradient_norms_equal_a_per_example_loop(bed: Path) -> None:
    model, data = _load(bed)
    report = gradient_accounting(
        model, data, FLAGGED, batch_size=10, norm_stats="running", device="cpu"
    )
    assert report.norm_stats == "running"
    groups = layer_groups(model)
    params = dict(model.net.named_parameters())
    sums = {flag: {n: torch.zeros_like(p) for n, p in params.items()} for flag in (True, False)}
    model.eval()
    for row in range(len(data)):  # one example at a time: the slow reference
        model.zero_grad()
        loss = F.cross_entropy(model(data.batch(torch.tensor([row]))), data.labels[[row]])
        loss.backward()
        for n, p in params.items():
            assert p.grad is not None
            sums[row in FLAGGED][n] += p.grad
    for group, row in zip(groups, report.layers, strict=True):
        f = torch.cat([sums[True][p].flatten() for p in group.params])
        c = torch.cat([sums[False][p].flatten() for p in group.params])
        assert row.flagged_norm[0] == pytest.approx(float(f.norm()) / math.sqrt(group.size), 1e-4)
        assert row.clean_norm[0] == pytest.approx(float(c.norm()) / math.sqrt(group.size), 1e-4)
        assert row.cosine[0] == pytest.approx(float(F.cosine_similarity(f, c, dim=0)), abs=1e-4)
    assert (report.n_flagged, report.n_clean) == (3, 21)


def test_batch_statistics_mode_matches_one_training_mode_batch(bed: Path) -> None:
    model, data = _load(bed)
    before = _state(model)
    report = gradient_accounting(model, data, FLAGGED, batch_size=len(data), device="cpu")
    assert _same(before, _state(model))  # running statistics restored
    model.train()
    losses = F.cross_entropy(
        model(data.batch(torch.arange(len(data)))), data.labels, reduction="none"
    )
    is_flagged = torch.isin(torch.arange(len(data)), torch.tensor(FLAGGED))
    params = dict(model.net.named_parameters())
    group = layer_groups(model)[3]
    wanted = [params[p] for p in group.params]
    f = torch.autograd.grad(losses[is_flagged].sum(), wanted, retain_graph=True)
    c = torch.autograd.grad(losses[~is_flagged].sum(), wanted)
    f_norm = float(torch.cat([g.flatten() for g in f]).norm()) / math.sqrt(group.size)
    c_norm = float(torch.cat([g.flatten() for g in c]).norm()) / math.sqrt(group.size)
    assert report.layers[3].flagged_norm[0] == pytest.approx(f_norm, rel=1e-4)
    assert report.layers[3].clean_norm[0] == pytest.approx(c_norm, rel=1e-4)


def test_cosine_and_norm_on_a_hand_made_case() -> None:
    # Logits W x with W = 0: the gradient of example (x, y) is (softmax - onehot_y) x = ±x/2.
    net = nn.Linear(1, 2, bias=False)
    nn.init.zeros_(net.weight)
    x = torch.tensor([[1.0], [1.0], [2.0]])

    def stats(labels: list[int]) -> tuple[float, float, float]:
        tracker = GradientTracker(net, [0])
        losses = F.cross_entropy(net(x), torch.tensor(labels), reduction="none")
        tracker.observe(torch.arange(3), losses)
        s = tracker.end_epoch(None)
        return float(s.flagged_norm[0]), float(s.clean_norm[0]), float(s.cosine[0])

    # flagged grad [-.5, .5]; clean [.5, -.5] + [.5, -.5] * 2 = [1.5, -1.5]: opposite.
    flagged, clean, cosine = stats([0, 1, 1])
    assert cosine == pytest.approx(-1.0)
    assert flagged == pytest.approx(math.hypot(0.5, 0.5) / math.sqrt(2))
    assert clean == pytest.approx(math.hypot(1.5, 1.5) / math.sqrt(2))
    # clean [.5, -.5] + [-1, 1] = [-.5, .5]: the same direction as the flagged one.
    assert stats([0, 1, 0])[2] == pytest.approx(1.0)


def test_tracker_during_training_gives_one_column_per_epoch(bed: Path) -> None:
    model, data = _load(bed)
    tracker = GradientTracker(model, FLAGGED)
    fit(
        model,
        data,
        epochs=2,
        batch_size=8,
        device="cpu",
        on_loss=tracker.observe,
        on_epoch=tracker.on_epoch,
    )
    report = tracker.report(data="tiny")
    assert report.epochs == [1, 2] and report.mode == "training"
    assert (report.n_flagged, report.n_clean) == (3, 21)
    assert all(len(row.cosine) == 2 and row.flagged_norm[0] > 0 for row in report.layers)


def test_gradient_history_over_checkpoints_restores_the_model(bed: Path, tmp_path: Path) -> None:
    model, data = _load(bed)
    before = _state(model)
    report = gradient_history(model, data, FLAGGED, bed / "checkpoints", device="cpu")
    assert report.epochs == [0, 1, 2]
    assert _same(before, _state(model))
    last = gradient_accounting(model, data, FLAGGED, device="cpu")
    assert _same(before, _state(model))
    assert [r.cosine[-1] for r in report.layers] == pytest.approx(
        [r.cosine[0] for r in last.layers]
    )
    path = report.to_json(tmp_path / "g.json")
    assert GradientsReport.from_json(path) == report


# --- rewinding and retraining ----------------------------------------------------------------


def test_rewinding_to_itself_changes_nothing(bed: Path, tmp_path: Path) -> None:
    model, data = _load(bed)
    save_model(model, tmp_path / "epoch_007.safetensors")
    before = _state(model)
    report = rewind_layers(model, data, FLAGGED, tmp_path, device="cpu")
    assert report.epochs == [7]
    for row in report.layers:
        assert row.flagged == [report.baseline.flagged]
        assert row.clean == [report.baseline.clean]
    assert _same(before, _state(model))


def test_probes_take_example_ids_of_an_id_column(bed: Path) -> None:
    """With an id column, the probes read ids, not row numbers: same report as by rows."""
    import dataclasses

    model, data = _load(bed)
    named = dataclasses.replace(data, ids=torch.arange(len(data)) * 10 + 1000)  # row r: id
    by_id = rewind_layers(model, named, [1000 + 10 * r for r in FLAGGED], bed / "checkpoints")
    by_row = rewind_layers(model, data, FLAGGED, bed / "checkpoints")
    assert by_id.layers == by_row.layers and by_id.baseline == by_row.baseline
    got = gradient_accounting(model, named, [1000 + 10 * r for r in FLAGGED], device="cpu")
    assert got.n_flagged == len(FLAGGED)
    with pytest.raises(MemauditError, match="not in the id column"):
        rewind_layers(model, named, FLAGGED, bed / "checkpoints")


def test_rewinding_loads_one_group_and_restores_it(bed: Path) -> None:
    model, data = _load(bed)
    before = _state(model)
    init = load_model(bed / "checkpoints" / "epoch_000.safetensors")
    group = layer_groups(model)[1]
    with swapped(model, init.net.state_dict(), group.keys):
        now = model.net.state_dict()
        for key in before:
            expected = init.net.state_dict()[key] if key in group.keys else before[key]
            assert torch.equal(now[key], expected), key
    assert _same(before, _state(model))
    report = rewind_layers(model, data, FLAGGED, bed / "checkpoints", device="cpu")
    assert report.epochs == [0, 1, 2] and len(report.layers) == len(layer_groups(model))
    assert report.flagged_at(0).keys() == {g.name for g in layer_groups(model)}
    assert _same(before, _state(model))


def test_retraining_touches_only_the_chosen_group(
    bed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memaudit.probes._rewind as probes

    model, data = _load(bed)
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    init = load_model(bed / "checkpoints" / "epoch_000.safetensors").net.state_dict()
    group = layer_groups(model)[2]
    seen: list[dict[str, torch.Tensor]] = []
    evaluate = probes._evaluate

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(_state(model))
        return evaluate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(probes, "_evaluate", spy)
    report = retrain_layers(
        model, data, FLAGGED, bed / "checkpoints", layers=[group.name], epochs=2, device="cpu"
    )
    _baseline, rewound, retrained = seen  # the three evaluations
    for key in before:
        if key in group.keys:
            assert torch.equal(rewound[key], init[key])
        else:
            assert torch.equal(retrained[key], before[key]), key
    assert any(not torch.equal(retrained[k], rewound[k]) for k in group.params)
    assert _same(before, _state(model))
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert [r.name for r in report.layers] == [group.name] and report.rewind_epoch == 0
    assert isinstance(report, RetrainReport)


def test_probe_errors_are_clear(bed: Path, tmp_path: Path) -> None:
    model, data = _load(bed)
    with pytest.raises(MemauditError, match=r"checkpoint folder .* not found"):
        find_checkpoints(tmp_path / "nope")
    with pytest.raises(MemauditError, match="no epoch_NNN"):
        find_checkpoints(tmp_path)
    with pytest.raises(MemauditError, match=r"epoch 9 in .*; available: 0-2"):
        find_checkpoints(bed / "checkpoints", epochs=[9])
    with pytest.raises(MemauditError, match="no layer group named 'x'"):
        rewind_layers(model, data, FLAGGED, bed / "checkpoints", layers=["x"], device="cpu")
    other = build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 4})
    save_model(other, tmp_path / "epoch_000.safetensors")
    with pytest.raises(MemauditError, match="does not fit the model"):
        rewind_layers(model, data, FLAGGED, tmp_path, device="cpu")


# --- CLI -------------------------------------------------------------------------------------


def _cli(bed: Path, *args: str) -> int:
    flagged = ["--flagged", str(bed / "flagged.txt")]
    # a random model: the preflight check would refuse it
    return main(
        ["probe", *args, str(bed / "model.safetensors"), *flagged, "--min-train-accuracy", "0"]
    )


def test_cli_runs_the_three_probes(bed: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert _cli(bed, "gradients", "--out", str(out), "--device", "cpu") == 0
    assert GradientsReport.from_json(out).epochs == [None]
    assert _cli(bed, "gradients", "--epochs", "0,2", "--out", str(out), "--device", "cpu") == 0
    assert GradientsReport.from_json(out).epochs == [0, 2]
    assert _cli(bed, "rewind", "--grouping", "block", "--out", str(out), "--device", "cpu") == 0
    report = RewindReport.from_json(out)
    assert [r.name for r in report.layers] == ["prep", "layer1", "layer2", "layer3", "fc"]
    assert report.n_test == 6
    args = ("retrain", "--layers", "fc", "--train-epochs", "1", "--clean-sample", "5")
    assert _cli(bed, *args, "--out", str(out), "--device", "cpu") == 0
    assert RetrainReport.from_json(out).n_clean == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rewind", "--checkpoints", "/nonexistent"], "checkpoint folder"),
        (["rewind", "--epochs", "1,x"], "--epochs takes integers"),
        (["retrain", "--rewind-to", "5"], "no checkpoint for epoch 5"),
        (["rewind", "--layers", "nope"], "no layer group named 'nope'"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(
    bed: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(bed, *args) == 2
    text = capsys.readouterr().err
    assert message in text
    assert len(text.strip().splitlines()) == 1


def test_cli_without_a_checkpoint_folder_says_how_to_pass_one(
    tmp_path: Path, bed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = load_model(bed / "model.safetensors")
    save_model(model, tmp_path / "model.safetensors")
    argv = ["probe", "rewind", str(tmp_path / "model.safetensors")]
    assert main([*argv, "--flagged", str(bed / "flagged.txt")]) == 2
    assert "pass --checkpoints DIR" in capsys.readouterr().err


def test_reports_hold_names_and_numbers_only(bed: Path) -> None:
    model = Classifier(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 3)),
        ModelInfo(source="m", arch="x:y", num_classes=3),
    )
    _, data = _load(bed)
    report = gradient_accounting(model, data, FLAGGED, device="cpu")
    assert report.layers[0].name == "1" and report.data.endswith("data.npz:train")
    assert isinstance(report.model_dump_json(), str)
