"""``memaudit unlearn``: remove flagged examples from a model and measure before / after."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import TaskID
from rich.table import Table

from memaudit.cli._app import app, err, out
from memaudit.cli._common import (
    LOADING,
    FlaggedOpt,
    LoadOptions,
    ModelArg,
    load_inputs,
    writable,
)
from memaudit.cli._options import with_options
from memaudit.cli._report import command_line
from memaudit.cli._testbed import progress
from memaudit.models import save_model
from memaudit.render.html import write_html
from memaudit.schema import UnlearnReport, UnlearnScores
from memaudit.unlearn import METHODS, UnlearnResult, UnlearnStep


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def unlearn_table(report: UnlearnReport) -> Table:
    """Before / after (/ retrain) scores side by side."""
    table = Table(title=f"unlearn: {report.method} on {report.n_flagged} flagged ids")
    table.add_column("")
    for name in ("flagged acc", "retained acc", "test acc", "MIA AUC"):
        table.add_column(name, justify="right")
    blocks: list[tuple[str, UnlearnScores | None]] = [
        ("before", report.before),
        ("after", report.after),
        ("retrain", report.retrain),
    ]
    for name, scores in blocks:
        if scores is None:
            continue
        table.add_row(
            name,
            _pct(scores.flagged_accuracy),
            _pct(scores.retained_accuracy),
            _pct(scores.test_accuracy),
            "-" if scores.mia_auc is None else f"{scores.mia_auc:.3f}",
        )
    caption = f"{report.seconds:.1f} s"
    if report.retrain_seconds is not None:
        caption += f" (retraining: {report.retrain_seconds:.1f} s)"
    gap = report.gap_to_retrain()
    if gap is not None:
        caption += f"; gap to retraining {gap:.1%}"
    table.caption = caption
    return table


def with_progress(run: Callable[[Callable[[UnlearnStep], None]], UnlearnResult]) -> UnlearnResult:
    """Call ``run(on_progress)`` with one progress bar per stage (on stderr)."""
    with progress() as bar:
        tasks: dict[str, TaskID] = {}

        def on_progress(event: UnlearnStep) -> None:
            if event.stage not in tasks:
                tasks[event.stage] = bar.add_task(event.stage, total=event.total, status="")
            status = "" if event.loss is None else f"loss {event.loss:.3f}"
            bar.update(tasks[event.stage], completed=event.step, status=status)

        return run(on_progress)


@app.command("unlearn")
@with_options(LOADING)
def unlearn_command(
    model: ModelArg,
    flagged: FlaggedOpt,
    load: LoadOptions,
    out_model: Annotated[
        Path, typer.Option("--out-model", help="Where to save the unlearned model (.safetensors).")
    ],
    method: Annotated[
        str, typer.Option("--method", help=f"One of: {', '.join(METHODS)}.")
    ] = "example-tied-dropout",
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Training epochs (default: the method's).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate (default: the method's).")
    ] = None,
    compare_retrain: Annotated[
        bool,
        typer.Option("--compare-retrain", help="Also retrain from scratch without the ids (slow)."),
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shuffling and masks.")] = 0,
    report_path: Annotated[
        Path | None, typer.Option("--out", help="Write the JSON report here.")
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write a self-contained HTML page here.")
    ] = None,
) -> None:
    """Remove what MODEL memorized about the flagged ids; save a plain model and a report."""
    writable(out_model, "--out-model")
    for path, option in ((report_path, "--out"), (html, "--html")):
        if path is not None:
            writable(path, option)
    inputs = load_inputs(model, flagged=flagged, options=load)
    result = with_progress(
        lambda on_progress: inputs.auditor.unlearn(
            inputs.ids,
            method=method,
            epochs=epochs,
            lr=lr,
            seed=seed,
            compare_retrain=compare_retrain,
            on_progress=on_progress,
        )
    )
    # What it was measured on and how: the unlearned model reloads with no flags.
    saved = save_model(
        result.model, out_model, train_data=inputs.train.ref, preprocess=inputs.train.preprocess
    )
    report = result.report.model_copy(update={"out_model": str(saved)})
    out.print(unlearn_table(report))
    err.print(f"unlearned model written to {saved}")
    if report_path is not None:
        err.print(f"report written to {report.to_json(report_path)}")
    if html is not None:
        err.print(f"page written to {write_html(html, report, command=command_line())}")
