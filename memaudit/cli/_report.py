"""``memaudit report``, ``memaudit audit`` and ``memaudit schema``."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from memaudit.audit import AuditResult
from memaudit.audit import check_plan as audit_check
from memaudit.auditor import Auditor
from memaudit.cli._app import app, err, out
from memaudit.cli._common import (
    LOADING,
    SCAN,
    UNLEARN,
    FlaggedOpt,
    LoadOptions,
    ModelArg,
    load_inputs,
    writable,
)
from memaudit.cli._options import Group, with_options
from memaudit.cli._testbed import StageBars, progress
from memaudit.errors import MemauditError
from memaudit.localize import scan_settings
from memaudit.render.html import Page, read_html, write_html
from memaudit.render.markdown import render_markdown
from memaudit.render.sentences import gate_message
from memaudit.schema import KINDS, AuditPlan, AuditReport, Report, ScanSettings, UnlearnSettings
from memaudit.schema._audit import StageTime

ARGV: list[str] = []  # the arguments main() was given, for the report's command line


class GateFailed(Exception):
    """An audit ran to the end but a gate failed (exit code 1; not an error of the audit)."""


class ImagesMode(str, Enum):
    NONE = "none"
    THUMB = "thumb"


def command_line() -> str:
    """The exact command that is running, as a shell would take it."""
    return shlex.join(["memaudit", *(ARGV or sys.argv[1:])])


# --- memaudit report --------------------------------------------------------------------------


def _read(paths: list[Path]) -> Page:
    reports: list[Report] = []
    thumbs: dict[int, str] = {}
    for path in paths:
        if path.suffix.lower() in (".html", ".htm"):
            page = read_html(path)
            reports += page.reports
            thumbs.update(page.thumbnails)
        else:
            from memaudit.schema import read_json

            reports.append(read_json(path))
    return Page(reports=reports, thumbnails=thumbs)


@app.command()
def report(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Report files: JSON reports or memaudit HTML pages.", show_default=False
        ),
    ],
    html_path: Annotated[
        Path | None, typer.Option("--html", help="Write one self-contained HTML page here.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Re-export the (single) report as JSON here.")
    ] = None,
    md_path: Annotated[
        Path | None, typer.Option("--md", help="Write a short Markdown summary here.")
    ] = None,
    localized_units: Annotated[
        int | None,
        typer.Option(
            help="'Localized' means flips with at most N units (default: 5 or the audit's)."
        ),
    ] = None,
) -> None:
    """Render reports as one HTML page (or re-export them); prints a Markdown summary otherwise.

    Scans after the first are shown as comparison groups; an HTML page written by memaudit can be
    read back (``memaudit report audit.html --json audit.json``).
    """
    for path, option in ((html_path, "--html"), (json_path, "--json"), (md_path, "--md")):
        if path is not None:
            writable(path, option)
    page = _read(files)
    if html_path is not None:
        written = write_html(
            html_path,
            *page.reports,
            images=page.thumbnails or None,
            localized_units=localized_units,
        )
        err.print(f"HTML report written to {written}")
    if json_path is not None:
        if len(page.reports) != 1:
            kinds = ", ".join(r.kind for r in page.reports)
            raise MemauditError(f"--json exports one report; the files hold {kinds}")
        err.print(f"JSON report written to {page.reports[0].to_json(json_path)}")
    summary = render_markdown(*page.reports, localized_units=localized_units)
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(summary + "\n")
        err.print(f"Markdown summary written to {md_path}")
    if html_path is None and json_path is None and md_path is None:
        out.print(summary, markup=False, highlight=False)


@app.command()
def schema(
    kind: Annotated[str, typer.Argument(help=f"Report kind: {', '.join(KINDS)}.")],
) -> None:
    """Print the JSON Schema of a report kind."""
    from memaudit.schema import report_class

    out.print_json(json.dumps(report_class(kind).model_json_schema()))


# --- memaudit audit ---------------------------------------------------------------------------


def audit_table(report: AuditReport) -> Table:
    """What a person reads at the end of ``memaudit audit``."""
    v = report.verdict
    table = Table(title=f"audit of {v.n_flagged} flagged examples")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("predicted as given label (before)", f"{v.n_correct_before} of {v.n_flagged}")
    table.add_row(
        f"localized (flip with <= {v.localized_units} units)",
        f"{v.n_localized} ({v.localized_fraction:.0%})",
    )
    table.add_row("median units to flip", "-" if v.median_units is None else f"{v.median_units:g}")
    if report.unlearn is not None:
        u = report.unlearn
        table.add_row(
            f"flagged accuracy ({u.method})",
            f"{u.before.flagged_accuracy:.1%} -> {u.after.flagged_accuracy:.1%}",
        )
        table.add_row(
            "retained accuracy",
            f"{u.before.retained_accuracy:.1%} -> {u.after.retained_accuracy:.1%}",
        )
        if u.before.test_accuracy is not None and u.after.test_accuracy is not None:
            table.add_row(
                "test accuracy", f"{u.before.test_accuracy:.1%} -> {u.after.test_accuracy:.1%}"
            )
    if v.n_localized_after is not None:
        table.add_row("still localized after unlearning", str(v.n_localized_after))
    return table


def _run_audit(auditor: Auditor, ids: list[int], **kw: Any) -> AuditResult:
    """The audit of the auditor's model and data, with one progress bar per stage (stderr)."""
    with progress() as bar:
        return auditor.audit(ids, on_progress=StageBars(bar), **kw)


PLAN = Group(AuditPlan, "plan", "audit setting", skip=("scan", "unlearn"))
AUDIT_UNLEARN = dataclasses.replace(UNLEARN, skip=("options", "seed", "batch_size"))  # the scan's


@app.command("audit")
@with_options(LOADING, SCAN, PLAN, AUDIT_UNLEARN)
def audit_command(
    model: ModelArg,
    flagged: FlaggedOpt,
    load: LoadOptions,
    settings: ScanSettings,
    plan: AuditPlan,
    unlearning: UnlearnSettings,
    out_dir: Annotated[
        Path, typer.Option("--out-dir", help="Directory for audit.json, .html, .md and the model.")
    ],
    images: Annotated[
        ImagesMode,
        typer.Option(
            help="Thumbnails of flagged images in the HTML (they are sensitive: none by default)."
        ),
    ] = ImagesMode.NONE,
) -> None:
    """Scan the flagged ids, unlearn them, re-scan; write audit.json/.html/.md and the model.

    Exit codes: 0 passed, 1 a gate failed, 2 bad input or usage, 3 the audit itself failed.
    The scan's --seed also seeds the unlearning.
    """
    command = command_line()
    started, start = datetime.now(timezone.utc), time.perf_counter()
    writable(out_dir, "--out-dir", folder=True)
    settings = scan_settings(settings)  # the scorer must be registered
    unlearning = unlearning.model_copy(update={"seed": settings.seed})
    plan = plan.model_copy(update={"scan": settings, "unlearn": unlearning})
    audit_check(plan)  # bad gates fail before loading
    inputs = load_inputs(model, flagged=flagged, options=load)
    ids, auditor = inputs.ids, inputs.auditor
    load_time = StageTime(stage="load", started=started, seconds=time.perf_counter() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = _run_audit(
        auditor,
        ids,
        plan=plan,
        out_model=None if plan.no_unlearn else out_dir / "unlearned.safetensors",
        command=command,
        weights_file=Path(model) if Path(model).exists() else None,
        flagged_file=flagged,
        stages=[load_time],
    )
    _write_outputs(
        result.report, out_dir, images=inputs.train if images is ImagesMode.THUMB else None
    )
    out.print(audit_table(result.report))
    for gate in result.report.gates:
        if gate.passed:
            err.print(gate_message(gate), highlight=False, markup=False)
    failed = [g for g in result.report.gates if not g.passed]
    if failed:
        raise GateFailed("; ".join(gate_message(g) for g in failed))


def _write_outputs(report: AuditReport, out_dir: Path, *, images: Any) -> None:
    report.to_json(out_dir / "audit.json")
    write_html(out_dir / "audit.html", report, images=images)
    (out_dir / "audit.md").write_text(render_markdown(report) + "\n")
    err.print(
        f"audit written to {out_dir}/: audit.json, audit.html, audit.md"
        + ("" if report.unlearn is None else ", unlearned.safetensors")
    )
