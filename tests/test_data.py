"""load_dataset: every format, column detection, preprocessing, and the flagged-ids file rules."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import random_images, save_hf, tiny_cnn
from PIL import Image

from memaudit.data import ImageDataset, load_dataset, read_ids, write_ids
from memaudit.errors import MemauditError, MissingSplitError
from memaudit.models import Preprocess, load_model

NAMES = ["cat", "dog", "fox"]
LABELS = [0, 1, 2, 0, 1, 2]


def _hf_dataset(
    n: int = 6, *, channels: int = 3, image: str = "image", label: str = "label"
) -> datasets.Dataset:
    images = [Image.fromarray(a) for a in random_images(n, channels=channels)]
    features = datasets.Features(
        {
            image: datasets.Image(),
            label: datasets.ClassLabel(names=NAMES),
            "uid": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {image: images, label: LABELS[:n], "uid": [100 + i for i in range(n)]}, features=features
    )


def _check(data: ImageDataset, n: int = 6, *, channels: int = 3, size: int = 8) -> None:
    assert data.images.dtype == torch.uint8 and data.images.shape == (n, channels, size, size)
    assert data.labels.tolist() == LABELS[:n]
    assert data.batch(torch.arange(2)).dtype == torch.float32


# --- formats -------------------------------------------------------------------------------------


def test_save_to_disk_dataset(tmp_path: Path) -> None:
    ds = _hf_dataset()
    ds.save_to_disk(tmp_path / "ds")
    data = load_dataset(tmp_path / "ds")
    _check(data)
    assert data.class_names == NAMES and data.num_classes == 3
    expected = np.array(ds[2]["image"]).transpose(2, 0, 1)
    assert torch.equal(data.images[2], torch.from_numpy(expected))
    assert data.ref.source == str(tmp_path / "ds") and data.ref.split == "train"
    with pytest.raises(MissingSplitError, match="single split"):
        load_dataset(tmp_path / "ds", split="test")


def test_save_to_disk_dataset_dict(tmp_path: Path) -> None:
    ds = _hf_dataset()
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(tmp_path / "dd")
    _check(load_dataset(tmp_path / "dd"))
    _check(load_dataset(tmp_path / "dd", split="test"), n=3)
    with pytest.raises(MissingSplitError, match="no split 'validation'"):
        load_dataset(tmp_path / "dd", split="validation")


def test_parquet_file_and_directory(tmp_path: Path) -> None:
    ds = _hf_dataset()
    ds.to_parquet(str(tmp_path / "one.parquet"))
    _check(load_dataset(tmp_path / "one.parquet"))
    (tmp_path / "splits").mkdir()
    ds.to_parquet(str(tmp_path / "splits" / "train-00000.parquet"))
    ds.select(range(3)).to_parquet(str(tmp_path / "splits" / "test-00000.parquet"))
    _check(load_dataset(tmp_path / "splits"))
    _check(load_dataset(tmp_path / "splits", split="test"), n=3)
    with pytest.raises(MissingSplitError):
        load_dataset(tmp_path / "splits", split="validation")


def _image_folder(root: Path, *, splits: bool) -> None:
    for i, (array, label) in enumerate(zip(random_images(6), LABELS, strict=True)):
        for split in ("train", "test") if splits else ("",):
            folder = root / split / NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / f"{i}.png")


def test_image_folder_with_and_without_splits(tmp_path: Path) -> None:
    _image_folder(tmp_path / "split", splits=True)
    _image_folder(tmp_path / "flat", splits=False)
    for data in (
        load_dataset(tmp_path / "split"),
        load_dataset(tmp_path / "split", split="test"),
        load_dataset(tmp_path / "flat"),
    ):
        assert data.images.shape == (6, 3, 8, 8) and data.class_names == NAMES
        assert sorted(data.labels.tolist()) == sorted(LABELS)
    with pytest.raises(MissingSplitError):
        load_dataset(tmp_path / "flat", split="test")


def test_hf_formats_load_offline_in_a_fresh_process(tmp_path: Path) -> None:
    # datasets' parquet/imagefolder builders must not reach the hub with HF_DATASETS_OFFLINE=1.
    _image_folder(tmp_path / "folder", splits=True)
    _hf_dataset().to_parquet(str(tmp_path / "d.parquet"))
    code = (
        "import sys; from memaudit.data import load_dataset; "
        "print(len(load_dataset(sys.argv[1])), len(load_dataset(sys.argv[2])))"
    )
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "folder"), str(tmp_path / "d.parquet")],
        capture_output=True,
        text=True,
        env={**env, "HF_HOME": str(tmp_path / "hf_home")},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["6", "6"]


def test_npz_plain_and_split_arrays(make_npz: Callable[..., Path]) -> None:
    images = random_images(6, channels=1)
    plain = make_npz("plain.npz", images=images, labels=np.array(LABELS))
    data = load_dataset(plain)
    _check(data, channels=1)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    with pytest.raises(MissingSplitError):  # a plain npz holds one split, not a test split
        load_dataset(plain, split="test")

    keras = make_npz(
        "keras.npz",
        x_train=images,
        y_train=np.array(LABELS),
        x_test=images[:3],
        y_test=np.arange(3),
    )
    _check(load_dataset(keras, split="test"), n=3, channels=1)


def test_npz_flat_rows_and_float_images(make_npz: Callable[..., Path]) -> None:
    flat = random_images(6, channels=1).reshape(6, 64)
    _check(load_dataset(make_npz("flat.npz", x=flat, y=np.array(LABELS))), channels=1)
    floats = random_images(6).astype(np.float32) / 255  # NHWC floats in [0, 1]
    data = load_dataset(make_npz("float.npz", images=floats, labels=np.array(LABELS)))
    _check(data)
    assert torch.equal(data.images.permute(0, 2, 3, 1), torch.from_numpy(random_images(6)))


def test_npz_of_the_testbed_layout(make_npz: Callable[..., Path]) -> None:
    path = make_npz(
        "data.npz",
        train_images=random_images(6, channels=1),
        train_labels=np.array(LABELS),
        train_true_labels=np.array(LABELS),
        test_images=random_images(3, channels=1),
        test_labels=np.array(LABELS[:3]),
        class_names=np.array(NAMES),
    )
    train, test = load_dataset(path), load_dataset(path, split="test")
    _check(train, channels=1)
    _check(test, n=3, channels=1)
    assert train.class_names == NAMES
    true = load_dataset(path, label_column="train_true_labels")
    assert true.labels.tolist() == LABELS
    assert load_dataset(path, split="test", label_column="labels").labels.tolist() == LABELS[:3]
    with pytest.raises(MissingSplitError):  # a named train array is not the test split's
        load_dataset(path, split="test", label_column="train_true_labels")
    with pytest.raises(MissingSplitError, match="split 'validation'"):
        load_dataset(path, split="validation")


def test_unknown_source_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(MemauditError, match="not a dataset memaudit reads"):
        load_dataset(tmp_path / "x.csv")
    with pytest.raises(MemauditError, match="not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(MemauditError, match=r"not a readable \.npz"):
        load_dataset(tmp_path / "bad.npz")


# --- columns -------------------------------------------------------------------------------------


def test_columns_detected_and_overridden(tmp_path: Path) -> None:
    _hf_dataset(image="img", label="labels").save_to_disk(tmp_path / "auto")
    _check(load_dataset(tmp_path / "auto"))

    _hf_dataset(image="picture", label="target").save_to_disk(tmp_path / "custom")
    with pytest.raises(MemauditError, match=r"no image column.*--image-column"):
        load_dataset(tmp_path / "custom")
    with pytest.raises(MemauditError, match=r"no label column.*--label-column"):
        load_dataset(tmp_path / "custom", image_column="picture")
    with pytest.raises(MemauditError, match="no column 'wrong'"):
        load_dataset(tmp_path / "custom", image_column="picture", label_column="wrong")
    data = load_dataset(tmp_path / "custom", image_column="picture", label_column="target")
    _check(data)
    assert data.ref.image_column == "picture" and data.ref.label_column == "target"


def test_npz_missing_label_array_is_clear(make_npz: Callable[..., Path]) -> None:
    path = make_npz(images=random_images(4))
    with pytest.raises(MemauditError, match=r"no label array.*--label-column"):
        load_dataset(path)


def test_id_column_maps_ids_to_rows(tmp_path: Path) -> None:
    _hf_dataset().save_to_disk(tmp_path / "ds")
    data = load_dataset(tmp_path / "ds", id_column="uid")
    assert data.rows([105, 100]).tolist() == [5, 0]
    with pytest.raises(MemauditError, match="id 3 is not in the id column"):
        data.rows([3])


# --- preprocessing -------------------------------------------------------------------------------


def test_default_preprocessing_keeps_size_and_uses_half(make_npz: Callable[..., Path]) -> None:
    data = load_dataset(make_npz(images=random_images(4), labels=np.arange(4)))
    assert data.preprocess == Preprocess()
    x = data.batch(torch.arange(4))
    expected = (data.images.float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, expected)


def test_preprocessing_from_hf_processor_and_overrides(tmp_path: Path) -> None:
    model = load_model(save_hf("vit", tmp_path / "vit", processor=True))
    np.savez(tmp_path / "d.npz", images=random_images(4), labels=np.arange(4))
    data = load_dataset(tmp_path / "d.npz", model=model)
    assert data.images.shape == (4, 3, 12, 12)
    assert data.preprocess == Preprocess(image_size=12, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    x = data.batch(torch.tensor([0]))
    torch.testing.assert_close(x[0, 2], (data.images[0, 2].float() / 255 - 0.6) / 0.4)

    custom = load_dataset(tmp_path / "d.npz", model=model, image_size=10, mean=[0.1], std=[0.2])
    assert custom.images.shape == (4, 3, 10, 10)
    assert custom.preprocess == Preprocess(image_size=10, mean=(0.1,), std=(0.2,))
    per_channel = load_dataset(tmp_path / "d.npz", mean=[0.1, 0.2, 0.3], std=[1, 2, 3])
    x = per_channel.batch(torch.tensor([1]))
    torch.testing.assert_close(x[0, 1], (per_channel.images[1, 1].float() / 255 - 0.2) / 2)
    with pytest.raises(MemauditError, match="give one value or 3"):
        load_dataset(tmp_path / "d.npz", mean=[0.1, 0.2])


def test_preprocessing_from_memaudit_checkpoint(tmp_path: Path) -> None:
    from memaudit.models import build_model, save_model

    model = build_model("memaudit:resnet9", num_classes=4, in_chans=1)
    model.info.preprocess = Preprocess(image_size=6, mean=(0.2,), std=(0.4,))
    loaded = load_model(save_model(model, tmp_path / "m.safetensors"))
    np.savez(tmp_path / "d.npz", images=random_images(4, channels=1), labels=np.arange(4))
    data = load_dataset(tmp_path / "d.npz", model=loaded)
    assert data.images.shape == (4, 1, 6, 6) and data.preprocess == model.info.preprocess


def test_gray_and_rgb_convert_to_the_model(make_npz: Callable[..., Path]) -> None:
    gray = make_npz("gray.npz", images=random_images(4, channels=1), labels=np.arange(4))
    rgb = make_npz("rgb.npz", images=random_images(4), labels=np.arange(4))
    rgb_model = load_model(tiny_cnn(in_chans=3, num_classes=4))
    rgb_model.info.in_chans = 3
    gray_model = load_model(tiny_cnn(in_chans=1, num_classes=4))
    gray_model.info.in_chans = 1

    as_rgb = load_dataset(gray, model=rgb_model)
    assert as_rgb.images.shape == (4, 3, 8, 8)
    assert torch.equal(as_rgb.images[:, 0], as_rgb.images[:, 2])
    as_gray = load_dataset(rgb, model=gray_model)
    assert as_gray.images.shape == (4, 1, 8, 8)
    assert load_dataset(rgb, channels=1).images.shape == (4, 1, 8, 8)
    # RGB statistics on a gray model: averaged to one channel.
    assert load_dataset(gray, mean=[0.3, 0.4, 0.5]).batch(torch.arange(1)).shape == (1, 1, 8, 8)


def test_more_classes_than_the_model_is_clear(make_npz: Callable[..., Path]) -> None:
    model = load_model(tiny_cnn(in_chans=1, num_classes=3))
    path = make_npz(images=random_images(5, channels=1), labels=np.arange(5))
    with pytest.raises(MemauditError, match="5 classes but the model has 3 outputs"):
        load_dataset(path, model=model)
    named = make_npz(
        "named.npz",
        images=random_images(2, channels=1),
        labels=np.zeros(2),
        class_names=np.array([*NAMES, "x"]),
    )
    with pytest.raises(MemauditError, match="4 classes but the model has 3"):
        load_dataset(named, model=model)


# --- flagged ids ---------------------------------------------------------------------------------


def test_read_ids_comments_blanks_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("# flagged\n\n3\n 7  # inline note\n3\n\n12\n7\n")
    with pytest.warns(UserWarning, match="dropped 2 duplicate ids"):
        assert read_ids(path) == [3, 7, 12]


def test_read_ids_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n2\nthree\n")
    with pytest.raises(MemauditError, match=r"bad\.txt:3: 'three' is not an integer"):
        read_ids(bad)
    bad.write_text("1.5\n")
    with pytest.raises(MemauditError, match="not an integer"):
        read_ids(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(MemauditError, match="lists no example ids"):
        read_ids(empty)
    with pytest.raises(MemauditError, match="not found"):
        read_ids(tmp_path / "missing.txt")


def test_write_then_read_ids(tmp_path: Path) -> None:
    path = write_ids(tmp_path / "sub" / "ids.txt", [5, 1, 9], comment="noisy rows\nseed 0")
    assert path.read_text().startswith("# noisy rows\n# seed 0\n")
    assert read_ids(path) == [5, 1, 9]


def test_ids_out_of_range_are_clear() -> None:
    data = ImageDataset(
        torch.zeros(5, 1, 4, 4, dtype=torch.uint8), torch.zeros(5, dtype=torch.long)
    )
    assert data.rows([4, 0]).tolist() == [4, 0]
    with pytest.raises(MemauditError, match=r"example id 5 is out of range.*ids 0-4"):
        data.rows([1, 5])
    with pytest.raises(MemauditError, match="example id -1 is out of range"):
        data.rows([-1])
