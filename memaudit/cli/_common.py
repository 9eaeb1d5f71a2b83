"""Options shared by every command that reads a model and its data, and their loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from memaudit.data import ImageDataset, load_dataset
from memaudit.errors import MemauditError, MissingSplitError
from memaudit.models import Classifier, load_model

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
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Dataset (save_to_disk dir, parquet, image folder or .npz). Default: the training "
        "data a memaudit checkpoint records.",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture of a bare state dict, e.g. timm:resnet18."),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Split the flagged ids index.")]
TestSplitOpt = Annotated[
    str, typer.Option("--test-split", help="Held-out split, used when the data has it.")
]
ImageSizeOpt = Annotated[
    int | None, typer.Option("--image-size", help="Resize images to this size (square).")
]
MeanOpt = Annotated[
    str | None,
    typer.Option(
        "--mean", help="Normalization mean: one value or one per channel, comma-separated."
    ),
]
StdOpt = Annotated[
    str | None,
    typer.Option("--std", help="Normalization std: one value or one per channel, comma-separated."),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow loading a pickled model. Unpickling runs arbitrary code: only trusted files.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")]


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """'0.5' or '0.48,0.45,0.41' to a tuple; a clear error otherwise."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MemauditError(f"{option} takes numbers separated by commas, got {text!r}") from None


@dataclass
class Inputs:
    """A loaded model with the training split its flagged ids index, and a test split if any."""

    model: Classifier
    train: ImageDataset
    test: ImageDataset | None


def load_inputs(
    model: str,
    *,
    data: str | None,
    arch: str | None = None,
    split: str = "train",
    test_split: str = "test",
    image_size: int | None = None,
    mean: str | None = None,
    std: str | None = None,
    trust_pickle: bool = False,
) -> Inputs:
    """Load the model, then its data (``--data`` or the data its checkpoint records)."""
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
    source, columns = data, {}
    if source is None:
        recorded = loaded.info.train_data
        if recorded is None:
            raise MemauditError(f"{model} does not record its training data; pass --data DATA")
        source = recorded.source
        if not Path(source).exists():
            raise MemauditError(
                f"the training data {source} that {model} records is gone; pass --data DATA"
            )
        columns = {"image_column": recorded.image_column, "label_column": recorded.label_column}
    options = dict(
        model=loaded,
        image_size=image_size,
        mean=parse_floats(mean, "--mean"),
        std=parse_floats(std, "--std"),
        **columns,
    )
    train = load_dataset(source, split=split, **options)  # type: ignore[arg-type]
    try:
        test = load_dataset(source, split=test_split, **options)  # type: ignore[arg-type]
    except MissingSplitError:
        test = None
    return Inputs(loaded, train, test)
