"""The label-noise testbed: the noise rule, a tiny end-to-end run, and (slow) the default run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from memaudit.cli._common import LoadOptions, load_inputs
from memaudit.data import ImageDataset, load_dataset, read_ids
from memaudit.engine import accuracy, evaluate, fit, pick_device, predict
from memaudit.errors import MemauditError
from memaudit.models import Classifier, build_model, load_model
from memaudit.testbed import (
    FORGET_KINDS,
    SMALL_HF_VIT,
    TestbedConfig,
    TestbedResult,
    arch_config_for,
    build_testbed,
    forget_sets,
    label_noise,
    load_testbed,
)


@pytest.mark.parametrize(("n", "fraction", "k"), [(1000, 0.1, 10), (37, 0.25, 3), (50, 0.5, 2)])
def test_label_noise_never_keeps_the_true_label(n: int, fraction: float, k: int) -> None:
    labels = torch.randint(0, k, (n,))
    noisy, ids = label_noise(labels, fraction=fraction, num_classes=k, seed=3)
    assert ids.numel() == round(fraction * n) and ids.unique().numel() == ids.numel()
    assert torch.equal(ids, ids.sort().values)
    assert (noisy[ids] != labels[ids]).all() and ((noisy >= 0) & (noisy < k)).all()
    rest = torch.ones(n, dtype=torch.bool)
    rest[ids] = False
    assert torch.equal(noisy[rest], labels[rest])


def test_label_noise_is_seeded_and_spreads_over_classes() -> None:
    labels = torch.arange(10).repeat(100)
    first, ids = label_noise(labels, fraction=0.1, num_classes=10, seed=0)
    again, ids_again = label_noise(labels, fraction=0.1, num_classes=10, seed=0)
    _, ids_other = label_noise(labels, fraction=0.1, num_classes=10, seed=1)
    assert torch.equal(first, again) and torch.equal(ids, ids_again)
    assert not torch.equal(ids, ids_other)
    shifts = (first[ids] - labels[ids]) % 10
    assert set(shifts.tolist()) == set(range(1, 10))  # r uniform in 1..K-1, all seen


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda")
    with pytest.raises(MemauditError, match="unknown device"):
        pick_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(MemauditError, match="no CUDA GPU"):
            pick_device("cuda")


def test_tiny_testbed_writes_everything(tiny_testbed: Path) -> None:
    root = tiny_testbed
    for name in ("data.npz", "noisy_ids.txt", "model.safetensors", "testbed.json"):
        assert (root / name).is_file(), name
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == [
        "epoch_000.safetensors",
        "epoch_001.safetensors",
    ]
    result = TestbedResult.model_validate_json((root / "testbed.json").read_text())
    assert load_testbed(root) == result
    assert (result.n_train, result.n_test, result.n_noisy) == (4000, 1000, 400)
    for acc in (result.noisy_train_accuracy, result.clean_train_accuracy, result.test_accuracy):
        assert 0 <= acc <= 1

    arrays = np.load(root / "data.npz")
    assert set(arrays.files) >= {
        "train_images",
        "train_labels",
        "train_true_labels",
        "test_images",
        "test_labels",
        "class_names",
    }
    noisy = read_ids(root / "noisy_ids.txt")
    changed = np.flatnonzero(arrays["train_labels"] != arrays["train_true_labels"])
    assert noisy == changed.tolist()


def test_tiny_testbed_reloads_with_no_flags(tiny_testbed: Path) -> None:
    result = load_testbed(tiny_testbed)
    assert result is not None
    model = load_model(tiny_testbed / "model.safetensors")
    assert model.info.arch == "memaudit:resnet9" and model.info.arch_config == {"width": 4}
    assert model.info.class_names == [str(i) for i in range(10)]
    assert model.info.preprocess is not None and model.info.preprocess.image_size == 28
    assert model.info.train_data is not None
    assert Path(model.info.train_data.source) == (tiny_testbed / "data.npz").resolve()

    inputs = load_inputs(
        str(tiny_testbed / "model.safetensors"),
        flagged=tiny_testbed / "noisy_ids.txt",
        options=LoadOptions(device="cpu"),
    )
    assert inputs.test is not None and len(inputs.train) == 4000 and len(inputs.test) == 1000
    noisy = torch.tensor(read_ids(tiny_testbed / "noisy_ids.txt"))
    measured = accuracy(inputs.model, inputs.train, noisy, device="cpu")
    assert measured == pytest.approx(result.noisy_train_accuracy)

    first = load_model(tiny_testbed / "checkpoints" / "epoch_000.safetensors")
    assert first.info.train_data == model.info.train_data


def test_a_testbed_model_records_its_recipe_and_retraining_follows_it(tiny_testbed: Path) -> None:
    from memaudit.engine import recipe_for

    result = TestbedResult.model_validate_json((tiny_testbed / "testbed.json").read_text())
    model = load_model(tiny_testbed / "model.safetensors")
    assert result.recipe is not None and result.recipe.epochs == 1
    assert model.info.recipe == result.recipe == recipe_for(model)
    assert recipe_for(model, lr=0.2).lr == 0.2  # overrides still apply on top
    assert recipe_for(build_model("memaudit:resnet9", num_classes=3)).epochs == 30  # unrecorded
    model.info.recipe = result.recipe.model_copy(update={"finetune_lr_scale": 0.1, "lr": 0.2})
    assert recipe_for(model).lr == 0.2 and recipe_for(model).finetune_lr_scale == 1.0  # ours


def test_testbed_on_a_dataset_from_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "src.npz",
        train_images=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
        train_labels=np.arange(40) % 4,
        test_images=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
        test_labels=np.arange(12) % 4,
    )
    config = TestbedConfig(
        data=str(tmp_path / "src.npz"), epochs=1, noise=0.25, arch_config={"width": 2}
    )
    result = build_testbed(tmp_path / "tb", config, device="cpu")
    assert (result.n_train, result.n_test, result.n_noisy) == (40, 12, 10)
    model = load_model(result.model)
    assert model.info.in_chans == 3 and model.info.num_classes == 4
    assert load_dataset(result.data, model=model).images.shape == (40, 3, 8, 8)


def test_testbed_on_a_small_hf_vit(tmp_path: Path) -> None:
    """``--arch hf:vit`` is memaudit's small ViT at the data's size, trained by the transformer
    recipe; the testbed records the settings it built."""
    assert arch_config_for("hf:vit", {"hidden_size": 16}, 28) == {
        **SMALL_HF_VIT,
        "hidden_size": 16,
        "image_size": 28,
    }
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "src.npz",
        train_images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
        train_labels=np.arange(40) % 4,
        test_images=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
        test_labels=np.arange(12) % 4,
    )
    small = {"hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32}
    config = TestbedConfig(
        data=str(tmp_path / "src.npz"), arch="hf:vit", arch_config=small, epochs=1
    )
    result = build_testbed(tmp_path / "tb", config, device="cpu")
    assert result.config.arch_config == {**SMALL_HF_VIT, **small, "image_size": 8}
    assert result.recipe is not None and result.recipe.family == "transformer"
    model = load_model(result.model)
    assert model.net.config.patch_size == 4 and model.net.config.image_size == 8
    assert model.info.preprocess is not None and model.info.preprocess.image_size == 8


def test_testbed_on_a_dataset_from_disk_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    """The seed fixes the noise, the order and the initialization: the same weights twice."""
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "src.npz",
        train_images=rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
        train_labels=np.arange(40) % 4,
        test_images=rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8),
        test_labels=np.arange(12) % 4,
    )

    def weights(seed: int, out: str) -> dict[str, torch.Tensor]:
        config = TestbedConfig(
            data=str(tmp_path / "src.npz"),
            epochs=1,
            arch_config={"width": 2},
            example_tied_dropout=True,
            seed=seed,
        )
        torch.manual_seed(seed + 100)  # the caller's random state plays no part
        return load_model(build_testbed(tmp_path / out, config, device="cpu").model).state_dict()

    first, again, other = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_bad_device_fails_before_writing(tmp_path: Path) -> None:
    with pytest.raises(MemauditError, match="unknown device"):
        build_testbed(tmp_path / "tb", TestbedConfig(epochs=1), device="tpu9")
    assert not (tmp_path / "tb").exists()


@pytest.mark.slow
def test_default_testbed_memorizes(tmp_path: Path) -> None:
    result = build_testbed(tmp_path, TestbedConfig(), device="auto")
    summary = json.loads((tmp_path / "testbed.json").read_text())
    assert summary["noisy_train_accuracy"] == result.noisy_train_accuracy
    assert result.noisy_train_accuracy >= 0.95  # the model memorized the wrong labels
    assert result.clean_train_accuracy >= 0.95 and result.test_accuracy >= 0.9


# --- the training engine ---------------------------------------------------------------------


def _engine_data() -> ImageDataset:
    images = torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8)
    return ImageDataset(images, torch.arange(24) % 3)


def test_each_family_trains_with_its_recipe(hf_dirs: dict[str, Path]) -> None:
    from memaudit.engine import RECIPES, family_of, recipe_for

    cases = {
        "batchnorm-cnn": [
            build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 2}),
            build_model("timm:test_resnet", num_classes=3, in_chans=1),
        ],
        "transformer": [build_model("timm:test_vit", num_classes=3), load_model(hf_dirs["vit"])],
        "layernorm-cnn": [
            build_model("timm:test_convnext", num_classes=3),
            load_model(hf_dirs["convnext"]),
        ],
    }
    for family, models in cases.items():
        assert all(family_of(m) == family for m in models), family
    cnn, vit = RECIPES["batchnorm-cnn"], RECIPES["transformer"]
    assert (cnn.optimizer, cnn.schedule, cnn.lr) == ("sgd", "one-cycle", 0.05)  # as measured
    assert (vit.optimizer, vit.schedule) == ("adamw", "cosine") and vit.warmup > 0
    assert vit.finetune_lr_scale == 1 and vit.clip_grad_norm is not None  # the recipe's rate
    mine = recipe_for(cases["transformer"][0], lr=3e-4, warmup=None)
    assert mine.lr == 3e-4 and mine.warmup == vit.warmup  # None keeps the recipe's value
    with pytest.raises(MemauditError, match="invalid training setting"):
        recipe_for(cases["transformer"][0], warmup=1.5)


def test_fit_with_the_transformer_recipe_lowers_the_loss() -> None:
    torch.manual_seed(0)
    config = {"img_size": 8, "patch_size": 4}
    model = build_model("timm:test_vit", num_classes=3, in_chans=1, config=config)
    data = _engine_data()
    rows = torch.arange(len(data))
    before = float(evaluate(model, data, rows, device="cpu").loss.mean())
    fit(model, data, epochs=15, batch_size=8, device="cpu")  # AdamW, warm-up, cosine, clipping
    assert float(evaluate(model, data, rows, device="cpu").loss.mean()) < before


def test_fit_calls_its_hooks_and_trains_only_the_given_parameters() -> None:
    model = build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 2})
    data = _engine_data()
    head = list(model.net.get_submodule("fc").parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches, losses, epochs = [], [], []
    fit(
        model,
        data,
        torch.arange(20),
        epochs=2,
        batch_size=8,
        params=head,
        on_batch=batches.append,
        on_loss=lambda ids, loss: losses.append((ids, loss.shape)),
        on_epoch=epochs.append,
        device="cpu",
    )
    assert [len(b) for b in batches] == [8, 8, 4] * 2
    assert all(sorted(torch.cat(batches[i : i + 3]).tolist()) == list(range(20)) for i in (0, 3))
    assert [shape for _, shape in losses] == [torch.Size([len(b)]) for b in batches]
    assert [e.epoch for e in epochs] == [1, 2] and all(e.loss > 0 for e in epochs)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(
        k.startswith("net.fc.") or "running" in k or "num_batches" in k for k in changed
    )
    assert not model.training


def test_fit_ascends_and_stops_at_stop_loss() -> None:
    data = _engine_data()
    rows = torch.arange(24)
    plain = {"momentum": 0.0, "weight_decay": 0.0, "schedule": "constant", "mode": "eval"}

    def model() -> Classifier:
        torch.manual_seed(0)
        return build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 2})

    start = float(evaluate(model(), data, rows, device="cpu").loss.mean())
    ascended = fit(model(), data, rows, epochs=3, lr=0.5, ascend=True, device="cpu", **plain)
    assert float(evaluate(ascended, data, rows, device="cpu").loss.mean()) > start
    seen: list[int] = []
    stop = start + 0.01
    fit(
        model(),
        data,
        rows,
        epochs=50,
        lr=0.5,
        ascend=True,
        stop_loss=stop,
        device="cpu",
        on_epoch=lambda e: seen.append(e.epoch),
        **plain,
    )
    assert 1 <= len(seen) < 50  # stopped at the first batch whose loss passed stop_loss


def test_evaluate_and_accuracy_agree_with_predict() -> None:
    model = build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 2})
    data = _engine_data()
    rows = torch.tensor([0, 5, 7])
    found = evaluate(model, data, rows, device="cpu")
    pred = predict(model, data, rows, device="cpu")
    assert torch.equal(found.correct, pred == data.labels[rows])
    assert accuracy(model, data, rows, device="cpu") == float(found.correct.float().mean())
    assert torch.isnan(torch.tensor(accuracy(model, data, torch.tensor([], dtype=torch.long))))


def test_forget_sets_of_every_kind() -> None:
    labels = torch.arange(1000) % 10
    noisy = torch.arange(0, 1000, 10)  # 100 rows
    sets = forget_sets(labels, noisy, seed=0)
    assert set(sets) == set(FORGET_KINDS)
    assert torch.equal(sets["mislabeled"], noisy)
    assert len(sets["mislabeled-part"]) == 25 and set(sets["mislabeled-part"].tolist()) <= set(
        noisy.tolist()
    )
    for kind, size in (("random-1", 10), ("random-10", 100)):
        rows = sets[kind]
        assert len(rows) == size and not set(rows.tolist()) & set(noisy.tolist()), kind
    of_class = sets["class"]
    (target,) = set(labels[of_class].tolist())  # one class
    clean_of_class = [r for r in range(1000) if labels[r] == target and r % 10]
    assert len(of_class) == round(0.9 * len(clean_of_class))
    assert not set(of_class.tolist()) & set(noisy.tolist())
    assert all(torch.equal(sets[k], forget_sets(labels, noisy, seed=0)[k]) for k in sets)


def test_tiny_testbed_writes_its_forget_sets(tiny_testbed: Path) -> None:
    result = load_testbed(tiny_testbed)
    assert result is not None and set(result.forget_sets) == set(FORGET_KINDS)
    for path in result.forget_sets.values():
        assert read_ids(path)
