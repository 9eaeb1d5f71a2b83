"""``memaudit testbed`` and ``memaudit demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer
import yaml
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from memaudit.cli._app import app, err, out
from memaudit.cli._common import DeviceOpt, writable
from memaudit.engine import EpochEnd
from memaudit.errors import MemauditError, validated
from memaudit.testbed import (
    TestbedConfig,
    TestbedResult,
    build_testbed,
)


def progress() -> Progress:
    """The progress bar every long command shows (on stderr)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=err,
        transient=False,
    )


class StageBars:
    """One progress bar per named stage: pass ``StageBars(bar)`` as ``on_progress(stage, k, n)``."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total, status="")
        self.bar.update(self.tasks[stage], completed=done, total=total)


def run_testbed(out_dir: Path, config: TestbedConfig, device: str) -> TestbedResult:
    """Build the testbed with a progress bar."""
    with progress() as bar:
        tasks: list[TaskID] = []  # the bar appears with the first batch: setup errors stay alone

        def on_batch(ids: torch.Tensor) -> None:
            if not tasks:
                tasks.append(bar.add_task("training", total=config.epochs, status=""))

        def on_epoch(event: EpochEnd) -> None:
            bar.update(tasks[0], completed=event.epoch, status=f"loss {event.loss:.3f}")

        return build_testbed(out_dir, config, device=device, on_epoch=on_epoch, on_batch=on_batch)


def testbed_table(result: TestbedResult) -> Table:
    table = Table(title=f"testbed: {result.config.arch} on {result.config.data}")
    table.add_column("accuracy on")
    table.add_column("examples", justify="right")
    table.add_column("accuracy", justify="right")
    n_clean = result.n_train - result.n_noisy
    table.add_row(
        "noisy train (given labels)", str(result.n_noisy), f"{result.noisy_train_accuracy:.1%}"
    )
    table.add_row("clean train", str(n_clean), f"{result.clean_train_accuracy:.1%}")
    table.add_row("test", str(result.n_test), f"{result.test_accuracy:.1%}")
    for mode, acc in (result.dropout_modes or {}).items():
        table.add_row(f"{mode} mode: noisy train", str(result.n_noisy), f"{acc.noisy_train:.1%}")
        table.add_row(f"{mode} mode: clean train", str(n_clean), f"{acc.clean_train:.1%}")
        table.add_row(f"{mode} mode: test", str(result.n_test), f"{acc.test:.1%}")
    r = result.recipe
    trained = f"; {r.family} recipe: {r.optimizer}, lr {r.lr:g}, {r.schedule}" if r else ""
    table.caption = (
        f"{result.seconds:.0f} s{trained}; model {result.model}; flagged ids {result.noisy_ids}"
    )
    return table


@app.command()
def testbed(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory to write the testbed to.")
    ] = Path("memaudit-testbed"),
    data: Annotated[
        str, typer.Option(help="'mnist' (bundled) or a dataset path with train/test.")
    ] = "mnist",
    arch: Annotated[
        str,
        typer.Option(
            help="memaudit:resnet9, any timm:NAME or hf:MODEL_TYPE (hf:vit: a small ViT)."
        ),
    ] = "memaudit:resnet9",
    arch_config: Annotated[
        list[str] | None,
        typer.Option(
            "--arch-config",
            metavar="KEY=VALUE",
            help="Architecture setting KEY=VALUE, repeatable (memaudit:resnet9: width=32).",
        ),
    ] = None,
    noise: Annotated[float, typer.Option(help="Fraction of training labels to corrupt.")] = 0.1,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate (default: the architecture family's recipe)."),
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="sgd or adamw (default: the family's recipe).")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="Weight decay (default: the recipe's).")
    ] = None,
    warmup: Annotated[
        float | None, typer.Option(help="Share of steps warming up (default: the recipe's).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 128,
    image_size: Annotated[int | None, typer.Option(help="Resize images (timm models).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, the noise and training.")] = 0,
    example_tied_dropout: Annotated[
        bool,
        typer.Option(
            "--example-tied-dropout",
            help="Train with example-tied dropout; report expectation- and drop-mode accuracy.",
        ),
    ] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Build the paper's label-noise testbed and train a model that memorizes the noisy labels."""
    values = {
        "data": data,
        "arch": arch,
        "arch_config": _settings(arch_config or []),
        "noise": noise,
        "epochs": epochs,
        "lr": lr,
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "warmup": warmup,
        "batch_size": batch_size,
        "image_size": image_size,
        "seed": seed,
        "example_tied_dropout": example_tied_dropout,
    }
    config = validated(TestbedConfig, values, "testbed setting")
    result = run_testbed(writable(out_dir, "--out", folder=True), config, device)
    out.print(testbed_table(result))


def _settings(pairs: list[str]) -> dict[str, Any]:
    """``["width=32"]`` as ``{"width": 32}`` (values read as YAML scalars); one-line errors."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MemauditError(f"--arch-config takes KEY=VALUE, got {pair!r}")
        settings[key] = yaml.safe_load(value)
    return settings
