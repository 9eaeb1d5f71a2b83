"""Unlearning: every method returns the same result type; the output reloads as a plain model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from memaudit.cli import main
from memaudit.data import ImageDataset, load_dataset, write_ids
from memaudit.errors import MemauditError
from memaudit.models import Classifier, DataRef, Preprocess, build_model, load_model, save_model
from memaudit.schema import UnlearnReport
from memaudit.unlearn import (
    METHODS,
    UnlearnMethod,
    UnlearnResult,
    fresh_copy,
    mia_auc,
    register_method,
    unlearn,
)

FLAGGED = [1, 4, 7]


def tiny_model() -> Classifier:
    model = build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 2})
    model.info.preprocess = Preprocess(mean=(0.5,), std=(0.5,))
    return model


def tiny_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.integers(0, 255, (24, 8, 8), dtype=np.uint8),
        "train_labels": rng.integers(0, 3, 24),
        "test_images": rng.integers(0, 255, (12, 8, 8), dtype=np.uint8),
        "test_labels": rng.integers(0, 3, 12),
    }


@pytest.fixture()
def data() -> tuple[ImageDataset, ImageDataset]:
    arrays = tiny_arrays()
    pre = Preprocess(mean=(0.5,), std=(0.5,))
    train = ImageDataset(
        torch.as_tensor(arrays["train_images"])[:, None],
        torch.as_tensor(arrays["train_labels"]),
        pre,
    )
    test = ImageDataset(
        torch.as_tensor(arrays["test_images"])[:, None], torch.as_tensor(arrays["test_labels"]), pre
    )
    return train, test


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_returns_the_same_result(
    method: str, data: tuple[ImageDataset, ImageDataset]
) -> None:
    train, test = data
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    epochs = 2 if method == "example-tied-dropout" else 1  # a teacher epoch, a student epoch
    result = unlearn(
        model, train, FLAGGED, test=test, method=method, epochs=epochs, batch_size=8, device="cpu"
    )
    assert isinstance(result, UnlearnResult) and isinstance(result.model, Classifier)
    report = result.report
    assert report.method == method and report.n_flagged == 3 and report.n_retained == 21
    for scores in (report.before, report.after):
        for value in (scores.flagged_accuracy, scores.retained_accuracy, scores.test_accuracy):
            assert value is not None and 0 <= value <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert list(result.model.state_dict()) == list(before)  # a plain model, same keys
    assert report.recipe is not None and report.recipe.family == "batchnorm-cnn"
    assert report.settings["optimizer"] == "sgd" and report.settings["recipe"] == "batchnorm-cnn"


def test_etd_output_reloads_without_flags(
    tmp_path: Path, data: tuple[ImageDataset, ImageDataset]
) -> None:
    train, test = data
    result = unlearn(tiny_model(), train, FLAGGED, test=test, epochs=2, batch_size=8, device="cpu")
    path = save_model(result.model, tmp_path / "unlearned.safetensors")
    again = load_model(path)
    x = train.batch(torch.arange(5))
    torch.testing.assert_close(again(x), result.model.eval()(x))
    report = UnlearnReport.from_json(result.report.to_json(tmp_path / "r.json"))
    assert report == result.report


def test_compare_retrain_fills_the_retrain_block(data: tuple[ImageDataset, ImageDataset]) -> None:
    train, test = data
    result = unlearn(
        tiny_model(),
        train,
        FLAGGED,
        test=test,
        method="finetune",
        epochs=1,
        compare_retrain=True,
        retrain_epochs=1,
        device="cpu",
    )
    assert result.report.retrain is not None and result.retrained is not None
    gap = result.report.gap_to_retrain()
    assert gap is not None and 0 <= gap <= 1


def test_the_recipe_sets_the_rates_and_the_user_overrides_it(
    data: tuple[ImageDataset, ImageDataset],
) -> None:
    train, _ = data
    found = unlearn(tiny_model(), train, FLAGGED, method="gradient-ascent", epochs=1)
    assert found.report.settings["lr"] == pytest.approx(0.05 * 0.2)  # a share of the recipe's
    mine = unlearn(tiny_model(), train, FLAGGED, method="finetune", epochs=1, optimizer="adamw")
    assert mine.report.recipe is not None and mine.report.recipe.optimizer == "adamw"


def test_retraining_is_reproducible_from_its_seed(data: tuple[ImageDataset, ImageDataset]) -> None:
    """The retrained yardstick's initialization comes from the seed, not the caller's RNG."""
    train, _ = data

    def retrained(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed + 7)
        result = unlearn(tiny_model(), train, FLAGGED, method="retrain", epochs=1, seed=seed)
        return result.model.state_dict()

    first, again, other = retrained(0), retrained(0), retrained(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_bad_input_is_a_clear_error(data: tuple[ImageDataset, ImageDataset]) -> None:
    train, _ = data
    with pytest.raises(MemauditError, match="unknown unlearning method 'forget'"):
        unlearn(tiny_model(), train, FLAGGED, method="forget")
    with pytest.raises(MemauditError, match="out of range"):
        unlearn(tiny_model(), train, [3, 99])
    with pytest.raises(MemauditError, match="no flagged"):
        unlearn(tiny_model(), train, [])
    with pytest.raises(MemauditError, match="unknown option"):
        unlearn(tiny_model(), train, FLAGGED, options={"p_drop": 0.5})
    with pytest.raises(ValueError, match="already registered"):
        register_method("finetune", UnlearnMethod(lambda job: job.model, 1, 0.1, "again"))


def test_mia_auc_matches_pairwise_counting() -> None:
    gen = torch.Generator().manual_seed(0)
    members = torch.randint(0, 5, (40,), generator=gen).float()  # many ties
    others = torch.randint(0, 5, (30,), generator=gen).float()
    wins = (members[:, None] < others[None, :]).float() + 0.5 * (
        members[:, None] == others[None, :]
    ).float()
    assert mia_auc(members, others) == pytest.approx(float(wins.mean()))


def test_cli_writes_model_and_report(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    np.savez(tmp_path / "data.npz", **arrays)  # type: ignore[arg-type]  # numpy stubs: **kwds bool
    model = tiny_model()
    model_path = save_model(
        model,
        tmp_path / "model.safetensors",
        train_data=DataRef(source=str(tmp_path / "data.npz")),
    )
    ids = write_ids(tmp_path / "ids.txt", FLAGGED)
    code = main(
        [
            "unlearn",
            str(model_path),
            "--flagged",
            str(ids),
            "--out-model",
            str(tmp_path / "out.safetensors"),
            "--method",
            "finetune",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "unlearn.json"),
            "--html",
            str(tmp_path / "unlearn.html"),
            "--min-train-accuracy",  # a random model: the preflight check would refuse it
            "0",
        ]
    )
    assert code == 0
    assert "Before and after unlearning" in (tmp_path / "unlearn.html").read_text()
    report = UnlearnReport.from_json(tmp_path / "unlearn.json")
    assert report.n_flagged == 3 and report.out_model is not None
    load_model(report.out_model)  # plain checkpoint, no flags
    train = load_dataset(tmp_path / "data.npz", split="train", model=model)
    assert report.n_retained == len(train) - 3
    bad = main(
        [
            "unlearn",
            str(model_path),
            "--flagged",
            str(ids),
            "--out-model",
            str(tmp_path / "x.safetensors"),
            "--method",
            "nope",
        ]
    )
    assert bad == 2


def test_fresh_copy_of_a_hugging_face_model_draws_every_weight_anew(
    hf_dirs: dict[str, Path],
) -> None:
    """Retraining starts from scratch: the ViT's class token and position embeddings, which no
    ``reset_parameters`` holds, are drawn anew too; the info is kept."""
    model = load_model(hf_dirs["vit"])
    torch.manual_seed(12345)  # not the seed the saved (untrained) model was drawn with
    fresh = fresh_copy(model)
    old, new = model.state_dict(), fresh.state_dict()
    assert old.keys() == new.keys() and fresh.info == model.info
    changed = {k for k in old if old[k].is_floating_point() and not torch.equal(old[k], new[k])}
    assert {k for k in old if "embeddings" in k and "patch" not in k} <= changed
    assert {k for k in old if k.endswith("weight") and old[k].dim() > 1} <= changed


def test_example_tied_dropout_takes_its_family_defaults(hf_dirs: dict[str, Path]) -> None:
    """Transformers get ETD after every layer with their own p_gen and epochs (measured, see
    the method's docstring); given options and epochs still win; layers=mlp is the other
    placement."""
    etd = METHODS["example-tied-dropout"]
    assert etd.defaults("batchnorm-cnn") == (5, dict(etd.options))
    assert etd.options["distil"] is True
    epochs, options = etd.defaults("transformer")
    assert epochs == 16 and options["p_gen"] == 0.7 and options["layers"] == "every"
    assert options["distil"] is False  # the teacher-student steps are not measured there
    model = load_model(hf_dirs["vit"])
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 16, 16), generator=gen, dtype=torch.uint8)
    train = ImageDataset(images, torch.randint(0, 4, (16,), generator=gen))
    report = unlearn(model, train, [1, 4], batch_size=8, budget=0.1, device="cpu").report
    assert report.settings["p_gen"] == 0.7 and report.settings["recipe"] == "transformer"
    assert report.settings["epochs"] == 3  # the budget: a tenth of the recipe's 30
    mlp = unlearn(model, train, [1, 4], epochs=1, options={"layers": "mlp", "p_gen": 0.5})
    assert mlp.report.settings["layers"] == "mlp" and mlp.report.settings["p_gen"] == 0.5
    with pytest.raises(MemauditError, match="option layers must be 'every' or 'mlp'"):
        unlearn(model, train, [1, 4], epochs=1, options={"layers": "attention"})
