"""``memaudit scan``: localize the memorization of flagged examples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from memaudit import journal as journals
from memaudit.auditor import Auditor
from memaudit.cli._app import app, err, out
from memaudit.cli._common import (
    LOADING,
    SCAN,
    FlaggedOpt,
    LoadOptions,
    ModelArg,
    load_inputs,
    writable,
)
from memaudit.cli._launch import process_group, rank_device
from memaudit.cli._options import with_options
from memaudit.cli._report import command_line
from memaudit.cli._testbed import progress
from memaudit.localize import scan_settings
from memaudit.render.html import write_html
from memaudit.schema import ScanReport, ScanSettings


def scan_table(report: ScanReport, *, title: str = "scan") -> Table:
    """The summary a person reads after a scan."""
    s = report.summary

    def num(value: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if value is None else fmt.format(value)

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("flagged examples", str(s.n_flagged)),
        ("misclassified before (not searched)", str(s.n_misclassified)),
        ("flipped", f"{s.n_flipped} ({s.flip_rate:.0%} of searched)"),
        ("budget exhausted", str(s.n_budget_exhausted)),
        ("units to flip: median / mean (greedy)", f"{num(s.median_units)} / {num(s.mean_units)}"),
        (
            "units to flip: median / mean (minimal)",
            f"{num(s.median_units_minimal)} / {num(s.mean_units_minimal)}",
        ),
        ("reference accuracy drop per edit", num(s.mean_reference_accuracy_drop, "{:.1%}")),
        ("test accuracy drop per edit", num(s.mean_test_accuracy_drop, "{:.1%}")),
        ("seconds", f"{report.timing.seconds:.1f} on {report.timing.device}"),
        ("by stage (s)", ", ".join(f"{k} {v:.2f}" for k, v in report.timing.stages.items())),
    ]
    for name, value in rows:
        table.add_row(name, value)
    top = sorted(s.units_per_layer, key=lambda c: -c.count)[:5]
    table.caption = "most used layers: " + ", ".join(f"{c.layer} ({c.count})" for c in top)
    return table


def run_scan(
    auditor: Auditor, ids: list[int], settings: ScanSettings, *, journal: Path | None, resume: bool
) -> ScanReport:
    """Scan with a progress bar on stderr."""
    with progress() as bar:
        task = bar.add_task("scanning", total=len(ids), status="")
        return auditor.scan(
            ids,
            settings=settings,
            journal=journal,
            resume=resume,
            on_progress=lambda done, total: bar.update(task, completed=done),
        )


@app.command()
@with_options(LOADING, SCAN)
def scan(
    model: ModelArg,
    flagged: FlaggedOpt,
    load: LoadOptions,
    settings: ScanSettings,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the JSON report.")] = Path(
        "scan.json"
    ),
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write a self-contained HTML page here.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted scan from its journal.")
    ] = False,
) -> None:
    """Find, for each flagged example, the few units whose zeroing flips its prediction.

    Under ``torchrun --nproc-per-node N -m memaudit scan ...`` the ids are shared out between
    the N processes (one model replica each, on cuda:LOCAL_RANK when there is CUDA); each
    writes its own journal next to --out, and rank 0 writes the merged report.
    """
    writable(out_path, "--out")
    if html is not None:
        writable(html, "--html")
    settings = scan_settings(settings)  # the scorer must be registered
    load = load.model_copy(update={"device": rank_device(load.device)})
    inputs = load_inputs(model, flagged=flagged, options=load)
    ids = inputs.ids
    journal = out_path.with_suffix(".journal.jsonl")
    with process_group(load.device, most=len(ids), per="flagged ids") as world:
        report = run_scan(inputs.auditor, ids, settings, journal=journal, resume=resume)
    if world.rank != 0:
        return
    stages = {**inputs.seconds, **report.timing.stages}
    report = report.model_copy(
        update={"timing": report.timing.model_copy(update={"stages": stages})}
    )
    report.to_json(out_path)
    journals.remove(journal)
    if html is not None:
        write_html(html, report, command=command_line())
        err.print(f"page written to {html}")
    out.print(scan_table(report, title=f"scan of {len(ids)} flagged examples"))
    err.print(f"report written to {out_path}")
