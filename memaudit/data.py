"""Labelled image data behind one entry point, :func:`load_dataset`, and flagged-id files.

A split is decoded once into a compact ``uint8`` tensor ``[N, C, H, W]`` (resized to the model's
input size) and normalized per batch, so audits index examples by row without a data loader.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from memaudit.errors import MemauditError, MissingSplitError
from memaudit.models import Classifier, DataRef, Preprocess
from memaudit.schema._inputs import Preprocessing

IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels")
_NPZ_IMAGE_KEYS = ("images", "image", "x", "X")
_NPZ_LABEL_KEYS = ("labels", "label", "y")


@dataclass
class ImageDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int, int]]):
    """One split of labelled images. ``images`` is ``uint8 [N, C, H, W]``; rows are example ids.

    Example:
        >>> images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
        >>> data = ImageDataset(images, torch.tensor([0, 1, 0, 1]))
        >>> data.batch(torch.tensor([0, 2])).shape
        torch.Size([2, 1, 8, 8])
    """

    images: torch.Tensor
    labels: torch.Tensor
    preprocess: Preprocess = field(default_factory=Preprocess)
    class_names: list[str] | None = None
    ref: DataRef = field(default_factory=lambda: DataRef(source="<memory>"))
    ids: torch.Tensor | None = None  # values of an id column, when one was named
    native_shape: tuple[int, int, int] | None = None  # (C, H, W) as stored, before fitting
    preprocess_origin: str = "given with the data"  # where ``preprocess`` comes from, in words

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.ndim != 1:
            raise MemauditError(
                f"{self.ref.source}: images must be [N, C, H, W] and labels [N], got "
                f"{list(self.images.shape)} and {list(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise MemauditError(
                f"{self.ref.source} [{self.ref.split}] has {self.images.shape[0]} images but "
                f"{self.labels.shape[0]} labels; every image needs one label"
            )
        channels = self.images.shape[1]
        mean, std = (
            _per_channel(self.preprocess.mean, channels),
            _per_channel(self.preprocess.std, channels),
        )
        self._mean = torch.tensor(mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int, int]:
        return self.batch(torch.tensor([row]))[0], int(self.labels[row]), row

    @property
    def num_classes(self) -> int:
        if self.class_names:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def preprocessing(self) -> Preprocessing:
        """The effective preprocessing (what the model sees) and why it was chosen."""
        c, h, w = self.native_shape or tuple(self.images.shape[1:])
        return Preprocessing(
            image_size=(int(self.images.shape[2]), int(self.images.shape[3])),
            native_size=(int(h), int(w)),
            channels=self.channels,
            native_channels=int(c),
            mean=tuple(self._mean.flatten().tolist()),
            std=tuple(self._std.flatten().tolist()),
            origin=self.preprocess_origin,
        )

    def batch(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Normalized float images for ``rows``, on ``device``."""
        x = self.images[rows.cpu()].to(device, non_blocking=True).float().div_(255)
        return (x - self._mean.to(device)) / self._std.to(device)

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Row indices of example ``ids`` (row numbers, or id-column values when named)."""
        if self.ids is None:
            wanted = torch.as_tensor(list(ids), dtype=torch.long)
            bad = wanted[(wanted < 0) | (wanted >= len(self))]
            if bad.numel():
                raise MemauditError(
                    f"example id {int(bad[0])} is out of range: {self.ref.split} has "
                    f"{len(self)} examples (ids 0-{len(self) - 1})"
                )
            return wanted
        index = {int(v): i for i, v in enumerate(self.ids.tolist())}
        missing = [i for i in ids if i not in index]
        if missing:
            raise MemauditError(
                f"example id {missing[0]} is not in the id column of {self.ref.split}"
            )
        return torch.tensor([index[i] for i in ids], dtype=torch.long)


def complement(n: int, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """The rows of ``0..n-1`` not in ``rows``, in order (e.g. the training rows not flagged)."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.as_tensor(rows, dtype=torch.long)] = False
    return keep.nonzero().flatten()


def validate_rows(data: ImageDataset, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``rows`` of ``data`` as a sorted tensor without repeats; one-line errors if empty or out
    of range (ids of an id column: :meth:`ImageDataset.rows`)."""
    found = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if found.numel() == 0:
        raise MemauditError("no flagged examples given; pass a file of example ids with --flagged")
    bad = found[(found < 0) | (found >= len(data))]
    if bad.numel():
        raise MemauditError(
            f"flagged row {int(bad[0])} is out of range: the data has {len(data)} examples "
            f"(rows 0-{len(data) - 1})"
        )
    return found.unique()


def sample(rows: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` of ``rows`` drawn without replacement, sorted (all of them if fewer)."""
    if size >= len(rows):
        return rows
    return rows[torch.randperm(len(rows), generator=generator)[:size]].sort().values


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    if len(values) == 1:
        return tuple(values) * channels
    if len(values) == 3 and channels == 1:  # RGB statistics for a grayscale model: average them
        return (float(sum(values)) / 3,)
    if len(values) != channels:
        raise MemauditError(
            f"got {len(values)} mean/std values for {channels}-channel images; give one value "
            f"or {channels}"
        )
    return tuple(values)


def resolve_preprocess(
    model: Classifier | None = None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocess:
    """The model's preprocessing (checkpoint, HF or timm config) with explicit overrides applied.

    Without either, images keep their size and are normalized with mean 0.5, std 0.5.
    """
    base = (model.info.preprocess if model is not None else None) or Preprocess()
    return Preprocess(
        image_size=image_size if image_size is not None else base.image_size,
        mean=tuple(mean) if mean is not None else base.mean,
        std=tuple(std) if std is not None else base.std,
    )


def preprocess_origin(
    model: Classifier | None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> str:
    """Where :func:`resolve_preprocess` takes the size and the normalization from, in words."""
    base = model.info.preprocess if model is not None else None
    from_model = model.preprocess_origin if model is not None else ""
    if image_size is not None:
        size_from = "--image-size"
    elif base is not None and base.image_size is not None:
        size_from = from_model
    else:
        size_from = "kept as stored: the model takes any size and its weights record none"
    if mean is not None or std is not None:
        norm_from = "--mean/--std"
    elif base is not None and {"mean", "std"} & base.model_fields_set:
        norm_from = from_model
    else:
        norm_from = "memaudit's default, as the model records none; set --mean/--std"
    return f"size: {size_from}; normalization: {norm_from}"


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


def read_ids(path: str | os.PathLike[str]) -> list[int]:
    """Read a flagged-ids file: one integer per line, ``#`` comments and blank lines allowed.

    Duplicates are dropped (first occurrence kept) with a warning.
    """
    file = Path(path)
    if not file.is_file():
        raise MemauditError(f"flagged-ids file {str(path)!r} not found")
    ids: list[int] = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise MemauditError(
                f"{file}:{number}: {text!r} is not an integer example id; one id per line"
            ) from None
    if not ids:
        raise MemauditError(f"{file} lists no example ids; put one id per line")
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):
        warnings.warn(
            f"{file}: dropped {len(ids) - len(unique)} duplicate ids", UserWarning, stacklevel=2
        )
    return unique


def write_ids(path: str | os.PathLike[str], ids: Sequence[int], *, comment: str = "") -> Path:
    """Write ids one per line (with an optional ``#`` comment header)."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    file.write_text(head + "".join(f"{i}\n" for i in ids))
    return file
