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
    UNLEARN,
    FlaggedOpt,
    LoadOptions,
    ModelArg,
    load_inputs,
    writable,
)
from memaudit.cli._launch import process_group, quiet, rank_device
from memaudit.cli._options import with_options
from memaudit.cli._report import command_line
from memaudit.cli._testbed import progress
from memaudit.errors import MemauditError
from memaudit.models import load_model, save_model
from memaudit.render.html import write_html
from memaudit.schema import (
    Interval,
    MembershipFigures,
    UnlearnReport,
    UnlearnScores,
    UnlearnSettings,
)
from memaudit.unlearn import Option, UnlearnResult, UnlearnStep, unlearn_settings


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(figure: Interval | None, fmt: str) -> str:
    if figure is None or figure.value is None:
        return "-"
    shown = fmt.format(figure.value)
    if figure.low is not None and figure.high is not None:
        shown += f" [{fmt.format(figure.low)}, {fmt.format(figure.high)}]"
    return shown


def unlearn_table(report: UnlearnReport) -> Table:
    """Before / after (/ retrain) scores side by side."""
    table = Table(title=f"unlearn: {report.method} on {report.n_flagged} flagged ids")
    table.add_column("")
    m = report.membership
    names = ["flagged acc", "retained acc", "test acc", "loss AUC vs test"]
    names += ["membership AUC", "TPR @ 1% FPR"] if m is not None else []
    for name in names:
        table.add_column(name, justify="right")
    blocks: list[tuple[str, UnlearnScores | None, MembershipFigures | None]] = [
        ("before", report.before, m.before if m else None),
        ("after", report.after, m.after if m else None),
        ("retrain", report.retrain, m.retrain if m else None),
    ]
    for name, scores, figures in blocks:
        if scores is None:
            continue
        cells = [
            _pct(scores.flagged_accuracy),
            _pct(scores.retained_accuracy),
            _pct(scores.test_accuracy),
            "-" if scores.mia_auc is None else f"{scores.mia_auc:.3f}",
        ]
        if m is not None:
            auc, tpr = (figures.auc, figures.tpr_at_1pct_fpr) if figures else (None, None)
            cells += [_num(auc, "{:.3f}"), _num(tpr, "{:.1%}")]
        table.add_row(name, *cells)
    caption = f"{report.seconds:.1f} s"
    if report.retrain_seconds is not None:
        caption += f" (retraining: {report.retrain_seconds:.1f} s)"
    gap = report.average_gap()
    if gap is not None:
        caption += f"; average gap to the reference {gap:.1%}"
    if report.agreement_with_retrain is not None:
        caption += f"; {report.agreement_with_retrain:.0%} of flagged ids predicted as it does"
    check = report.reference_check
    if check is not None and check.weak:
        caption += (
            f"; WEAK REFERENCE: {check.shortfall:.1%} below the original's test accuracy, its "
            "gaps are not evidence"
        )
    table.caption = caption
    return table


def parse_options(given: list[str] | None) -> dict[str, Option]:
    """``--option KEY=VALUE`` pairs to a dict: true / false, integers and numbers are parsed,
    anything else stays text; a clear error for a pair without ``=``.

    Example:
        >>> parse_options(["beta=0.99", "tie=all", "steps=3", "fold=false"])
        {'beta': 0.99, 'tie': 'all', 'steps': 3, 'fold': False}
    """
    found: dict[str, Option] = {}
    for pair in given or []:
        key, eq, text = pair.partition("=")
        if not eq or not key.strip():
            raise MemauditError(f"--option takes KEY=VALUE (e.g. beta=0.99), got {pair!r}")
        found[key.strip()] = _value(text.strip())
    return found


def _value(text: str) -> Option:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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
@with_options(LOADING, UNLEARN)
def unlearn_command(
    model: ModelArg,
    flagged: FlaggedOpt,
    load: LoadOptions,
    unlearning: UnlearnSettings,
    out_model: Annotated[
        Path, typer.Option("--out-model", help="Where to save the unlearned model (.safetensors).")
    ],
    retrained: Annotated[
        str | None,
        typer.Option(
            "--retrained",
            help="A reference retrained without the flagged ids (same architecture), used "
            "instead of retraining: gaps, agreement and membership are measured against it.",
        ),
    ] = None,
    report_path: Annotated[
        Path | None, typer.Option("--out", help="Write the JSON report here.")
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write a self-contained HTML page here.")
    ] = None,
    method_options: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            help="A method option KEY=VALUE, repeatable (e.g. --option beta=0.99 for neggrad+; "
            "each method's options and defaults: memaudit.unlearn.METHODS).",
        ),
    ] = None,
) -> None:
    """Remove what MODEL memorized about the flagged ids; save a plain model and a report.

    --budget F gives every training method F times the retraining epochs (--retrain-epochs,
    else the recipe's), at least 1: methods compared at one cost. --option KEY=VALUE
    sets a method's own options.

    Under ``torchrun --nproc-per-node N -m memaudit unlearn ...`` every training run (the
    unlearning, retraining, membership references) trains under DDP, each global batch of
    --batch-size shared out between the N processes (one model replica each, on
    cuda:LOCAL_RANK when there is CUDA); rank 0 prints and writes the model and the report.
    """
    writable(out_model, "--out-model")
    if method_options:
        given = parse_options(method_options)
        unlearning = unlearn_settings(unlearning, options={**unlearning.options, **given})
    for path, option in ((report_path, "--out"), (html, "--html")):
        if path is not None:
            writable(path, option)
    load = load.model_copy(update={"device": rank_device(load.device)})
    per = "examples per batch (--batch-size)"
    with (
        process_group(load.device, most=unlearning.batch_size, per=per) as world,
        quiet(world.rank != 0),
    ):
        inputs = load_inputs(model, flagged=flagged, options=load)
        reference = (
            load_model(retrained, arch=load.arch, trust_pickle=load.trust_pickle)
            if retrained is not None
            else None
        )
        result = with_progress(
            lambda on_progress: inputs.auditor.unlearn(
                inputs.ids, unlearning, retrained=reference, on_progress=on_progress
            )
        )
    if world.rank != 0:
        return
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
