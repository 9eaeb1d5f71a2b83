"""The HTML report: a pure function of report objects to one self-contained, offline page.

The page carries its CSS, script and plots (inline SVG) inline, a Content-Security-Policy that
forbids every network load, and each report's JSON (so :func:`read_html` gets the reports back).
Every string that comes from a model, a dataset or a file is escaped.

Example:
    >>> from memaudit.schema import ScanReport                        # doctest: +SKIP
    >>> write_html("scan.html", ScanReport.from_json("scan.json"))    # doctest: +SKIP
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memaudit._version import __version__
from memaudit.render import _plots as plots
from memaudit.render._html_parts import e
from memaudit.render._sections import body, page_title
from memaudit.render._view import LOCALIZED_UNITS, View, make_view
from memaudit.schema._audit import AuditReport
from memaudit.schema._base import Report, ReportError
from memaudit.schema._kinds import from_dict, read_json
from memaudit.schema._scan import ScanReport

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'sha256-{script}'; base-uri 'none'; form-action 'none'"
)  # only memaudit's own script (by hash) may run: an injected inline script would not
Images = Mapping[int, str] | Any  # id -> data: URI, or an ImageDataset to take thumbnails from
_ASSETS = Path(__file__).parent


def render_html(
    *reports: Report,
    images: Images | None = None,
    comparison: ScanReport | None = None,
    localized_units: int | None = None,
    title: str | None = None,
    command: str | None = None,
) -> str:
    """One self-contained HTML page of ``reports`` (an audit, or scans, unlearn and probe runs).

    ``images``: thumbnails of the flagged examples, as ``{id: data-URI}`` or an ``ImageDataset``
    to make them from; none by default (flagged images are sensitive). Scans after the first, and
    ``comparison``, are comparison groups. ``localized_units`` (N, default the audit's or 5):
    "rests on a handful of units" means "flips with at most N units". ``command``: the command
    line that made the reports, for the header (an audit's own provenance takes precedence).
    """
    if not reports:
        raise ReportError("nothing to render: give at least one report")
    localized = localized_units or (
        next((r.verdict.localized_units for r in reports if isinstance(r, AuditReport)), None)
        or LOCALIZED_UNITS
    )
    view = make_view(reports, comparison, localized)
    view.command = command
    thumbs = _thumbnails(view, images)
    main = body(view, thumbs, title=title)
    data = "\n".join(_json_script(r) for r in reports)
    if comparison is not None:
        data += "\n" + _json_script(comparison)
    heading = e(title or page_title(view))
    script = _asset("report.js")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_csp(script)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="memaudit {e(__version__)}">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{heading}</title>\n<style>{_asset('report.css')}</style>\n</head>\n<body>\n"
        f'<main class="memaudit">\n{main}\n</main>\n{data}\n'
        f"<script>{script}</script>\n</body>\n</html>\n"
    )


def render_fragment(*reports: Report, localized_units: int | None = None) -> str:
    """The page body for a notebook (``_repr_html_``): scoped CSS, plots and table, no images."""
    localized = localized_units or LOCALIZED_UNITS
    view = make_view(reports, None, localized)
    return (
        f'<div class="memaudit"><style>{_asset("report.css")}</style>'
        f"{body(view, {}, title=None)}<script>{_asset('report.js')}</script></div>"
    )


def write_html(
    path: str | os.PathLike[str],
    *reports: Report,
    images: Images | None = None,
    comparison: ScanReport | None = None,
    localized_units: int | None = None,
    title: str | None = None,
    command: str | None = None,
) -> Path:
    """Render ``reports`` (see :func:`render_html`) and write the page to ``path``."""
    page = render_html(
        *reports,
        images=images,
        comparison=comparison,
        localized_units=localized_units,
        title=title,
        command=command,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


@dataclass(frozen=True)
class Page:
    """What :func:`read_html` finds in a memaudit page: its reports and thumbnails."""

    reports: list[Report]
    thumbnails: dict[int, str]


_REPORT_RE = re.compile(
    r'<script type="application/json" class="memaudit-report"[^>]*>(.*?)</script>', re.S
)
_THUMB_RE = re.compile(r'<img class="thumb" data-id="(-?\d+)"[^>]*? src="(data:image/[^"]+)"')


def read_html(path: str | os.PathLike[str]) -> Page:
    """The reports (validated) and thumbnails embedded in a page :func:`write_html` wrote."""
    file = Path(path)
    if not file.is_file():
        raise ReportError(f"report {str(path)!r} not found")
    text = file.read_text(encoding="utf-8", errors="replace")
    blocks = _REPORT_RE.findall(text)
    if not blocks:
        raise ReportError(f"{file} holds no memaudit report (not written by memaudit?)")
    reports = []
    for block in blocks:
        try:
            raw = json.loads(block)
        except json.JSONDecodeError:
            raise ReportError(f"{file}: an embedded report is not valid JSON") from None
        reports.append(from_dict(raw, source=str(file)))
    thumbs = {int(i): uri for i, uri in _THUMB_RE.findall(text)}
    return Page(reports=reports, thumbnails=thumbs)


def read_reports(path: str | os.PathLike[str]) -> list[Report]:
    """The reports in a JSON report file or a memaudit HTML page."""
    if Path(path).suffix.lower() in (".html", ".htm"):
        return read_html(path).reports
    return [read_json(path)]


# --- page parts -------------------------------------------------------------------------------


def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return CSP.format(script=digest)


def _json_script(report: Report) -> str:
    text = report.model_dump_json()
    # Inside <script>, only "</" can end the block; escaping <, > and & rules out any markup.
    safe = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return (
        f'<script type="application/json" class="memaudit-report" data-kind="{e(report.kind)}">'
        f"{safe}</script>"
    )


def _thumbnails(view: View, images: Images | None) -> dict[int, str]:
    if images is None or view.scan is None:
        return {}
    ids = [x.id for x in view.scan.examples]
    if isinstance(images, Mapping):
        return {i: str(images[i]) for i in ids if i in images}
    rows = images.rows(ids)  # an ImageDataset
    pixels = images.images[rows]
    return {i: plots.thumbnail(pixels[k].numpy()) for k, i in enumerate(ids)}


# --- settings, timings, environment -----------------------------------------------------------
