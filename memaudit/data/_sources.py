"""Reading datasets from disk into an :class:`ImageDataset`: :func:`load_dataset`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from memaudit.data._dataset import ImageDataset, preprocess_origin, resolve_preprocess
from memaudit.errors import MemauditError, MissingSplitError
from memaudit.models import Classifier, DataRef

IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels")
_NPZ_IMAGE_KEYS = ("images", "image", "x", "X")
_NPZ_LABEL_KEYS = ("labels", "label", "y")


def load_dataset(
    source: str | os.PathLike[str],
    *,
    split: str = "train",
    model: Classifier | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channels: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    class_map: Sequence[int] | None = None,
) -> ImageDataset:
    """Load one split of an image dataset, preprocessed for ``model``.

    Sources: a ``datasets`` ``save_to_disk`` directory (Dataset or DatasetDict), a ``.parquet``
    file or a directory of them (split from file names), an image folder (``class/x.png``, or
    ``split/class/x.png``), or an ``.npz`` with ``images``/``labels`` (or ``SPLIT_images`` /
    ``SPLIT_labels``, ``x_SPLIT`` / ``y_SPLIT``) arrays. ``class_map[i]`` is the model output
    that data label ``i`` means, for data whose classes are not the model's in the same order.
    """
    path = Path(source)
    if not path.exists():
        raise MemauditError(f"data {str(source)!r} not found: give an existing file or directory")
    prep = resolve_preprocess(model, image_size=image_size, mean=mean, std=std)
    chans = channels or (model.info.in_chans if model is not None else None)
    ref = DataRef(
        source=str(path),
        split=split,
        image_column=image_column,
        label_column=label_column,
        class_map=list(class_map) if class_map is not None else None,
    )
    if path.suffix == ".npz":
        images, labels, names, ids = _from_npz(path, split, image_column, label_column)
    else:
        images, labels, names, ids = _from_hf(
            _hf_split(path, split), str(path), split, image_column, label_column, id_column
        )
    if class_map is not None:
        labels, names = _map_classes(labels, names, class_map, model, str(path))
    native = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    images = _fit(images, chans, prep.image_size)
    origin = preprocess_origin(model, image_size=image_size, mean=mean, std=std)
    data = ImageDataset(images, labels, prep, names, ref, ids, native, origin)
    if model is not None:
        check_compatible(model, data)
    return data


def check_compatible(model: Classifier, data: ImageDataset) -> None:
    """Refuse data whose labels the model cannot output, or whose declared classes differ."""
    outputs = model.info.num_classes
    names = data.class_names
    if names and len(names) != outputs:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise MemauditError(
            f"the data declares {len(names)} classes but the model has {outputs} outputs (data "
            f"classes: {shown}); pass the model trained on this data, or say which output each "
            "data label is with --class-map (class_map=)"
        )
    if data.num_classes > outputs:
        raise MemauditError(
            f"the data has {data.num_classes} classes but the model has {outputs} outputs; pass "
            "the model trained on this data, or map the labels with --class-map (class_map=)"
        )


def _map_classes(
    labels: torch.Tensor,
    names: list[str] | None,
    class_map: Sequence[int],
    model: Classifier | None,
    src: str,
) -> tuple[torch.Tensor, list[str]]:
    """Labels and class names in the model's classes: data label ``i`` -> ``class_map[i]``."""
    n_data = len(names) if names else (int(labels.max()) + 1 if len(labels) else 0)
    outputs = model.info.num_classes if model is not None else max(class_map, default=-1) + 1
    if len(class_map) != n_data:
        raise MemauditError(
            f"--class-map gives {len(class_map)} outputs but {src} has {n_data} classes; give "
            "one model output per data class, in data-label order"
        )
    bad = [k for k in class_map if not 0 <= k < outputs]
    if bad or len(set(class_map)) < len(class_map):
        what = f"output {bad[0]} is not one of 0-{outputs - 1}" if bad else "an output repeats"
        raise MemauditError(f"--class-map: {what}; give distinct model outputs, one per class")
    mapped = torch.as_tensor(list(class_map), dtype=torch.long)[labels]
    own = model.info.class_names if model is not None else None
    if own and len(own) == outputs:
        return mapped, list(own)
    out = [f"output {k}" for k in range(outputs)]
    for i, k in enumerate(class_map):
        out[k] = names[i] if names else str(i)
    return mapped, out


def _from_npz(
    path: Path, split: str, image_key: str | None, label_key: str | None
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None, None]:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise MemauditError(f"{path} is not a readable .npz file ({err})") from None

    def pick(given: str | None, names: Sequence[str], what: str) -> np.ndarray:
        wanted = [given] if given else list(names)
        keys = [*(f"{split}_{n}" for n in wanted), *(f"{n}_{split}" for n in wanted)]
        if split == "train":  # unprefixed arrays are the (only) training split
            keys += wanted
        for key in keys:
            if key in arrays:
                return np.asarray(arrays[key])
        if split != "train":
            raise MissingSplitError(
                f"{path} has no {what} array for split {split!r} "
                f"(arrays: {', '.join(arrays.files)}); pick another with --split"
            )
        raise MemauditError(
            f"{path} has no {what} array for split {split!r} (arrays: {', '.join(arrays.files)}); "
            f"name it with --{what}-column"
        )

    images = pick(image_key, _NPZ_IMAGE_KEYS, "image")
    labels = pick(label_key, _NPZ_LABEL_KEYS, "label")
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    if images.ndim == 2:  # flat rows of square grayscale images (e.g. MNIST 784)
        side = round(images.shape[1] ** 0.5)
        images = images.reshape(-1, side, side)
    return _stack_arrays(images), torch.as_tensor(labels, dtype=torch.long), names, None


def _stack_arrays(images: np.ndarray) -> torch.Tensor:
    """[N,H,W] / [N,H,W,C] / [N,C,H,W] arrays (uint8 or floats in [0,1]) to uint8 [N,C,H,W]."""
    if images.dtype != np.uint8:
        scale = 255.0 if images.max() <= 1.0 else 1.0
        images = np.clip(images.astype(np.float32) * scale, 0, 255).round().astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(images))
    if t.ndim == 3:
        return t.unsqueeze(1)
    if t.ndim == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)
    return t[:, :3].contiguous()


def _hf_split(path: Path, split: str) -> Any:
    import datasets

    datasets.disable_progress_bars()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    elif path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
        by_split = {
            s: [str(f) for f in files if f.stem.startswith(s)]
            for s in ("train", "test", "validation")
        }
        data_files = {s: f for s, f in by_split.items() if f} or {"train": [str(f) for f in files]}
        loaded = datasets.load_dataset("parquet", data_files=data_files)
    elif path.is_dir():
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    else:
        raise MemauditError(
            f"{path} is not a dataset memaudit reads; use a save_to_disk directory, parquet, "
            "an image folder or .npz"
        )
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise MissingSplitError(
                f"{path} has no split {split!r} (splits: {', '.join(loaded)}); pick one with "
                "--split"
            )
        return loaded[split]
    if split != "train":
        raise MissingSplitError(f"{path} holds a single split; it has no {split!r} split")
    return loaded


def _find_column(
    columns: Sequence[str], given: str | None, names: Sequence[str], what: str, src: str
) -> str:
    if given:
        if given not in columns:
            raise MemauditError(f"{src} has no column {given!r} (columns: {', '.join(columns)})")
        return given
    found = next((c for c in names if c in columns), None)
    if found is None:
        raise MemauditError(
            f"{src} has no {what} column (columns: {', '.join(columns)}); name it with "
            f"--{what}-column"
        )
    return found


def _from_hf(
    ds: Any,
    src: str,
    split: str,
    image_column: str | None,
    label_column: str | None,
    id_column: str | None,
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None, torch.Tensor | None]:
    columns = list(ds.column_names)
    image_col = _find_column(columns, image_column, IMAGE_COLUMNS, "image", src)
    label_col = _find_column(columns, label_column, LABEL_COLUMNS, "label", src)
    feature = ds.features[label_col]
    names = list(feature.names) if hasattr(feature, "names") else None
    labels = torch.as_tensor(np.asarray(ds[label_col]), dtype=torch.long)
    ids = None
    if id_column:
        ids = torch.as_tensor(np.asarray(ds[_find_column(columns, id_column, (), "id", src)]))
    images = [_to_array(img) for img in ds[image_col]]
    shapes = {a.shape for a in images}
    if len(shapes) > 1:  # mixed sizes: bring all to the first one's size before stacking
        h, w = images[0].shape[:2]
        images = [np.asarray(Image.fromarray(a).resize((w, h))) for a in images]
    modes = {a.ndim for a in images}
    if modes == {2, 3}:
        images = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1) for a in images]
    return _stack_arrays(np.stack(images)), labels, names, ids


def _to_array(img: Any) -> np.ndarray:
    if isinstance(img, Image.Image):
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        return np.asarray(img)
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW pixel_values to HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def _fit(images: torch.Tensor, channels: int | None, size: int | None) -> torch.Tensor:
    """Convert channel count (gray <-> RGB) and resize to ``size`` x ``size``."""
    if channels is not None and images.shape[1] != channels:
        if channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif channels == 1 and images.shape[1] == 3:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
        else:
            raise MemauditError(
                f"the model takes {channels}-channel images but the data has "
                f"{images.shape[1]} channels"
            )
    if size is not None and images.shape[-2:] != (size, size):
        chunks = [
            F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True)
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
            for c in images.split(1024)
        ]
        images = torch.cat(chunks)
    return images.contiguous()
