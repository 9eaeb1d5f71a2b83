"""``memaudit scan`` end to end on a tiny memaudit checkpoint, and its bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from memaudit.cli import main
from memaudit.models import DataRef, Preprocess, build_model, save_model
from memaudit.schema import ScanReport


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet-9 checkpoint that records its (npz) training data, plus id files."""
    root = tmp_path_factory.mktemp("scan-cli")
    rng = np.random.default_rng(0)
    np.savez(
        root / "data.npz",
        train_images=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8),
        train_labels=np.arange(30) % 3,
        test_images=rng.integers(0, 256, (10, 8, 8), dtype=np.uint8),
        test_labels=np.arange(10) % 3,
    )
    np.savez(
        root / "five_classes.npz",
        images=rng.integers(0, 256, (10, 8, 8), dtype=np.uint8),
        labels=np.arange(10) % 5,
    )
    torch.manual_seed(0)
    model = build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 2})
    model.info.preprocess = Preprocess(image_size=8, mean=(0.5,), std=(0.5,))
    save_model(model, root / "model.safetensors", train_data=DataRef(source=str(root / "data.npz")))
    bare = build_model("memaudit:resnet9", num_classes=3, in_chans=1)  # default width: --arch fits
    torch.save(bare.net.state_dict(), root / "weights.pt")
    (root / "ids.txt").write_text("# flagged\n0\n1\n2\n")
    (root / "out_of_range.txt").write_text("3\n30\n")
    (root / "empty.txt").write_text("# nothing\n\n")
    return root


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


def test_scan_works_as_typed_without_data(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = workdir / "scan.json"
    rc = main(
        [
            "scan",
            str(workdir / "model.safetensors"),
            "--flagged",
            str(workdir / "ids.txt"),
            "--out",
            str(out),
            "--max-units",
            "8",
            "--reference-size",
            "8",
            "--eval-size",
            "5",
            "--html",
            str(workdir / "scan.html"),
            "--min-train-accuracy",  # a random model: the preflight check would refuse it
            "0",
        ]
    )
    assert rc == 0
    assert "<svg" in (workdir / "scan.html").read_text()
    report = ScanReport.from_json(out)
    assert [e.id for e in report.examples] == [0, 1, 2]
    assert report.data.split == "train" and report.data.test_split == "test"
    assert report.data.n_test == 10
    assert not out.with_suffix(".journal.jsonl").exists()  # removed once the report is written
    assert "flagged examples" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("ids_file", "extra", "needles"),
    [
        ("out_of_range.txt", [], ["out of range", "30"]),
        ("empty.txt", [], ["no example ids"]),
        ("missing.txt", [], ["not found"]),
        ("ids.txt", ["--data", "five_classes.npz"], ["5 classes", "3 outputs"]),
        ("ids.txt", ["--scorer", "magic"], ["unknown scorer"]),
        ("ids.txt", ["--device", "cuda"], ["cuda"]),
    ],
)
def test_scan_bad_inputs_exit_2_with_one_line(
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    ids_file: str,
    extra: list[str],
    needles: list[str],
) -> None:
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is not an error here")
    extra = [str(workdir / e) if e.endswith(".npz") else e for e in extra]
    rc = main(
        ["scan", str(workdir / "model.safetensors"), "--flagged", str(workdir / ids_file), *extra]
    )
    assert rc == 2
    _one_line_error(capsys, *needles)


def test_scan_of_a_bare_state_dict_asks_for_data(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "scan",
            str(workdir / "weights.pt"),
            "--arch",
            "memaudit:resnet9",
            "--flagged",
            str(workdir / "ids.txt"),
        ]
    )
    assert rc == 2
    _one_line_error(capsys, "--data")
