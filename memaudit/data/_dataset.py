"""One split of labelled images in memory (:class:`ImageDataset`), its preprocessing, and
row sets (the flagged rows, the rest, samples of them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memaudit.errors import MemauditError
from memaudit.models import Classifier, DataRef, Preprocess
from memaudit.schema._inputs import Preprocessing


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
        wanted = torch.as_tensor(list(ids), dtype=self.ids.dtype)
        order = self.ids.argsort()
        known = self.ids[order]
        at = torch.searchsorted(known, wanted).clamp_max(max(len(known) - 1, 0))
        missing = wanted[known[at] != wanted] if len(known) else wanted
        if missing.numel():
            raise MemauditError(
                f"example id {int(missing[0])} is not in the id column of {self.ref.split}"
            )
        return order[at]

    def ids_of(self, rows: torch.Tensor) -> list[int]:
        """The example ids of ``rows`` (the inverse of :meth:`rows`)."""
        return (rows if self.ids is None else self.ids[rows]).tolist()


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
