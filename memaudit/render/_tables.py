"""The sortable tables of the HTML page: the flagged examples, and their membership scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from memaudit.render._html_parts import e
from memaudit.render._view import LOCALIZED_UNITS, View
from memaudit.schema._scan import ExampleResult


def _label(index: int | None, names: Sequence[str] | None) -> str:
    if index is None:
        return ""
    if names and 0 <= index < len(names) and names[index] != str(index):
        return f"{index} · {names[index]}"
    return str(index)


def _cell(text: object, sort: float | int | str | None = None, cls: str = "") -> str:
    attr = f' data-v="{e(sort)}"' if sort is not None else ""
    klass = f' class="{cls}"' if cls else ""
    return f"<td{attr}{klass}>{e(text)}</td>"


def _drop(before: float | None, after: float | None) -> str:
    return "" if before is None or after is None else f"{(before - after) * 100:.1f}"


def _units_text(x: ExampleResult, limit: int = 6) -> str:
    shown = ", ".join(f"{u.layer}[{u.index}]" for u in x.units[:limit])
    return shown + (f", … (+{len(x.units) - limit})" if len(x.units) > limit else "")


def examples_table(view: View, thumbs: Mapping[int, str]) -> str:
    scan = view.scan
    if scan is None:
        return ""
    names = scan.model.class_names
    after = {x.id: x for x in view.rescan.examples} if view.rescan else {}
    head = [
        "id",
        "given label",
        "predicted",
        "status",
        "units",
        "greedy units",
        "predicted after edit",
        "test drop (pts)",
        "ref. drop (pts)",
    ]
    if view.rescan is not None:
        head += ["predicted after unlearning", "still localized"]
    head.append("units found")
    if thumbs:
        head.insert(1, "image")
    s = scan.summary
    rows = []
    for x in scan.examples:
        cells = [
            _cell(x.id, x.id),
            _cell(_label(x.label, names), x.label),
            _cell(_label(x.predicted_before, names), x.predicted_before),
            _cell(x.status.value.replace("_", " "), cls=f"st-{x.status.value}"),
            _cell(x.n_units_minimal if x.flipped else "", x.n_units_minimal if x.flipped else ""),
            _cell(x.n_units if x.flipped else "", x.n_units if x.flipped else ""),
            _cell(_label(x.predicted_after, names)),
            _cell(d := _drop(s.test_accuracy_before, x.test_accuracy), d),
            _cell(d := _drop(s.reference_accuracy_before, x.reference_accuracy), d),
        ]
        if view.rescan is not None:
            y = after.get(x.id)
            cells.append(_cell(_label(y.predicted_before, names) if y else ""))
            localized = y is not None and y.flipped and y.n_units_minimal <= _cap(view)
            cells.append(_cell("yes" if localized else "no"))
        cells.append(_cell(_units_text(x), cls="units"))
        if thumbs:
            uri = thumbs.get(x.id)
            img = (
                f'<img class="thumb" data-id="{x.id}" alt="example {x.id}" src="{e(uri)}">'
                if uri
                else ""
            )
            cells.insert(1, f"<td>{img}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = "".join(f'<th scope="col" tabindex="0">{e(h)}</th>' for h in head)
    return (
        '<section class="examples"><h2>Flagged examples</h2>'
        '<p class="tools"><input type="search" class="search" placeholder="Search the table…" '
        'aria-label="Search the flagged examples" data-table="examples-table"> '
        f'<span class="count" data-for="examples-table">{len(rows)} of {len(rows)}</span> '
        '<span class="muted">Click a column title to sort.</span></p>'
        '<div class="scroll"><table class="sortable" id="examples-table">'
        f"<thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _cap(view: View) -> int:
    return view.verdict.localized_units if view.verdict else LOCALIZED_UNITS


def membership_table(view: View) -> str:
    """Each flagged id's membership score under each model (for one unlearning run)."""
    tested = next((u for u in view.unlearns if u.membership is not None), None)
    if tested is None or tested.membership is None:
        return ""
    m = tested.membership
    with_retrain = any(x.retrain is not None for x in m.scores)
    head = ["id", "before", f"after {tested.method}", *(["retrain"] if with_retrain else [])]
    rows = []
    for x in sorted(m.scores, key=lambda x: -x.after):
        values = [x.before, x.after, *([x.retrain] if with_retrain else [])]
        cells = [_cell(x.id, x.id), *(_cell("" if v is None else f"{v:.2f}", v) for v in values)]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = "".join(f'<th scope="col" tabindex="0">{e(h)}</th>' for h in head)
    return (
        '<section class="membership"><h2>Membership scores per flagged id</h2>'
        "<p class=muted>How many pooled standard deviations each id's logit margin lies above "
        f"its mean under the {m.n_references} reference models (0: like an unseen id; high: "
        "recognised as a member). Sorted by the score after unlearning; click a column title "
        "to sort.</p>"
        '<div class="scroll"><table class="sortable" id="membership-table">'
        f"<thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table></div></section>"
    )
