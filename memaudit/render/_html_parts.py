"""Building blocks of the HTML report: escaping, figures, tables, and the probe sections."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from memaudit.render import _plots as plots
from memaudit.schema._base import Report
from memaudit.schema._probes import GradientsReport, RetrainReport, RewindReport


def e(value: object) -> str:
    """HTML-escape anything (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def figure(svg: str, caption: str) -> str:
    return f'<figure class="plot">{svg}<figcaption>{e(caption)}</figcaption></figure>'


def dl(items: Sequence[tuple[str, str]]) -> str:
    """A definition list; values are HTML already (callers escape)."""
    rows = "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f"<dl>{rows}</dl>"


def kv_table(values: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(fmt(v))}</td></tr>" for k, v in values.items())
    return f'<table class="kv">{rows}</table>'


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "—"
    return str(value)


# --- probes -----------------------------------------------------------------------------------


def probe_section(report: Report) -> str:
    if isinstance(report, GradientsReport):
        return _gradients(report)
    if isinstance(report, RewindReport):
        return _rewind(report)
    if isinstance(report, RetrainReport):
        return _retrain(report)
    return ""


def _epochs(epochs: Sequence[int | None]) -> list[str]:
    return ["?" if x is None else str(x) for x in epochs]


def _gradients(r: GradientsReport) -> str:
    names = [x.name for x in r.layers]
    ratio = [
        [
            f / c if f is not None and c else None
            for f, c in zip(x.flagged_norm, x.clean_norm, strict=True)
        ]
        for x in r.layers
    ]
    top = max([v for row in ratio for v in row if v is not None] or [1.0])
    figures = [
        figure(
            plots.heatmap(
                names,
                _epochs(r.epochs),
                [x.cosine for x in r.layers],
                label="cosine(flagged, clean)",
                vmin=-1,
                vmax=1,
                cmap="RdBu",
                title="Gradient cosine per layer and epoch",
            ),
            "Cosine similarity of the summed flagged and clean gradients (negative: they pull "
            "in opposite directions).",
        ),
        figure(
            plots.heatmap(
                names,
                _epochs(r.epochs),
                ratio,
                label="flagged / clean norm",
                vmin=0,
                vmax=top,
                title="Gradient norm ratio per layer and epoch",
            ),
            f"Norm of the flagged gradient over the clean one ({r.n_flagged} flagged, "
            f"{r.n_clean} clean examples; norms per sqrt(#parameters)).",
        ),
    ]
    return _section(
        "Probe: gradient accounting",
        r,
        figures,
        f"grouping {r.grouping.value}, measured during {r.mode}",
    )


def _rewind(r: RewindReport) -> str:
    names = [x.name for x in r.layers]
    figures = [
        figure(
            plots.heatmap(
                names,
                [str(x) for x in r.epochs],
                [x.flagged for x in r.layers],
                label="flagged accuracy",
                vmin=0,
                vmax=1,
                title="Flagged accuracy with one layer rewound",
            ),
            "Flagged (given-label) accuracy of the final model with one layer set to its weights "
            "of an earlier epoch.",
        )
    ]
    if r.epochs:
        column = 0
        figures.append(
            figure(
                plots.layer_bars(
                    names,
                    {
                        "flagged": [x.flagged[column] for x in r.layers],
                        "clean": [x.clean[column] for x in r.layers],
                    },
                    xlabel=f"accuracy with the layer rewound to epoch {r.epochs[column]}",
                    baseline=r.baseline.flagged,
                    title="Rewinding one layer",
                ),
                "Red: flagged accuracy; blue: clean accuracy. A layer that held the memorization "
                "would drop the red bar to near 0.",
            )
        )
    return _section("Probe: layer rewinding", r, figures, f"grouping {r.grouping.value}")


def _retrain(r: RetrainReport) -> str:
    names = [x.name for x in r.layers]
    bars = figure(
        plots.layer_bars(
            names,
            {
                "rewound": [x.rewound.flagged for x in r.layers],
                "retrained": [x.retrained.flagged for x in r.layers],
            },
            xlabel="flagged accuracy",
            baseline=r.baseline.flagged,
            title="Rewind, then retrain one layer on clean data",
        ),
        f"Flagged accuracy after rewinding each layer to epoch {r.rewind_epoch}, and after "
        f"retraining it alone for {r.train_epochs} epochs on the clean examples.",
    )
    return _section("Probe: layer retraining", r, [bars], f"grouping {r.grouping.value}")


def _section(heading: str, report: Any, figures: list[str], note: str) -> str:
    return (
        f'<section class="probe"><h2>{e(heading)}</h2><p class="muted">{e(report.model)} on '
        f"{e(report.data)}; {e(note)}.</p>{''.join(figures)}</section>"
    )
