"""A short Markdown summary of reports: for a CI job summary or a pull-request comment.

Example:
    >>> from memaudit.schema import AuditReport                     # doctest: +SKIP
    >>> print(render_markdown(AuditReport.from_json("audit.json")))  # doctest: +SKIP
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

from memaudit.render.sentences import gate_message, unlearn_sentences, verdict_sentences
from memaudit.schema._audit import AuditReport, verdict
from memaudit.schema._base import Report, ReportError
from memaudit.schema._inputs import Preflight
from memaudit.schema._scan import ScanReport
from memaudit.schema._unlearn import UnlearnReport, UnlearnScores

LOCALIZED_UNITS = 5
_SPECIAL = re.compile(r"([\\`*_\[\]|~])")  # what can start markup mid-line


def md(text: object) -> str:
    """Escape text from models, data or files: Markdown shows it as written (no HTML, links)."""
    return _SPECIAL.sub(r"\\\1", html.escape(str(text), quote=False)).replace("\n", " ")


def render_markdown(*reports: Report, localized_units: int | None = None) -> str:
    """Header, verdict, gates and before/after numbers of an audit, scans or unlearning runs."""
    if not reports:
        raise ReportError("nothing to summarize: give at least one report")
    audit = next((r for r in reports if isinstance(r, AuditReport)), None)
    scans = [r for r in reports if isinstance(r, ScanReport)]
    unlearns = [r for r in reports if isinstance(r, UnlearnReport)]
    scan = audit.scan if audit else (scans[0] if scans else None)
    comparisons = ([audit.comparison] if audit and audit.comparison else []) + scans[
        0 if audit else 1 :
    ]
    if audit and audit.unlearn:
        unlearns.insert(0, audit.unlearn)
    lines = [f"## memaudit {'audit' if audit else reports[0].kind} report", ""]
    if scan is not None:
        lines += [
            "| | |",
            "|---|---|",
            f"| Model | {md(scan.model.source)} ({md(scan.model.arch)}) |",
            f"| Data | {md(scan.data.source)}, split {md(scan.data.split)} |",
            f"| Flagged examples | {scan.summary.n_flagged} |",
            *_preflight_rows(scan.preflight),
            f"| Date | {reports[0].created:%Y-%m-%d %H:%M UTC} |",
            f"| memaudit | {md(reports[0].memaudit_version)} |",
            "",
        ]
        found = (
            audit.verdict
            if audit
            else verdict(
                scan,
                localized_units=localized_units or LOCALIZED_UNITS,
                unlearn=unlearns[0] if unlearns else None,
            )
        )
        sentences = verdict_sentences(
            scan,
            found,
            unlearns=unlearns,
            rescan=audit.rescan if audit else None,
            comparisons=comparisons,
            unlearn_skipped=audit is not None and audit.unlearn is None,
        )
        lines += ["**Verdict**", "", *(f"- {md(s)}" for s in sentences), ""]
    elif unlearns:
        lines += ["**Verdict**", "", *(f"- {md(s)}" for s in unlearn_sentences(unlearns)), ""]
    if audit and audit.gates:
        lines += ["**Gates**", ""]
        lines += [f"- {'✅' if g.passed else '❌'} {md(gate_message(g))}" for g in audit.gates]
        lines.append("")
    if unlearns:
        lines += _scores_table(unlearns)
    if audit and audit.provenance.command:
        lines += [f"Command: `{audit.provenance.command.replace('`', '')}`", ""]
    return "\n".join(lines)


def _preflight_rows(checked: Preflight | None) -> list[str]:
    if checked is None:
        return []
    return [
        f"| Inputs | {md(checked.preprocessing.describe())} |",
        f"| Preflight | {md(checked.describe())} ({md(checked.threshold())}) |",
    ]


def _scores_table(unlearns: Sequence[UnlearnReport]) -> list[str]:
    columns: list[tuple[str, UnlearnScores]] = [("before", unlearns[0].before)]
    columns += [(f"after {u.method}", u.after) for u in unlearns]
    retrain = next((u.retrain for u in unlearns if u.retrain), None)
    if retrain is not None:
        columns.append(("retrain", retrain))
    rows = [
        ("flagged accuracy", "flagged_accuracy"),
        ("retained accuracy", "retained_accuracy"),
        ("test accuracy", "test_accuracy"),
        ("loss AUC vs test images", "mia_auc"),
    ]
    out = [
        "| | " + " | ".join(md(name) for name, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, key in rows:
        cells = [getattr(scores, key) for _, scores in columns]
        shown = ["n/a" if c is None else f"{c:.3f}" for c in cells]
        out.append(f"| {label} | " + " | ".join(shown) + " |")
    tested = next((u.membership for u in unlearns if u.membership), None)
    if tested is not None:  # the membership test of like with like (reference models)
        per_column = [
            tested.before,
            *(u.membership.after if u.membership else None for u in unlearns),
        ]
        if retrain is not None:
            per_column.append(tested.retrain)
        for label, pick in (("membership AUC", "auc"), ("TPR at 1% FPR", "tpr_at_1pct_fpr")):
            values = [getattr(f, pick).value if f is not None else None for f in per_column]
            shown = ["n/a" if v is None else f"{v:.3f}" for v in values]
            out.append(f"| {label} | " + " | ".join(shown) + " |")
    if retrain is not None:  # the average gap to the reference, per unlearning run
        gaps = [None, *(u.average_gap() for u in unlearns), 0.0]
        shown = ["" if g is None else f"{100 * g:.1f} pts" for g in gaps]
        out.append("| average gap to retrain | " + " | ".join(shown) + " |")
    return [*out, ""]
