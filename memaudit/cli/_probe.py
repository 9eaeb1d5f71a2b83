"""``memaudit probe gradients|rewind|retrain``: which layers do the flagged examples use?"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import torch
import typer
from rich.table import Table

from memaudit.cli._app import app, err, out
from memaudit.cli._common import (
    LOADING,
    FlaggedOpt,
    Inputs,
    LoadOptions,
    ModelArg,
    load_inputs,
    parse_ints,
    writable,
)
from memaudit.cli._options import with_options
from memaudit.cli._testbed import progress
from memaudit.data import ImageDataset, complement, sample
from memaudit.errors import MemauditError
from memaudit.models import Classifier
from memaudit.probes import (
    ProbeStep,
    find_checkpoints,
    gradient_accounting,
    gradient_history,
    layer_groups,
    retrain_layers,
    rewind_layers,
)
from memaudit.schema import GradientsReport, Grouping, Report, RetrainReport, RewindReport

R = TypeVar("R", bound=Report)
probe_app = typer.Typer(
    help="Layer probes of the paper: gradient accounting, layer rewinding, layer retraining.",
    no_args_is_help=True,
)
app.add_typer(probe_app, name="probe")

CheckpointsOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoints",
        help="Folder of per-epoch checkpoints epoch_NNN.safetensors. Default: the "
        "'checkpoints' folder beside MODEL, when there is one (as memaudit testbed writes).",
    ),
]
GroupingOpt = Annotated[
    Grouping,
    typer.Option(
        "--grouping", help="Layers: each conv/linear with its norm (module) or each block."
    ),
]
LayersOpt = Annotated[
    str | None,
    typer.Option("--layers", help="Only these layer groups, comma-separated (default: all)."),
]
EpochsOpt = Annotated[
    str | None,
    typer.Option("--epochs", help="Only these checkpoint epochs, e.g. 0,5,10 (default: all)."),
]
CleanSampleOpt = Annotated[
    int | None,
    typer.Option(
        "--clean-sample", min=1, help="Measure clean accuracy on this many random other rows."
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of sampling and retraining.")]


def _names(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def _checkpoint_folder(model: str, given: Path | None) -> Path:
    if given is not None:
        return given
    beside = Path(model).parent / "checkpoints"
    if Path(model).is_file() and beside.is_dir():
        return beside
    raise MemauditError(
        f"no checkpoint folder beside {model}; pass --checkpoints DIR (files epoch_NNN."
        "safetensors, as memaudit testbed writes them)"
    )


def _load(
    model: str,
    flagged: Path,
    out_path: Path,
    load: LoadOptions,
    *,
    grouping: Grouping,
    layers: str | None,
) -> Inputs:
    """The checked inputs (see :func:`load_inputs`), once ``--out`` is known to be writable
    and the layer groups asked for are known to exist."""
    writable(out_path, "--out")

    def validate(net: Classifier) -> object:
        return layer_groups(net, grouping=grouping, names=_names(layers))

    return load_inputs(model, flagged=flagged, options=load, validate=validate)


def _clean_sample(
    data: ImageDataset, flagged: torch.Tensor, size: int | None, seed: int
) -> list[int] | None:
    """The ids of ``size`` random non-flagged examples (seeded); None: all of them."""
    if size is None:
        return None
    clean = complement(len(data), flagged)
    return data.ids_of(sample(clean, size, torch.Generator().manual_seed(seed)))


@contextmanager
def _bar(label: str) -> Iterator[Callable[[ProbeStep], None]]:
    with progress() as bar:
        task = bar.add_task(label, total=None, status="")

        def update(step: ProbeStep) -> None:
            bar.update(task, completed=step.done, total=step.total, status=step.label)

        yield update


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _write(report: R, path: Path, inputs: Inputs) -> R:
    """Write ``report`` with the preflight check of its inputs; returns what was written."""
    checked = report.model_copy(update={"preflight": inputs.preflight})
    checked.to_json(path)
    err.print(f"report written to {path}")
    return checked


def gradients_table(report: GradientsReport) -> Table:
    """Per layer: norms and cosine of the last epoch, and the cosine over all epochs."""
    last = report.epochs[-1]
    where = "the given model" if last is None else f"epoch {last}"
    table = Table(title=f"gradient accounting ({report.mode}, {where})")
    for name in ("layer", "params", "flagged norm", "clean norm", "cosine"):
        table.add_column(name, justify="left" if name == "layer" else "right", no_wrap=True)
    many = len(report.epochs) > 1
    if many:
        table.add_column("mean cosine", justify="right")
    for row in report.layers:
        cells = [row.name, f"{row.params:,}", _num(row.flagged_norm[-1]), _num(row.clean_norm[-1])]
        cells.append(_num(row.cosine[-1]))
        if many:
            known = [c for c in row.cosine if c is not None]
            cells.append(_num(sum(known) / len(known) if known else None))
        table.add_row(*cells)
    table.caption = (
        f"{report.n_flagged} flagged, {report.n_clean} other examples; norms of summed "
        "gradients / sqrt(#params)"
    )
    return table


def rewind_table(report: RewindReport, *, max_columns: int = 6) -> Table:
    """Per layer: flagged accuracy when rewound to (up to ``max_columns``) epochs, and clean
    accuracy when rewound to the earliest (the JSON report has every cell)."""
    step = max(1, -(-len(report.epochs) // max_columns))
    shown = list(range(0, len(report.epochs), step))
    first = report.epochs[0]
    table = Table(title="layer rewinding: flagged accuracy % (given labels), layer set to epoch e")
    width = max((len(row.name) for row in report.layers), default=5)
    table.add_column("layer", no_wrap=True, min_width=min(width, 24))
    for j in shown:
        table.add_column(f"e{report.epochs[j]}", justify="right", no_wrap=True)
    table.add_column(f"clean e{first}", justify="right", no_wrap=True)
    for row in report.layers:
        cells = [_share(row.flagged[j]) for j in shown]
        table.add_row(row.name, *cells, _share(row.clean[0]))
    b = report.baseline
    table.caption = (
        f"final model: flagged {_pct(b.flagged)}, clean {_pct(b.clean)}, test {_pct(b.test)}; "
        f"{report.n_flagged} flagged, {report.n_clean} clean rows"
    )
    return table


def retrain_table(report: RetrainReport) -> Table:
    """Per layer: accuracies after rewinding and after retraining it alone on clean rows."""
    table = Table(
        title=f"layer retraining: rewound to epoch {report.rewind_epoch}, "
        f"{report.train_epochs} epochs on clean rows"
    )
    columns = ("layer", "params", "flagged rewound", "flagged retrained", "recovered")
    for name in (*columns, "clean retrained"):
        table.add_column(
            name, justify="left" if name == "layer" else "right", no_wrap=name == "layer"
        )
    for row in report.layers:
        table.add_row(
            row.name,
            f"{row.params:,}",
            _pct(row.rewound.flagged),
            _pct(row.retrained.flagged),
            _pct(row.flagged_recovered),
            _pct(row.retrained.clean),
        )
    b = report.baseline
    table.caption = (
        f"final model: flagged {_pct(b.flagged)}, clean {_pct(b.clean)}; recovered = retrained"
        " minus rewound flagged accuracy"
    )
    return table


@probe_app.command()
@with_options(LOADING)
def gradients(
    model: ModelArg,
    flagged: FlaggedOpt,
    load: LoadOptions,
    checkpoints: Annotated[
        Path | None,
        typer.Option(
            "--checkpoints",
            help="Folder of per-epoch checkpoints: one column per epoch. Without it, MODEL only.",
        ),
    ] = None,
    epochs: EpochsOpt = None,
    grouping: GroupingOpt = Grouping.MODULE,
    layers: LayersOpt = None,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the JSON report.")] = Path(
        "gradients.json"
    ),
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per forward pass.")] = 128,
    running_stats: Annotated[
        bool,
        typer.Option(
            "--running-stats",
            help="Batch-norm with its running statistics (eval mode) instead of batch "
            "statistics as in training.",
        ),
    ] = False,
) -> None:
    """Per layer: norms of the summed flagged and clean gradients and their cosine."""
    inputs = _load(
        model,
        flagged,
        out_path,
        load,
        grouping=grouping,
        layers=layers,
    )
    names = _names(layers)
    if checkpoints is None and epochs is None:
        report = gradient_accounting(
            inputs.model,
            inputs.train,
            inputs.ids,
            grouping=grouping,
            layers=names,
            batch_size=batch_size,
            norm_stats="running" if running_stats else "batch",
            device=load.device,
        )
    else:
        folder = _checkpoint_folder(model, checkpoints)
        points = find_checkpoints(folder, epochs=parse_ints(epochs, "--epochs"))
        with _bar("gradients") as update:
            report = gradient_history(
                inputs.model,
                inputs.train,
                inputs.ids,
                points,
                grouping=grouping,
                layers=names,
                batch_size=batch_size,
                norm_stats="running" if running_stats else "batch",
                device=load.device,
                on_progress=update,
            )
    out.print(gradients_table(_write(report, out_path, inputs)))


@probe_app.command()
@with_options(LOADING)
def rewind(
    model: ModelArg,
    flagged: FlaggedOpt,
    load: LoadOptions,
    checkpoints: CheckpointsOpt = None,
    epochs: EpochsOpt = None,
    grouping: GroupingOpt = Grouping.MODULE,
    layers: LayersOpt = None,
    clean_sample: CleanSampleOpt = None,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the JSON report.")] = Path(
        "rewind.json"
    ),
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per forward pass.")] = 512,
    seed: SeedOpt = 0,
) -> None:
    """Rewind one layer at a time to earlier epochs; flagged and clean accuracy."""
    folder = _checkpoint_folder(model, checkpoints)
    points = find_checkpoints(folder, epochs=parse_ints(epochs, "--epochs"))
    inputs = _load(
        model,
        flagged,
        out_path,
        load,
        grouping=grouping,
        layers=layers,
    )
    clean = _clean_sample(inputs.train, inputs.rows, clean_sample, seed)
    with _bar("rewinding") as update:
        report = rewind_layers(
            inputs.model,
            inputs.train,
            inputs.ids,
            points,
            clean_ids=clean,
            test=inputs.test,
            grouping=grouping,
            layers=_names(layers),
            batch_size=batch_size,
            device=load.device,
            on_progress=update,
        )
    out.print(rewind_table(_write(report, out_path, inputs)))


@probe_app.command()
@with_options(LOADING)
def retrain(
    model: ModelArg,
    flagged: FlaggedOpt,
    load: LoadOptions,
    checkpoints: CheckpointsOpt = None,
    rewind_epoch: Annotated[
        int, typer.Option("--rewind-to", help="Epoch whose weights a layer is rewound to.")
    ] = 0,
    train_epochs: Annotated[
        int, typer.Option("--train-epochs", min=1, help="Epochs of retraining per layer.")
    ] = 5,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (one-cycle).")] = 0.05,
    grouping: GroupingOpt = Grouping.MODULE,
    layers: LayersOpt = None,
    clean_sample: CleanSampleOpt = None,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the JSON report.")] = Path(
        "retrain.json"
    ),
    batch_size: Annotated[int, typer.Option(min=1, help="Training batch size.")] = 128,
    seed: SeedOpt = 0,
) -> None:
    """Rewind one layer, retrain it alone on the clean rows: how much flagged accuracy returns."""
    folder = _checkpoint_folder(model, checkpoints)
    points = find_checkpoints(folder, epochs=[rewind_epoch])
    inputs = _load(
        model,
        flagged,
        out_path,
        load,
        grouping=grouping,
        layers=layers,
    )
    clean = _clean_sample(inputs.train, inputs.rows, clean_sample, seed)
    with _bar("retraining") as update:
        report = retrain_layers(
            inputs.model,
            inputs.train,
            inputs.ids,
            points,
            rewind_epoch=rewind_epoch,
            epochs=train_epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            eval_clean_ids=clean,
            test=inputs.test,
            grouping=grouping,
            layers=_names(layers),
            device=load.device,
            on_progress=update,
        )
    out.print(retrain_table(_write(report, out_path, inputs)))
