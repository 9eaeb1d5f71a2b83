"""The HTML report: self-contained, escaped, re-readable, small; built from synthetic reports."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from memaudit.membership import AttackResult, evaluate, roc_curve
from memaudit.membership import summarize as summarize_membership
from memaudit.render.html import read_html, read_reports, render_fragment, render_html, write_html
from memaudit.schema import Membership, ReportError, ScanReport, UnlearnReport, UnlearnScores
from memaudit.schema._audit import AuditReport, Provenance, gates, verdict
from memaudit.schema._probes import (
    Accuracies,
    GradientsReport,
    LayerGradients,
    LayerRetrain,
    LayerRewind,
    RetrainReport,
    RewindReport,
)
from memaudit.schema._scan import (
    DataSummary,
    ExampleResult,
    LayerCount,
    ModelSummary,
    ScanSettings,
    Status,
    Timing,
    Unit,
    summarize,
)

EVIL = "<script>alert(1)</script>"
LAYERS = [f"layer{i}.conv" for i in range(8)] + ["fc"]


def synthetic_scan(
    n: int = 40,
    *,
    seed: int = 0,
    class_names: list[str] | None = None,
    units_scale: float = 4.0,
    layers: list[str] | None = None,
) -> ScanReport:
    """A scan report of ``n`` examples with plausible numbers (no model involved)."""
    rng = random.Random(seed)
    layers = layers or LAYERS
    names = class_names or [f"class {i}" for i in range(10)]
    examples = []
    for i in range(n):
        label = rng.randrange(10)
        roll = rng.random()
        status = (
            Status.MISCLASSIFIED
            if roll < 0.05
            else Status.BUDGET_EXHAUSTED
            if roll < 0.1
            else Status.FLIPPED
        )
        k = max(1, int(rng.expovariate(1 / units_scale)))
        units = [Unit(layer=rng.choice(layers), index=rng.randrange(64)) for _ in range(k)]
        flipped = status is Status.FLIPPED
        examples.append(
            ExampleResult(
                id=i * 7 + seed,
                label=label,
                predicted_before=label if status is not Status.MISCLASSIFIED else (label + 1) % 10,
                status=status,
                flipped=flipped,
                n_units=k + rng.randrange(3) if flipped else 0,
                n_units_minimal=k if flipped else 0,
                units=units if flipped else [],
                predicted_after=(label + 3) % 10 if flipped else None,
                steps=k,
                reference_accuracy=0.99 - rng.random() * 0.02 if flipped else None,
                test_accuracy=0.95 - rng.random() * 0.03 if flipped else None,
            )
        )
    return ScanReport(
        model=ModelSummary(
            source="/models/resnet.safetensors",
            arch="memaudit:resnet9",
            n_parameters=123456,
            n_units=64 * len(layers),
            units_per_layer=[LayerCount(layer=x, count=64) for x in layers],
            class_names=names,
        ),
        data=DataSummary(
            source="/data/mnist.npz",
            split="train",
            n_examples=6000,
            n_classes=10,
            test_split="test",
            n_test=1000,
        ),
        settings=ScanSettings(seed=seed),
        examples=examples,
        summary=summarize(
            examples, layers, reference_accuracy_before=0.99, test_accuracy_before=0.956
        ),
        timing=Timing(seconds=12.5, examples_per_second=n / 12.5, device="cpu"),
    )


def synthetic_unlearn(
    method: str = "example-tied-dropout", *, retrain: bool = True
) -> UnlearnReport:
    return UnlearnReport(
        method=method,
        settings={"epochs": 3, "lr": 0.01, "seed": 0},
        before=UnlearnScores(
            flagged_accuracy=1.0, retained_accuracy=1.0, test_accuracy=0.956, mia_auc=0.91
        ),
        after=UnlearnScores(
            flagged_accuracy=0.08, retained_accuracy=0.99, test_accuracy=0.95, mia_auc=0.52
        ),
        retrain=UnlearnScores(
            flagged_accuracy=0.05, retained_accuracy=0.99, test_accuracy=0.955, mia_auc=0.5
        )
        if retrain
        else None,
        seconds=20.0,
        retrain_seconds=97.0 if retrain else None,
        model="/models/resnet.safetensors (memaudit:resnet9)",
        data="/data/mnist.npz [train]",
        n_flagged=40,
        n_retained=5960,
        n_test=1000,
    )


def synthetic_audit(n: int = 40, *, class_names: list[str] | None = None) -> AuditReport:
    scan = synthetic_scan(n, class_names=class_names)
    unlearn = synthetic_unlearn()
    rescan = synthetic_scan(n, seed=0, class_names=class_names, units_scale=20)
    found = verdict(scan, localized_units=5, unlearn=unlearn, rescan=rescan)
    return AuditReport(
        verdict=found,
        scan=scan,
        unlearn=unlearn,
        rescan=rescan,
        comparison=synthetic_scan(n, seed=1, class_names=class_names, units_scale=15),
        gates=gates(found, max_flagged_accuracy=0.1, max_localized_fraction=0.2),
        provenance=Provenance(
            command="memaudit audit model.safetensors --flagged ids.txt --out-dir out",
            seeds={"scan": 0, "unlearn": 0},
            versions={"python": "3.11", "torch": "2.x", "memaudit": "0.1"},
            device="cpu",
        ),
    )


def probe_reports() -> list:
    layers = ["conv1", "conv2", EVIL]
    epochs = [0, 10, 20]
    grads = GradientsReport(
        model="m",
        data="d",
        grouping="module",
        mode="checkpoint",
        n_flagged=40,
        n_clean=360,
        epochs=epochs,
        layers=[
            LayerGradients(
                name=x,
                params=100,
                flagged_norm=[0.5, 0.4, None],
                clean_norm=[0.6, 0.5, 0.2],
                cosine=[-0.5, -0.2, None],
            )
            for x in layers
        ],
    )
    rewind = RewindReport(
        model="m",
        data="d",
        grouping="module",
        n_flagged=40,
        n_clean=360,
        baseline=Accuracies(flagged=1.0, clean=1.0),
        epochs=epochs,
        layers=[
            LayerRewind(name=x, params=100, flagged=[0.2, 0.6, 0.9], clean=[0.5, 0.9, 1.0])
            for x in layers
        ],
    )
    retrain = RetrainReport(
        model="m",
        data="d",
        grouping="module",
        rewind_epoch=0,
        train_epochs=2,
        lr=0.05,
        n_flagged=40,
        n_clean=360,
        baseline=Accuracies(flagged=1.0, clean=1.0),
        layers=[
            LayerRetrain(
                name=x,
                params=100,
                rewound=Accuracies(flagged=0.2, clean=0.5),
                retrained=Accuracies(flagged=0.9, clean=1.0),
            )
            for x in layers
        ],
    )
    return [grads, rewind, retrain]


def _scripts(page: str) -> list[str]:
    """Executable script blocks (JSON data blocks excluded)."""
    return re.findall(r"<script(?![^>]*application/json)[^>]*>(.*?)</script>", page, re.S)


@dataclass(frozen=True)
class Rendered:
    report: AuditReport
    probes: list
    page: str


@pytest.fixture(scope="module")
def rendered() -> Rendered:
    """One synthetic audit page with probe sections, rendered once for the tests that read it."""
    report, probes = synthetic_audit(), probe_reports()
    return Rendered(report, probes, render_html(report, *probes))


def test_page_is_self_contained(rendered: Rendered) -> None:
    page = rendered.page
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp and csp.group(1).startswith("default-src 'none'; img-src data:;")
    # Only memaudit's own script may run, pinned by its hash (no 'unsafe-inline' scripts).
    (script,) = _scripts(page)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp.group(1)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # no network URL anywhere
    assert "http://" not in page.replace("http://www.w3.org", "")
    assert page.count("<svg") >= 9  # histogram, layers, accuracy bars, edit cost; 5 probe plots
    assert 'id="examples-table"' in page
    assert "<img" not in page  # no image of a flagged example unless asked


def test_header_verdict_and_settings_are_shown(rendered: Rendered) -> None:
    page = rendered.page
    for text in (
        "/models/resnet.safetensors",
        "/data/mnist.npz",
        "memaudit audit model.safetensors --flagged ids.txt",
        "Verdict",
        "rest on a handful of units",
        "Unlearning with example-tied-dropout",
        "max-flagged-accuracy",
        "Settings, timings, environment",
        "max_units",
        "torch",
    ):
        assert text in page, text


def test_model_strings_are_escaped() -> None:
    names = [EVIL, *(f"c{i}" for i in range(9))]
    scan = synthetic_scan(20, class_names=names, layers=[EVIL, "fc"])
    page = render_html(scan, *probe_reports())
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # The only executable script is memaudit's own.
    assert len(_scripts(page)) == 1
    assert "alert(1)" not in _scripts(page)[0]
    # JSON blocks escape < > & so nothing inside can close the block.
    for block in re.findall(r"application/json[^>]*>(.*?)</script>", page, re.S):
        assert "<" not in block and ">" not in block
        json.loads(block)


def test_page_round_trips_through_read_html(rendered: Rendered, tmp_path: Path) -> None:
    report = rendered.report
    path = tmp_path / "audit.html"
    path.write_text(rendered.page)
    page = read_html(path)
    assert page.reports == [report, *rendered.probes]
    assert [r.kind for r in page.reports] == ["audit", "gradients", "rewind", "retrain"]
    assert read_reports(path)[0] == report
    # The renderer is a pure function: what was read renders to the same page.
    assert render_html(*page.reports) == rendered.page


def test_read_html_rejects_other_pages(tmp_path: Path) -> None:
    other = tmp_path / "other.html"
    other.write_text("<html><body>hello</body></html>")
    with pytest.raises(ReportError, match="holds no memaudit report"):
        read_html(other)


def test_thumbnails_only_when_asked_and_kept_on_rerender(tmp_path: Path) -> None:
    scan = synthetic_scan(10)
    images = {x.id: _png(x.id) for x in scan.examples}
    page = render_html(scan, images=images)
    assert page.count('<img class="thumb"') == 10
    path = tmp_path / "scan.html"
    path.write_text(page)
    assert read_html(path).thumbnails == images


def _png(seed: int) -> str:
    from memaudit.render._plots import thumbnail

    rng = np.random.default_rng(seed)
    return thumbnail(rng.integers(0, 255, (3, 64, 64), dtype=np.uint8))


def test_page_size_for_1000_flagged_examples_with_thumbnails() -> None:
    report = synthetic_audit(1000)
    images = {x.id: _png(x.id) for x in report.scan.examples}
    page = render_html(report, images=images)
    size = len(page.encode())
    assert size <= 5_000_000, f"{size / 1e6:.1f} MB"


def test_unlearn_only_and_probe_only_pages() -> None:
    page = render_html(synthetic_unlearn("finetune"), synthetic_unlearn())
    assert "after finetune" in page and "after example-tied-dropout" in page
    page = render_html(*probe_reports())
    assert page.count("<svg") == 5


def test_two_scans_make_a_comparison_group() -> None:
    page = render_html(synthetic_scan(30), synthetic_scan(30, seed=1, units_scale=15))
    assert "For comparison, 30 non-flagged examples" in page
    assert "comparison (n=" in page


def test_one_audit_per_page() -> None:
    with pytest.raises(ReportError, match="one audit per page"):
        render_html(synthetic_audit(5), synthetic_audit(5))


def test_repr_html_is_a_fragment() -> None:
    fragment = render_fragment(synthetic_scan(5))
    assert fragment.startswith('<div class="memaudit">') and "<html" not in fragment


def test_to_html_writes_a_page(tmp_path: Path) -> None:
    path = write_html(tmp_path / "u.html", synthetic_unlearn())
    assert read_html(path).reports[0].kind == "unlearn"


def test_created_date_is_in_header() -> None:
    scan = synthetic_scan(3).model_copy(
        update={"created": datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)}
    )
    assert "2024-05-06 07:08:09 UTC" in render_html(scan)


def test_command_shown_for_reports_without_provenance() -> None:
    page = render_html(synthetic_scan(3), command="memaudit scan m.pt --flagged <ids>.txt")
    assert "<code>memaudit scan m.pt --flagged &lt;ids&gt;.txt</code>" in page


def test_markdown_of_unlearning_alone() -> None:
    from memaudit.render.markdown import render_markdown

    text = render_markdown(synthetic_unlearn())
    assert "took flagged accuracy from 100% to 8% (retraining: 5%)" in text
    assert "| flagged accuracy | 1.000 | 0.080 | 0.050 |" in text


def _membership(n: int = 120) -> Membership:
    """A membership block from the real attack summary on synthetic scores (3 negatives/id)."""
    gen = torch.Generator().manual_seed(0)
    neg = torch.randn(3, n, generator=gen)

    def result(shift: float) -> AttackResult:
        pos = torch.randn(n, generator=gen) + shift
        auc, tpr = evaluate(pos, neg, rounds=20)
        return AttackResult(pos, auc, tpr, roc_curve(pos, neg.flatten()))

    found = {"before": result(3.0), "after": result(0.2), "retrain": result(0.0)}
    return summarize_membership(found, list(range(1000, 1000 + n)), 3)


def test_unlearn_page_shows_roc_curves_and_per_id_scores() -> None:
    from memaudit.render.markdown import render_markdown

    report = synthetic_unlearn().model_copy(update={"membership": _membership()})
    page = render_html(report)
    assert "Membership test: ROC of the flagged ids" in page
    assert 'id="membership-table"' in page and ">1000<" in page
    assert page.count("<tr>") >= 120  # one row per flagged id
    text = render_markdown(report)
    assert "| TPR at 1% FPR |" in text and "| average gap to retrain |" in text
    assert UnlearnReport.model_validate_json(report.model_dump_json()) == report
