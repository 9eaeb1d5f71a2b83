"""Options shared by every command that reads a model and its data, and their loading."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from pydantic import BaseModel, ConfigDict, Field

from memaudit.auditor import Auditor
from memaudit.cli._app import err
from memaudit.cli._options import Group
from memaudit.data import ImageDataset, load_dataset, read_ids
from memaudit.errors import MemauditError, MissingSplitError
from memaudit.models import Classifier, load_model
from memaudit.schema import Preflight, ScanSettings, UnlearnSettings
from memaudit.unlearn import METHODS

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model: a memaudit checkpoint, a state-dict file (with --arch), a Hugging Face "
        "save_pretrained directory, or timm:NAME / hf:ORG/NAME.",
        show_default=False,
    ),
]
FlaggedOpt = Annotated[
    Path,
    typer.Option("--flagged", help="File of flagged example ids, one per line (# comments ok)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")]


class LoadOptions(BaseModel):
    """How a command finds and shows the model its data: the options of every command that
    audits a model (``memaudit scan``, ``unlearn``, ``audit``, ``probe ...``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str | None = Field(
        None,
        description="Dataset (save_to_disk dir, parquet, image folder or .npz). Default: the "
        "training data a memaudit checkpoint records.",
    )
    arch: str | None = Field(
        None, description="Architecture of a bare state dict, e.g. timm:resnet18."
    )
    split: str = Field("train", description="Split the flagged ids index.")
    test_split: str = Field("test", description="Held-out split, used when the data has it.")
    image_size: int | None = Field(None, description="Resize images to this size (square).")
    mean: str | None = Field(
        None, description="Normalization mean: one value or one per channel, comma-separated."
    )
    std: str | None = Field(
        None, description="Normalization std: one value or one per channel, comma-separated."
    )
    class_map: str | None = Field(
        None,
        description="Model output of each data label, comma-separated in data-label order (e.g. "
        "3,4,5: data label 0 is output 3), when the data's classes are not the model's.",
    )
    min_train_accuracy: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Refuse a model below this accuracy on its own training rows (preflight "
        "check). Default: a quarter of the way from chance to 100%; 0 never refuses.",
    )
    trust_pickle: bool = Field(
        False,
        description="Allow loading a pickled model. Unpickling runs arbitrary code: only trusted "
        "files.",
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu or cuda.")


LOADING = Group(LoadOptions, "load", "option")
SCAN = Group(ScanSettings, "settings", "scan setting")
UNLEARN = Group(
    UnlearnSettings,
    "unlearning",
    "unlearning setting",
    skip=("options",),
    notes={"method": "one of: " + ", ".join(METHODS)},
)


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """'0.5' or '0.48,0.45,0.41' to a tuple; a clear error otherwise."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MemauditError(f"{option} takes numbers separated by commas, got {text!r}") from None


def parse_ints(text: str | None, option: str) -> list[int] | None:
    """'3,4,5' to a list; a clear error otherwise."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MemauditError(f"{option} takes integers separated by commas, got {text!r}") from None


def writable(path: Path, option: str, *, folder: bool = False) -> Path:
    """``path`` (a file, or a ``folder``), checked before any work: a one-line error if it
    could not be written. Creates nothing: the nearest existing folder above must be writable.
    """
    where = path if folder else path.parent
    if path.is_dir() and not folder:
        raise MemauditError(f"{option} {path} is a folder; give a file name")
    existing = next(p for p in (where, *where.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise MemauditError(
            f"{option} {path}: cannot create the folder {where}, as {existing} is a file; "
            "choose another location"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MemauditError(
            f"{option} {path}: cannot create or write the folder {where} ({existing} is not "
            "writable); choose another location"
        )
    return path


def say(text: str) -> None:
    """One plain line on stderr (never wrapped, never read as markup)."""
    err.print(text, highlight=False, markup=False, soft_wrap=True)


@dataclass
class Inputs:
    """A checked model with its data and flagged ids: what every audit command works on.

    ``auditor`` binds the model to its data; ``preflight`` is its check on these ids;
    ``seconds``: the wall time of loading and of the preflight check.
    """

    auditor: Auditor
    ids: list[int]
    rows: torch.Tensor
    preflight: Preflight
    seconds: dict[str, float]

    @property
    def model(self) -> Classifier:
        return self.auditor.model

    @property
    def train(self) -> ImageDataset:
        return self.auditor.train

    @property
    def test(self) -> ImageDataset | None:
        return self.auditor.test


def load_inputs(
    model: str,
    *,
    flagged: Path,
    options: LoadOptions | None = None,
    validate: Callable[[Classifier], object] | None = None,
) -> Inputs:
    """Read the flagged ids, load the model and its data, and run the preflight check.

    The data is ``--data`` or the data a memaudit checkpoint records. ``validate`` checks the
    command's own options against the model (e.g. layer names) before the preflight. Says on
    stderr how the images are shown to the model and what the preflight measured; every
    command that audits a model comes through here.
    """
    opts = options or LoadOptions()
    start = time.perf_counter()
    ids = read_ids(flagged)
    loaded = load_model(model, arch=opts.arch, trust_pickle=opts.trust_pickle)
    source, recorded = opts.data, None
    if source is None:
        recorded = loaded.info.train_data
        if recorded is None:
            raise MemauditError(f"{model} does not record its training data; pass --data DATA")
        source = recorded.source
        if not Path(source).exists():
            raise MemauditError(
                f"the training data {source} that {model} records is gone; pass --data DATA"
            )
    mapping = parse_ints(opts.class_map, "--class-map")
    reading = dict(
        model=loaded,
        image_size=opts.image_size,
        mean=parse_floats(opts.mean, "--mean"),
        std=parse_floats(opts.std, "--std"),
        image_column=recorded.image_column if recorded else None,
        label_column=recorded.label_column if recorded else None,
        class_map=mapping if mapping is not None else (recorded.class_map if recorded else None),
    )
    train = load_dataset(source, split=opts.split, **reading)  # type: ignore[arg-type]
    try:
        test = load_dataset(source, split=opts.test_split, **reading)  # type: ignore[arg-type]
    except MissingSplitError:
        test = None
    rows = train.rows(ids)  # out-of-range ids fail here, before any work
    if validate is not None:
        validate(loaded)
    auditor = Auditor(
        loaded, train, test, device=opts.device, min_train_accuracy=opts.min_train_accuracy
    )
    loaded_at = time.perf_counter()
    checked = preflight(auditor, ids)
    seconds = {"load": loaded_at - start, "preflight": time.perf_counter() - loaded_at}
    return Inputs(auditor, ids, rows, checked, {k: round(v, 4) for k, v in seconds.items()})


def preflight(auditor: Auditor, ids: list[int]) -> Preflight:
    """Run the auditor's preflight check on ``ids``; say the inputs, the result and warnings."""
    say(f"inputs: {auditor.train.preprocessing.describe()}")
    checked = auditor.preflight(ids)
    say(f"preflight: {checked.describe()}")
    for warning in checked.warnings:
        warnings.warn(warning, UserWarning, stacklevel=2)
    return checked
