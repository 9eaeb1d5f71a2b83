"""A user's own model: preprocessing that matches training, and the preflight check before work.

The fixture trains a tiny timm CNN at 32x32 (mean 0.5 / std 0.5, the way its owner did) and
hands it over as a plain state dict with a ``datasets`` folder of 32x32 images: nothing in
either says how the images were preprocessed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memaudit.auditor import Auditor
from memaudit.cli import main
from memaudit.data import ImageDataset, load_dataset, write_ids
from memaudit.errors import MemauditError
from memaudit.models import Preprocess, build_model, load_model
from memaudit.preflight import default_min_accuracy, preflight
from memaudit.schema import AuditReport, GradientsReport, ScanReport, UnlearnReport

SIZE, CLASSES = 32, 3
FLAGGED = [0, 1, 2]


def bars(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy 32x32 gray images; class c has a bright band in the c-th third of the rows."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    images = rng.integers(0, 90, (n, SIZE, SIZE)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, c * 10 : c * 10 + 10] += 150
    return images, labels


def save_folder(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], rgb: bool) -> Path:
    import datasets
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["top", "mid", "low"])}
    )
    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    "image": [Image.fromarray(a).convert("RGB" if rgb else "L") for a in images],
                    "label": [int(v) for v in labels],
                },
                features=features,
            )
            for split, (images, labels) in splits.items()
        }
    ).save_to_disk(str(path))
    return path


def train_timm(images: np.ndarray, labels: np.ndarray, in_chans: int) -> tuple[object, float]:
    """A timm test_resnet trained the owner's way: 32x32, mean 0.5 / std 0.5."""
    torch.manual_seed(0)
    model = build_model("timm:test_resnet", num_classes=CLASSES, in_chans=in_chans)
    x = torch.as_tensor(images).float().div(255).sub(0.5).div(0.5)[:, None]
    x = x.expand(-1, in_chans, -1, -1)
    y = torch.as_tensor(labels)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(25):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    return model, acc


def _owner(root: Path, chans: int) -> dict:
    """The owner's trained model as a plain state dict, and the data as a datasets folder."""
    train, test = bars(60, seed=0), bars(30, seed=1)
    model, acc = train_timm(*train, in_chans=chans)
    assert acc == 1.0  # the owner's model fits its training data
    torch.save(model.net.state_dict(), root / "weights.pt")  # type: ignore[attr-defined]
    shifted = (train[0], (train[1] + 1) % CLASSES), (test[0], (test[1] + 1) % CLASSES)
    return {
        "root": root,
        "chans": chans,
        "weights": root / "weights.pt",
        "data": save_folder(root / "data", {"train": train, "test": test}, rgb=chans == 3),
        "shifted": save_folder(
            root / "shifted", {"train": shifted[0], "test": shifted[1]}, rgb=chans == 3
        ),
        "ids": write_ids(root / "ids.txt", FLAGGED),
        "train_accuracy": acc,
    }


@pytest.fixture(scope="module", params=[1, 3], ids=["gray", "rgb"])
def owner(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _owner(tmp_path_factory.mktemp(f"owner{request.param}"), int(request.param))


def _scan(owner: dict, *extra: str, data: str = "data", out: Path | None = None) -> int:
    return main(
        [
            "scan",
            str(owner["weights"]),
            "--arch",
            "timm:test_resnet",
            "--flagged",
            str(owner["ids"]),
            "--data",
            str(owner[data]),
            "--out",
            str(out or owner["root"] / "scan.json"),
            "--max-units",
            "4",
            "--reference-size",
            "8",
            "--eval-size",
            "8",
            "--no-prune",
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_a_state_dict_scores_as_trained_with_no_preprocessing_flags(owner: dict) -> None:
    model = load_model(owner["weights"], arch="timm:test_resnet")
    train = load_dataset(owner["data"], split="train", model=model)
    assert model.info.preprocess is None  # timm's 160x160 pretrained config is not imposed
    assert train.images.shape[1:] == (owner["chans"], SIZE, SIZE)
    assert train.preprocessing.image_size == (SIZE, SIZE) and not train.preprocessing.resized
    assert "kept as stored" in train.preprocessing.origin
    checked = Auditor(model, train, device="cpu").preflight(FLAGGED)
    assert checked.train_accuracy == owner["train_accuracy"] == 1.0

    assert _scan(owner) == 0
    report = ScanReport.from_json(owner["root"] / "scan.json")
    assert report.preflight is not None and report.preflight.train_accuracy == 1.0
    assert report.preflight.preprocessing.image_size == (SIZE, SIZE)
    assert report.summary.n_misclassified == 0  # every flagged id is searched


@pytest.mark.parametrize(
    ("extra", "data", "cause"),
    [
        ((), "shifted", "--class-map"),  # labels shifted by one: the model is always wrong
        (("--mean", "0.05", "--std", "0.01"), "data", "--mean/--std"),  # wrong statistics
    ],
    ids=["labels-shifted", "wrong-statistics"],
)
def test_a_model_at_chance_stops_with_exit_2_and_the_cause(
    owner: dict, extra: tuple[str, ...], data: str, cause: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = owner["root"] / "refused.json"
    out.unlink(missing_ok=True)
    capsys.readouterr()
    assert _scan(owner, *extra, data=data, out=out) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "preflight" in err[0] and cause in err[0]
    assert "--min-train-accuracy 0" in err[0] and not out.exists()
    assert _scan(owner, *extra, "--min-train-accuracy", "0", data=data, out=out) == 0  # opt-in


def test_every_report_carries_preprocessing_and_preflight(tmp_path: Path) -> None:
    owner = _owner(tmp_path, 1)
    base = [str(owner["weights"]), "--arch", "timm:test_resnet", "--flagged", str(owner["ids"])]
    base += ["--data", str(owner["data"]), "--device", "cpu", "--method", "finetune"]
    unlearn = ["unlearn", *base, "--epochs", "1", "--out", str(tmp_path / "u.json")]
    assert main([*unlearn, "--out-model", str(tmp_path / "u.safetensors")]) == 0
    unlearned = UnlearnReport.from_json(tmp_path / "u.json")
    assert unlearned.preflight is not None and unlearned.preflight.train_accuracy == 1.0
    # the unlearned model records the preprocessing it was measured with: no flags to reload
    reloaded = load_model(tmp_path / "u.safetensors")
    assert reloaded.info.preprocess == Preprocess(mean=(0.5,), std=(0.5,))  # size: as stored
    audit = ["audit", *base, "--epochs", "1", "--max-units", "4"]
    assert main([*audit, "--out-dir", str(tmp_path / "audit")]) == 0
    report = AuditReport.from_json(tmp_path / "audit" / "audit.json")
    assert report.scan.preflight is not None and report.rescan is not None
    assert report.rescan.preflight is not None and report.unlearn is not None
    assert report.unlearn.preflight == report.scan.preflight  # one check, run once
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert "32×32 as stored" in page and "Preflight" in page
    assert "Preflight" in (tmp_path / "audit" / "audit.md").read_text()
    probe = ["probe", "gradients", *base[:-2], "--out", str(tmp_path / "g.json")]
    assert main(probe) == 0
    probed = GradientsReport.from_json(tmp_path / "g.json").preflight
    assert probed is not None and probed.preprocessing == report.scan.preflight.preprocessing
    assert probed.train_accuracy == report.scan.preflight.train_accuracy


def test_the_refusal_of_resized_images_names_the_size_and_image_size() -> None:
    model = build_model("timm:test_resnet", num_classes=CLASSES, in_chans=1)  # untrained
    images, labels = bars(40, seed=2)
    big = F.interpolate(torch.as_tensor(images)[:, None].float(), size=160).to(torch.uint8)
    data = ImageDataset(big, torch.as_tensor(labels), native_shape=(1, SIZE, SIZE))
    with pytest.raises(MemauditError) as refused:
        preflight(model, data, FLAGGED)
    message = str(refused.value)
    assert "resized from 32×32 to 160×160; --image-size 32 keeps them" in message
    assert "\n" not in message
    assert preflight(model, data, FLAGGED, min_train_accuracy=0).n_train == 37


def test_default_threshold_is_a_quarter_of_the_way_from_chance() -> None:
    assert default_min_accuracy(0.1) == pytest.approx(0.325)
    assert default_min_accuracy(0.5) == pytest.approx(0.625)


# --- consistency checks that cost nothing: each a one-line error, exit 2 ----------------------


def _one_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(n in errors[0] for n in needles), errors[0]


@pytest.fixture(scope="module")
def gray(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _owner(tmp_path_factory.mktemp("gray"), 1)


def test_weights_holding_nan_are_refused(
    gray: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = torch.load(gray["weights"])
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    capsys.readouterr()
    assert _scan({**gray, "weights": tmp_path / "nan.pt"}, out=tmp_path / "s.json") == 2
    _one_error(capsys, "NaN", repr(first))


def test_a_class_count_that_differs_from_the_data_is_refused_unless_mapped(
    gray: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    five = build_model("timm:test_resnet", num_classes=5, in_chans=1)
    torch.save(five.net.state_dict(), tmp_path / "five.pt")
    owner = {**gray, "weights": tmp_path / "five.pt"}
    capsys.readouterr()
    assert _scan(owner, out=tmp_path / "s.json") == 2
    _one_error(capsys, "declares 3 classes but the model has 5 outputs", "--class-map")
    mapped = ("--class-map", "4,0,2", "--min-train-accuracy", "0")  # untrained: audit anyway
    assert _scan(owner, *mapped, out=tmp_path / "s.json") == 0
    report = ScanReport.from_json(tmp_path / "s.json")
    assert [e.label for e in report.examples] == [4, 0, 2]  # ids 0, 1, 2 have labels 0, 1, 2
    assert _scan(owner, "--class-map", "0,1", out=tmp_path / "s.json") == 2
    _one_error(capsys, "--class-map gives 2 outputs", "3 classes")


def test_npz_with_more_images_than_labels_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 255, (50, 8, 8)), labels=np.zeros(40))
    model = build_model("memaudit:resnet9", num_classes=3, in_chans=1)
    torch.save(model.net.state_dict(), tmp_path / "m.pt")
    write_ids(tmp_path / "ids.txt", [0])
    argv = ["scan", str(tmp_path / "m.pt"), "--arch", "memaudit:resnet9", "--data"]
    argv += [str(tmp_path / "d.npz"), "--flagged", str(tmp_path / "ids.txt")]
    capsys.readouterr()
    assert main(argv) == 2
    _one_error(capsys, "50 images but 40 labels")


@pytest.mark.parametrize("command", ["scan", "unlearn", "audit", "probe"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    gray: dict, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    blocked = str(tmp_path / "file" / "sub" / "out.json")
    option = {"scan": "--out", "unlearn": "--out-model", "audit": "--out-dir", "probe": "--out"}
    argv = {"probe": ["probe", "gradients"]}.get(command, [command])
    argv += [str(gray["weights"]), "--arch", "timm:test_resnet", "--data", str(gray["data"])]
    argv += ["--flagged", str(gray["ids"]), option[command], blocked]
    capsys.readouterr()
    assert main(argv) == 2
    _one_error(capsys, blocked, "is a file")
    assert not capsys.readouterr().err.startswith("inputs:")  # refused before loading


def test_flagged_labels_the_model_never_predicts_are_a_warning() -> None:
    nn = torch.nn
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4))
    nn.init.zeros_(net[3].weight)
    with torch.no_grad():
        net[3].bias.copy_(torch.tensor([1.0, 0.0, 0.0, -1.0]))  # always class 0
    model = load_model(net)
    labels = torch.zeros(10, dtype=torch.long)
    labels[:2] = 3  # the flagged ids carry a label the model never outputs
    data = ImageDataset(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), labels)
    checked = preflight(model, data, [0, 1])
    assert checked.train_accuracy == 1.0
    assert any(
        "2 flagged ids have given labels the model never predicts" in w for w in checked.warnings
    )
    audit = Auditor(model, data, device="cpu").scan([0, 1], max_units=2, eval_size=0)
    assert audit.preflight is not None and audit.preflight.warnings == checked.warnings


def test_a_weak_model_is_audited_with_a_warning() -> None:
    model = build_model("timm:test_resnet", num_classes=CLASSES, in_chans=1)
    images, labels = bars(40, seed=3)
    data = ImageDataset(torch.as_tensor(images)[:, None], torch.as_tensor(labels))
    checked = preflight(model, data, FLAGGED, min_train_accuracy=0)
    assert checked.train_accuracy is not None and checked.train_accuracy < 0.9
    assert any("means little" in w for w in checked.warnings)


def test_a_fixed_size_vit_gets_its_configured_size(tmp_path: Path) -> None:
    from conftest import save_hf

    images, labels = bars(12, seed=4)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    hf = load_model(save_hf("vit", tmp_path / "vit", num_labels=CLASSES, num_channels=1))
    data = load_dataset(tmp_path / "d.npz", model=hf)
    assert data.preprocessing.image_size == (16, 16) and data.preprocessing.resized
    assert "image_size" in data.preprocessing.origin
    vit = build_model("timm:test_vit", num_classes=CLASSES, in_chans=1, config={"img_size": 24})
    data = load_dataset(tmp_path / "d.npz", model=vit)
    assert data.images.shape[-2:] == (24, 24) and "img_size" in data.preprocessing.origin
