"""Server-side plots for the HTML report: matplotlib (no pyplot, no global backend) to inline SVG.

Every function takes names and numbers and returns an ``<svg>`` element as a string. Text stays
text (``svg.fonttype = none``), is XML-escaped by matplotlib, and is never parsed as math, so a
layer or class name like ``<script>`` or ``$x$`` shows as written.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COLORS = {
    "flagged": "#c0392b",
    "comparison": "#2c7fb8",
    "clean": "#2c7fb8",
    "after unlearning": "#7f7f7f",
    "before": "#9e9e9e",
    "retrain": "#2ca02c",
}
_CYCLE = ("#e6550d", "#756bb1", "#31a354", "#636363", "#fd8d3c", "#3182bd")
_WIDTH = 6.4


def color(name: str, i: int = 0) -> str:
    """A stable color per series name (flagged red, comparison blue, ...)."""
    return COLORS.get(name, _CYCLE[i % len(_CYCLE)])


@contextmanager
def _figure(name: str, height: float) -> Iterator[Figure]:
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    rc: dict[Any, Any] = {
        "svg.fonttype": "none",
        "svg.hashsalt": name,  # ids stay unique between the SVGs of one page, and stable
        "text.parse_math": False,
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
    }
    with rc_context(rc):
        yield Figure(figsize=(_WIDTH, height), layout="constrained")


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    start = text.index("<svg")
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", text[start:], flags=re.S)
    return svg.replace("<svg ", '<svg role="img" ', 1)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def units_histogram(
    groups: Mapping[str, Sequence[int]], *, budget: int | None = None, title: str = ""
) -> str:
    """Histogram of units-to-flip per group (shares within each group, so sizes compare)."""
    with _figure("units-histogram", 2.8) as fig:
        ax = fig.add_subplot()
        values = [v for vs in groups.values() for v in vs]
        if not values:
            _empty(ax, "no example flipped")
        else:
            top = max(values)
            edges = list(np.arange(0.5, top + 1.5, max(1, int(np.ceil(top / 40)))))
            for i, (name, counts) in enumerate(groups.items()):
                if counts:
                    weights = np.full(len(counts), 1 / len(counts))
                    ax.hist(
                        counts,
                        bins=edges,
                        weights=weights,
                        alpha=0.6,
                        color=color(name, i),
                        label=f"{name} (n={len(counts)})",
                    )
            ax.set_xlabel("units zeroed to flip the prediction (minimal set)")
            ax.set_ylabel("share of flipped examples")
            ax.legend(frameon=False)
            if budget is not None:
                ax.set_xlim(0, max(top, 1) + 1)
        ax.set_title(title, loc="left")
        return _svg(fig)


def units_per_layer(
    layers: Sequence[str], groups: Mapping[str, Mapping[str, int]], *, title: str = ""
) -> str:
    """Horizontal bars: units found in each layer, layers in network order (input at the top)."""
    height = min(14.0, 1.0 + 0.17 * max(1, len(layers)) * max(1, len(groups)) ** 0.5)
    with _figure("units-per-layer", height) as fig:
        ax = fig.add_subplot()
        if not layers or not any(sum(g.values()) for g in groups.values()):
            _empty(ax, "no units found")
        else:
            y = np.arange(len(layers))
            width = 0.8 / max(1, len(groups))
            for i, (name, counts) in enumerate(groups.items()):
                total = sum(counts.values()) or 1
                share = [counts.get(layer, 0) / total for layer in layers]
                ax.barh(
                    y + i * width,
                    share,
                    height=width,
                    color=color(name, i),
                    label=f"{name} ({sum(counts.values())} units)",
                )
            ax.set_yticks(y + width * (len(groups) - 1) / 2, labels=list(layers), fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("share of the units found")
            fig.legend(frameon=False, loc="outside lower center", ncols=min(3, len(groups)))
        ax.set_title(title, loc="left")
        return _svg(fig)


METRICS = ("flagged_accuracy", "retained_accuracy", "test_accuracy", "mia_auc")
_METRIC_LABELS = ("flagged acc.", "retained acc.", "test acc.", "loss AUC vs test")


def accuracy_bars(series: Mapping[str, Mapping[str, float | None]], *, title: str = "") -> str:
    """Grouped bars per metric (accuracies, loss AUC vs test), one bar per series."""
    with _figure("accuracy-bars", 2.8) as fig:
        ax = fig.add_subplot()
        x = np.arange(len(METRICS))
        width = 0.8 / max(1, len(series))
        for i, (name, scores) in enumerate(series.items()):
            heights = [scores.get(m) for m in METRICS]
            bars = ax.bar(
                x + i * width,
                [h if h is not None else 0.0 for h in heights],
                width=width,
                color=color(name, i),
                label=name,
            )
            labels = ["n/a" if h is None else f"{h:.2f}" for h in heights]
            ax.bar_label(bars, labels=labels, fontsize=6, padding=1)
        ax.set_xticks(x + width * (len(series) - 1) / 2, labels=_METRIC_LABELS)
        ax.set_ylim(0, 1.1)
        ax.axhline(0.5, color="#bbb", lw=0.6, ls=":")
        fig.legend(
            frameon=False, fontsize=7, ncols=min(4, max(1, len(series))), loc="outside lower center"
        )
        ax.set_title(title, loc="left")
        return _svg(fig)


def roc_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str = ""
) -> str:
    """ROC curves (FPR on a log scale, as low-FPR membership tests are read), one per model,
    with the chance line; a model at chance lies on the diagonal."""
    with _figure("roc", 3.0) as fig:
        ax = fig.add_subplot()
        shown = {k: v for k, v in curves.items() if len(v[0]) > 1}
        if not shown:
            _empty(ax, "too few negatives for a curve")
        low = min((min(f for f in fpr if f > 0) for fpr, _ in shown.values()), default=1e-3)
        for i, (name, (fpr, tpr)) in enumerate(shown.items()):
            xs = np.maximum(np.asarray(fpr, dtype=float), low)  # FPR 0 drawn at the left edge
            ax.step(xs, tpr, where="post", color=color(name, i), label=name, lw=1.2)
        if shown:
            grid = np.logspace(np.log10(low), 0, 50)
            ax.plot(grid, grid, color="#bbb", lw=0.6, ls=":", label="chance")
            ax.set_xscale("log")
            ax.set_xlim(low, 1)
            ax.set_ylim(0, 1.02)
            ticks = [t for t in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) if t >= low]
            ax.set_xticks(ticks, labels=[f"{100 * t:g}%" for t in ticks])  # no math text
            ax.set_xticks([], minor=True)
            ax.set_xlabel("false positive rate (unseen ids called members)")
            ax.set_ylabel("true positive rate")
            fig.legend(frameon=False, fontsize=7, ncols=4, loc="outside lower center")
        ax.set_title(title, loc="left")
        return _svg(fig)


def edit_cost(
    groups: Mapping[str, Sequence[tuple[int, float]]], *, ylabel: str, title: str = ""
) -> str:
    """Scatter: units zeroed (x) against the accuracy points the edit cost (y), one dot per edit."""
    with _figure("edit-cost", 2.8) as fig:
        ax = fig.add_subplot()
        if not any(groups.values()):
            _empty(ax, "no edit to measure")
        for i, (name, points) in enumerate(groups.items()):
            if points:
                xs, ys = zip(*points, strict=True)
                jitter = np.random.default_rng(i).uniform(-0.2, 0.2, len(xs))
                ax.scatter(
                    np.asarray(xs) + jitter,
                    ys,
                    s=9,
                    alpha=0.55,
                    color=color(name, i),
                    label=f"{name} (mean {np.mean(ys):.2f} pts)",
                    linewidths=0,
                )
        if any(groups.values()):
            ax.axhline(0, color="#bbb", lw=0.6)
            ax.set_xlabel("units zeroed (minimal set)")
            ax.set_ylabel(ylabel)
            ax.legend(frameon=False)
        ax.set_title(title, loc="left")
        return _svg(fig)


def heatmap(
    rows: Sequence[str],
    columns: Sequence[str],
    values: Sequence[Sequence[float | None]],
    *,
    label: str,
    vmin: float,
    vmax: float,
    cmap: str = "viridis",
    xlabel: str = "epoch",
    title: str = "",
) -> str:
    """A rows x columns heat-map (layers x epochs); None cells are blank."""
    height = min(14.0, 1.2 + 0.17 * max(1, len(rows)))
    with _figure(f"heatmap-{title}", height) as fig:
        ax = fig.add_subplot()
        grid = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
        if grid.size == 0:
            _empty(ax, "no data")
        else:
            image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_yticks(np.arange(len(rows)), labels=list(rows), fontsize=7)
            step = max(1, len(columns) // 15)
            ticks = list(range(0, len(columns), step))
            ax.set_xticks(ticks, labels=[columns[t] for t in ticks], fontsize=7)
            ax.set_xlabel(xlabel)
            fig.colorbar(image, ax=ax, label=label, shrink=0.8)
        ax.set_title(title, loc="left")
        return _svg(fig)


def layer_bars(
    layers: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str,
    baseline: float | None = None,
    title: str = "",
) -> str:
    """Horizontal bars per layer (network order) for one or more series; optional baseline line."""
    height = min(14.0, 1.0 + 0.17 * max(1, len(layers)) * max(1, len(series)) ** 0.5)
    with _figure(f"layer-bars-{title}", height) as fig:
        ax = fig.add_subplot()
        y = np.arange(len(layers))
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            ax.barh(
                y + i * width,
                [v if v is not None else 0.0 for v in values],
                height=width,
                color=color(name, i),
                label=name,
            )
        if baseline is not None:
            ax.axvline(baseline, color="#333", lw=0.8, ls="--", label="final model")
        ax.set_yticks(y + width * (len(series) - 1) / 2, labels=list(layers), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.05)
        ax.set_xlabel(xlabel)
        fig.legend(frameon=False, fontsize=7, loc="outside lower center", ncols=len(series) + 1)
        ax.set_title(title, loc="left")
        return _svg(fig)


def thumbnail(image: Any, *, size: int = 32) -> str:
    """A ``data:`` URI of one ``uint8 [C, H, W]`` image, downscaled to at most ``size`` pixels.

    Grayscale becomes a PNG (small and exact), color a JPEG (about 1 KB at 32 px).
    """
    from PIL import Image

    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    picture = Image.fromarray(array[..., :3] if array.ndim == 3 else array)
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    if picture.mode == "L":
        picture.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    else:
        picture.convert("RGB").save(buffer, format="JPEG", quality=80)
        mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
