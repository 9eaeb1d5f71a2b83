"""The sections of the HTML page (header, verdict, gates, plots, settings; the tables are in
``_tables``): pure functions of a :class:`View` of the reports, returning escaped HTML."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from memaudit._version import __version__
from memaudit.render import _plots as plots
from memaudit.render._html_parts import dl, e, figure, kv_table, probe_section
from memaudit.render._tables import examples_table, membership_table
from memaudit.render._view import View
from memaudit.render.sentences import gate_message, unlearn_sentences, verdict_sentences
from memaudit.schema._base import Report
from memaudit.schema._inputs import Preflight
from memaudit.schema._scan import ScanReport, Status
from memaudit.schema._unlearn import UnlearnReport

# --- public API -------------------------------------------------------------------------------


def page_title(view: View) -> str:
    if view.audit is not None:
        return "memaudit audit report"
    if view.scan is not None:
        return "memaudit scan report"
    if view.unlearns:
        return "memaudit unlearning report"
    return "memaudit probe report"


def body(view: View, thumbs: Mapping[int, str], *, title: str | None) -> str:
    parts = [
        f"<h1>{e(title or page_title(view))}</h1>",
        _header(view),
        _verdict(view),
        _gates(view),
        _plots_section(view),
        examples_table(view, thumbs),
        membership_table(view),
        *(probe_section(p) for p in view.probes),
        _settings(view),
        f"<footer>memaudit {e(__version__)} · self-contained page: no network access</footer>",
    ]
    return "\n".join(p for p in parts if p)


def _header(view: View) -> str:
    items: list[tuple[str, str]] = []
    scan = view.scan
    first: Report | None = view.audit or scan or (view.unlearns or view.probes or [None])[0]
    if scan is not None:
        m, d = scan.model, scan.data
        items.append(
            (
                "Model",
                f"{e(m.source)} <span class=muted>({e(m.arch)}, {m.n_parameters:,} "
                f"parameters, {m.n_units:,} units)</span>",
            )
        )
        test = f"; test split {e(d.test_split)} ({d.n_test:,})" if d.test_split else ""
        items.append(
            (
                "Data",
                f"{e(d.source)} <span class=muted>(split {e(d.split)}: {d.n_examples:,} "
                f"examples, {d.n_classes} classes{test})</span>",
            )
        )
        items.append(("Flagged examples", f"{scan.summary.n_flagged:,}"))
    else:
        other: Any = first
        if other is not None and hasattr(other, "model"):
            items.append(("Model", e(other.model)))
            items.append(("Data", e(other.data)))
            items.append(("Flagged examples", f"{other.n_flagged:,}"))
    checked = _preflight(view)
    if checked is not None:
        items.append(("Inputs", e(checked.preprocessing.describe())))
        items.append(
            (
                "Preflight",
                f"{e(checked.describe())} <span class=muted>({e(checked.threshold())})</span>",
            )
        )
    if first is not None:
        items.append(("Date", e(first.created.strftime("%Y-%m-%d %H:%M:%S %Z").strip())))
        items.append(("Tool version", f"memaudit {e(first.memaudit_version)}"))
    command = (view.audit.provenance.command if view.audit else None) or view.command
    items.append(
        (
            "Command",
            f"<code>{e(command)}</code>"
            if command
            else "<span class=muted>not recorded "
            "(made through the Python API or from report files)</span>",
        )
    )
    return f'<section class="header">{dl(items)}</section>'


def _preflight(view: View) -> Preflight | None:
    """The check of the audited model (before any edit): of the scan, or else of a run."""
    runs: list[Any] = [view.scan, *view.unlearns, *view.probes]
    return next((r.preflight for r in runs if r is not None and r.preflight is not None), None)


def _verdict(view: View) -> str:
    if view.scan is None or view.verdict is None:
        if not view.unlearns:
            return ""
        lines = unlearn_sentences(view.unlearns)
    else:
        skipped = view.audit is not None and view.audit.unlearn is None
        lines = verdict_sentences(
            view.scan,
            view.verdict,
            unlearns=view.unlearns,
            rescan=view.rescan,
            comparisons=view.comparisons,
            unlearn_skipped=skipped,
        )
    items = "".join(f"<li>{e(line)}</li>" for line in lines)
    return f'<section class="verdict"><h2>Verdict</h2><ul>{items}</ul></section>'


def _gates(view: View) -> str:
    if view.audit is None or not view.audit.gates:
        return ""
    rows = "".join(
        f'<li class="{"pass" if g.passed else "fail"}">{"PASS" if g.passed else "FAIL"}: '
        f"{e(gate_message(g))}</li>"
        for g in view.audit.gates
    )
    return f'<section class="gates"><h2>Gates</h2><ul>{rows}</ul></section>'


def _plots_section(view: View) -> str:
    figures = []
    scan = view.scan
    if scan is not None:
        figures += _scan_plots(view, scan)
    if view.unlearns:
        series: dict[str, dict[str, float | None]] = {
            "before": view.unlearns[0].before.model_dump()
        }
        for u in view.unlearns:
            series[f"after {u.method}"] = u.after.model_dump()
        retrain = next((u.retrain for u in view.unlearns if u.retrain), None)
        if retrain is not None:
            series["retrain"] = retrain.model_dump()
        figures.append(
            figure(
                plots.accuracy_bars(series, title="Before and after unlearning"),
                "Accuracy on the flagged (given labels), retained and test examples, and the "
                "loss-threshold AUC of flagged ids against test images (not a membership test: "
                "see the ROC curves).",
            )
        )
        figures += _roc_plots(view.unlearns)
    if not figures:
        return ""
    return f'<section class="plots"><h2>Plots</h2>{"".join(figures)}</section>'


def _roc_plots(unlearns: Sequence[UnlearnReport]) -> list[str]:
    tested = [u for u in unlearns if u.membership is not None]
    if not tested:
        return []
    first = tested[0].membership
    assert first is not None
    found = [("before", first.before)]
    found += [(f"after {u.method}", u.membership.after) for u in tested if u.membership]
    if first.retrain is not None:
        found.append(("retrain", first.retrain))
    curves = {name: (f.roc.fpr, f.roc.tpr) for name, f in found if f.roc is not None}
    if not curves:
        return []
    return [
        figure(
            plots.roc_curves(curves, title="Membership test: ROC of the flagged ids"),
            f"The flagged ids under each model (positives) against the same ids under "
            f"{first.n_references} models trained without them (negatives). A model that "
            "forgot them lies on the diagonal; a curve far above it still recognises them, one "
            "far below it marks them as different from unseen ids (also a signal).",
        )
    ]


def _flipped_units(scan: ScanReport) -> list[int]:
    return [x.n_units_minimal for x in scan.examples if x.status is Status.FLIPPED]


def _scan_plots(view: View, scan: ScanReport) -> list[str]:
    groups = {"flagged": _flipped_units(scan)}
    for i, other in enumerate(view.comparisons):
        groups["comparison" if i == 0 else f"comparison {i + 1}"] = _flipped_units(other)
    if view.rescan is not None and _flipped_units(view.rescan):
        groups["after unlearning"] = _flipped_units(view.rescan)
    figures = [
        figure(
            plots.units_histogram(groups, budget=scan.settings.max_units, title="Units to flip"),
            f"How many units must be zeroed to flip each prediction (budget "
            f"{scan.settings.max_units}); memorized examples need few.",
        )
    ]
    layers = [x.layer for x in scan.model.units_per_layer]
    per_layer = {"flagged": {x.layer: x.count for x in scan.summary.units_per_layer}}
    for i, other in enumerate(view.comparisons):
        name = "comparison" if i == 0 else f"comparison {i + 1}"
        per_layer[name] = {x.layer: x.count for x in other.summary.units_per_layer}
    figures.append(
        figure(
            plots.units_per_layer(layers, per_layer, title="Where the units sit"),
            "Share of the units found in each layer, in network order (input at the top).",
        )
    )
    test = scan.summary.test_accuracy_before is not None
    cost = {"flagged": _costs(scan, test=test)}
    for i, other in enumerate(view.comparisons):
        cost["comparison" if i == 0 else f"comparison {i + 1}"] = _costs(other, test=test)
    label = "test" if test else "reference"
    figures.append(
        figure(
            plots.edit_cost(cost, ylabel=f"{label} accuracy drop (pts)", title="Cost of each edit"),
            f"Accuracy points lost on the {label} examples when an example's units are zeroed.",
        )
    )
    return figures


def _costs(scan: ScanReport, *, test: bool) -> list[tuple[int, float]]:
    s = scan.summary
    before = s.test_accuracy_before if test else s.reference_accuracy_before
    if before is None:
        return []
    points = []
    for x in scan.examples:
        after = x.test_accuracy if test else x.reference_accuracy
        if x.status is Status.FLIPPED and after is not None:
            points.append((x.n_units_minimal, (before - after) * 100))
    return points


def _settings(view: View) -> str:
    blocks = []
    if view.scan is not None:
        blocks.append(("Scan settings", kv_table(view.scan.settings.model_dump(mode="json"))))
        t = view.scan.timing
        timing = {
            "scan seconds": t.seconds,
            "examples / s": t.examples_per_second,
            "device": t.device,
            **{f"{stage} (s)": seconds for stage, seconds in t.stages.items()},
        }
        if view.rescan is not None:
            timing["rescan seconds"] = view.rescan.timing.seconds
        for i, c in enumerate(view.comparisons):
            timing[f"comparison scan {i + 1} seconds"] = c.timing.seconds
        blocks.append(("Timing", kv_table(timing)))
    for u in view.unlearns:
        values = {
            "method": u.method,
            **u.settings,
            "seconds": u.seconds,
            "retrain seconds": u.retrain_seconds,
            "flagged": u.n_flagged,
            "retained": u.n_retained,
            "test": u.n_test,
            "unlearned model": u.out_model,
        }
        blocks.append((f"Unlearning: {u.method}", kv_table(values)))
    if view.audit is not None:
        p = view.audit.provenance
        stages = {f"{s.stage} (s)": s.seconds for s in p.stages}
        blocks.append(("Stages", kv_table(stages)))
        files = {
            "weights": p.weights,
            "flagged ids": p.flagged_ids,
            "unlearned model": p.unlearned_model,
        }
        blocks.append(
            (
                "Files (SHA-256)",
                kv_table(
                    {
                        k: f"{v.path}  sha256:{v.sha256}  ({v.bytes:,} bytes)" if v else None
                        for k, v in files.items()
                    }
                ),
            )
        )
        blocks.append(("Seeds", kv_table(p.seeds)))
        env = {
            **p.versions,
            "device": p.device,
            "device name": p.device_name,
            "platform": p.platform,
        }
        blocks.append(("Environment", kv_table(env)))
    reports = {
        role: f"{r.kind}, memaudit {r.memaudit_version}, schema {r.schema_version}, "
        f"{r.created.isoformat()}"
        for role, r in _roles(view)
    }
    blocks.append(("Embedded reports", kv_table(reports)))
    inner = "".join(f"<div><h3>{e(h)}</h3>{t}</div>" for h, t in blocks)
    return (
        f'<section class="settings"><h2>Settings, timings, environment</h2>'
        f'<div class="grid">{inner}</div></section>'
    )


def _roles(view: View) -> list[tuple[str, Report]]:
    found: list[tuple[str, Report | None]] = [
        ("audit", view.audit),
        ("scan", view.scan),
        ("rescan (unlearned model)", view.rescan),
        *((f"comparison scan {i + 1}", c) for i, c in enumerate(view.comparisons)),
        *((f"unlearning: {u.method}", u) for u in view.unlearns),
        *((f"probe: {p.kind}", p) for p in view.probes),
    ]
    return [(role, r) for role, r in found if r is not None]
