"""``memaudit demo``: the whole audit on the bundled MNIST testbed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from memaudit.auditor import Auditor
from memaudit.cli._app import app, err, out
from memaudit.cli._common import DeviceOpt, preflight, writable
from memaudit.cli._report import _run_audit, audit_table, command_line
from memaudit.cli._scan import scan_table
from memaudit.cli._testbed import run_testbed, testbed_table
from memaudit.data import load_dataset, read_ids
from memaudit.models import load_model
from memaudit.render.html import write_html
from memaudit.render.markdown import render_markdown
from memaudit.schema import AuditReport, ScanReport
from memaudit.testbed import TestbedConfig, load_testbed


def comparison_table(noisy: ScanReport, clean: ScanReport) -> Table:
    """Memorized (mislabeled) vs clean examples: what the paper compares."""
    table = Table(title="units to flip: memorized (noisy) vs clean examples")
    table.add_column("")
    table.add_column("noisy", justify="right")
    table.add_column("clean", justify="right")

    def cell(report: ScanReport, what: str) -> str:
        s = report.summary
        values = {
            "examples": str(s.n_flagged),
            "flip rate": f"{s.flip_rate:.0%}",
            "median units (minimal)": f"{s.median_units_minimal or 0:g}",
            "mean units (minimal)": f"{s.mean_units_minimal or 0:.1f}",
            "test accuracy drop per edit": f"{s.mean_test_accuracy_drop or 0:.1%}",
        }
        return values[what]

    for what in (
        "examples",
        "flip rate",
        "median units (minimal)",
        "mean units (minimal)",
        "test accuracy drop per edit",
    ):
        table.add_row(what, cell(noisy, what), cell(clean, what))
    return table


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Working directory of the demo.")] = Path(
        "memaudit-demo"
    ),
    n: Annotated[
        int, typer.Option("--n", help="Noisy ids to audit (and as many clean ones); 0 = all.")
    ] = 100,
    device: DeviceOpt = "auto",
) -> None:
    """The whole audit on the bundled MNIST testbed (built on first run, then reused).

    Builds the label-noise testbed, scans noisy and clean examples, unlearns the noisy ones with
    example-tied dropout, re-scans, and writes demo-report.html (with thumbnails).
    """
    testbed_dir = writable(out_dir, "--out", folder=True) / "testbed"
    result = load_testbed(testbed_dir)
    if result is None:
        err.print("[bold]Building the label-noise testbed[/] (real MNIST, 10% wrong labels)")
        result = run_testbed(testbed_dir, TestbedConfig(), device)
    else:
        err.print(f"Reusing the testbed in {testbed_dir}")
    out.print(testbed_table(result))

    model = load_model(result.model)
    train = load_dataset(result.data, split="train", model=model)
    test = load_dataset(result.data, split="test", model=model)
    noisy = read_ids(result.noisy_ids)
    ids = noisy[:n] if n > 0 else noisy
    err.print(f"[bold]Auditing {len(ids)} noisy ids[/] and {len(ids)} clean ones for comparison")
    auditor = Auditor(model, train, test, device=device)
    preflight(auditor, ids)
    audit = _run_audit(
        auditor,
        ids,
        compare=len(ids),
        out_model=out_dir / "unlearned.safetensors",
        command=command_line(),
        weights_file=Path(result.model),
        flagged_file=Path(result.noisy_ids),
    )
    report: AuditReport = audit.report
    report.to_json(out_dir / "demo-audit.json")
    (out_dir / "demo-audit.md").write_text(render_markdown(report) + "\n")
    out.print(scan_table(report.scan, title="scan of the noisy (memorized) examples"))
    if report.comparison is not None:
        out.print(comparison_table(report.scan, report.comparison))
    out.print(audit_table(report))
    page = write_html(out_dir / "demo-report.html", report, images=train)
    out.print(f"report: {Path(page).resolve()}")
