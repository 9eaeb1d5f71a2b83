"""``audit()``, ``memaudit audit``/``report``/``schema``: outputs, gates, exit codes, provenance."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import memaudit.cli._report as report_cli
from memaudit import Auditor, load_dataset, load_model
from memaudit.cli import main
from memaudit.data import write_ids
from memaudit.engine import fit
from memaudit.errors import MemauditError
from memaudit.models import DataRef, Preprocess, build_model, save_model
from memaudit.render.html import read_html
from memaudit.render.markdown import md, render_markdown
from memaudit.schema import AuditReport, ReportError, UnlearnSettings

FLAGGED = [1, 4, 7, 9]
FAST = {"epochs": 1}  # unlearning settings that keep tests fast


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (and do not fight other jobs for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model that memorized 32 random images with random labels, and its .npz data."""
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (48, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, 48)
    np.savez(
        root / "data.npz",
        train_images=images[:32],
        train_labels=labels[:32],
        test_images=images[32:],
        test_labels=labels[32:],
    )
    torch.manual_seed(0)
    model = build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 4})
    model.info.preprocess = Preprocess(mean=(0.5,), std=(0.5,))
    train_set = load_dataset(root / "data.npz", split="train", model=model)
    model = fit(model, train_set, epochs=40, batch_size=32, device="cpu")
    save_model(model, root / "model.safetensors", train_data=DataRef(source=str(root / "data.npz")))
    return root


@pytest.fixture()
def bed(trained: Path, tmp_path: Path) -> dict[str, Path]:
    for name in ("data.npz", "model.safetensors"):
        (tmp_path / name).write_bytes((trained / name).read_bytes())
    model = tmp_path / "model.safetensors"
    data = tmp_path / "data.npz"
    # The checkpoint records the module's data path; both copies hold the same arrays.
    return {
        "model": model,
        "data": data,
        "ids": write_ids(tmp_path / "ids.txt", FLAGGED),
        "root": tmp_path,
    }


def _auditor(bed: dict[str, Path]) -> Auditor:
    model = load_model(bed["model"])
    data = bed["data"]
    train = load_dataset(data, split="train", model=model)
    test = load_dataset(data, split="test", model=model)
    return Auditor(model, train, test, device="cpu")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_audit_scans_unlearns_and_rescans(bed: dict[str, Path]) -> None:
    result = _auditor(bed).audit(
        FLAGGED,
        unlearn=UnlearnSettings(method="finetune", **FAST),
        compare=3,
        max_localized_fraction=1.0,
        flagged_file=bed["ids"],
        out_model=bed["root"] / "out.safetensors",
    )
    r = result.report
    assert result.model is not None and r.unlearn is not None and r.rescan is not None
    assert [x.id for x in r.rescan.examples] == FLAGGED
    assert r.comparison is not None and not set(x.id for x in r.comparison.examples) & set(FLAGGED)
    assert r.verdict.n_flagged == 4 and r.verdict.n_correct_before == 4
    assert r.verdict.n_localized == 4  # memorized random labels flip with a unit or two
    assert r.gates[0].name == "max-localized-fraction" and r.passed
    p = r.provenance
    assert p.weights is not None and p.weights.sha256 == _sha(bed["model"])
    assert p.flagged_ids is not None and p.flagged_ids.sha256 == _sha(bed["ids"])
    assert p.unlearned_model is not None and p.unlearned_model.sha256 == _sha(
        bed["root"] / "out.safetensors"
    )
    assert {"torch", "memaudit", "python"} <= set(p.versions)
    assert [s.stage for s in p.stages] == ["scan", "comparison", "unlearn", "save", "rescan"]
    assert p.seeds == {"scan": 0, "unlearn": 0}
    load_model(bed["root"] / "out.safetensors")  # the unlearned model reloads with no flags
    assert AuditReport.model_validate_json(r.model_dump_json()) == r


def test_no_unlearn_and_bad_options(bed: dict[str, Path]) -> None:
    auditor = _auditor(bed)
    result = auditor.audit(FLAGGED, no_unlearn=True, localized_units=1)
    assert result.model is None and result.report.unlearn is None and result.report.rescan is None
    assert "not run" in render_markdown(result.report)
    with pytest.raises(MemauditError, match="drop --no-unlearn"):
        auditor.audit(FLAGGED, no_unlearn=True, max_flagged_accuracy=0.1)
    with pytest.raises(MemauditError, match=r"fraction in \[0, 1\]"):
        auditor.audit(FLAGGED, no_unlearn=True, max_localized_fraction=5)
    with pytest.raises(MemauditError, match="no flagged ids"):
        auditor.audit([], no_unlearn=True)


def _cli(bed: dict[str, Path], *extra: str) -> int:
    return main(
        [
            "audit",
            str(bed["model"]),
            "--flagged",
            str(bed["ids"]),
            "--out-dir",
            str(bed["root"] / "out"),
            "--data",
            str(bed["data"]),
            "--device",
            "cpu",
            "--max-units",
            "16",
            *extra,
        ]
    )


def test_cli_audit_writes_everything_and_reports_round_trip(
    bed: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = _cli(bed, "--method", "finetune", "--epochs", "1", "--images", "thumb")
    assert rc == 0
    out = bed["root"] / "out"
    assert {p.name for p in out.iterdir()} >= {
        "audit.json",
        "audit.html",
        "audit.md",
        "unlearned.safetensors",
    }
    report = AuditReport.from_json(out / "audit.json")
    command = report.provenance.command or ""
    assert command.startswith("memaudit audit ") and "--images thumb" in command
    assert report.provenance.stages[0].stage == "load"
    page = read_html(out / "audit.html")
    assert page.reports == [report] and len(page.thumbnails) == len(FLAGGED)
    assert "## memaudit audit report" in (out / "audit.md").read_text()
    # memaudit report: re-export the JSON from the HTML, re-render, summarize
    assert main(["report", str(out / "audit.html"), "--json", str(out / "again.json")]) == 0
    assert AuditReport.from_json(out / "again.json") == report
    assert main(["report", str(out / "audit.json"), "--html", str(out / "again.html")]) == 0
    assert read_html(out / "again.html").reports == [report]
    # Re-rendering a page keeps its thumbnails (the data need not be at hand).
    assert main(["report", str(out / "audit.html"), "--html", str(out / "page2.html")]) == 0
    assert read_html(out / "page2.html").thumbnails == page.thumbnails
    capsys.readouterr()
    assert main(["report", str(out / "audit.json")]) == 0
    assert "**Verdict**" in capsys.readouterr().out
    # A newer schema is refused, also for the scan nested in the audit.
    raw = json.loads((out / "audit.json").read_text())
    for where in (raw, raw["scan"]):
        newer = json.loads(json.dumps(raw))
        (newer if where is raw else newer["scan"])["schema_version"] = 99
        (out / "newer.json").write_text(json.dumps(newer))
        with pytest.raises(ReportError, match=r"schema version 99.*upgrade memaudit"):
            AuditReport.from_json(out / "newer.json")


def test_cli_audit_images_are_off_by_default(bed: dict[str, Path]) -> None:
    assert _cli(bed, "--no-unlearn") == 0
    out = bed["root"] / "out"
    assert "<img" not in (out / "audit.html").read_text()
    assert not (out / "unlearned.safetensors").exists()


def test_cli_exit_codes(
    bed: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1: a gate failed; one line says which and by how much, and the outputs are still written
    capsys.readouterr()
    assert _cli(bed, "--no-unlearn", "--max-localized-fraction", "0.5") == 1
    lines = [x for x in capsys.readouterr().err.splitlines() if "gate" in x]
    assert len(lines) == 1 and "--max-localized-fraction failed" in lines[0] and "pts" in lines[0]
    assert (bed["root"] / "out" / "audit.json").exists()
    # 2: bad input or usage
    assert _cli(bed, "--no-unlearn", "--max-flagged-accuracy", "0.1") == 2
    assert _cli(bed, "--max-localized-fraction", "1.5") == 2
    assert _cli(bed, "--no-unlearn", "--max-units", "0") == 2
    assert main(["audit", str(bed["model"]), "--flagged", "missing.txt", "--out-dir", "x"]) == 2

    # 3: the audit itself failed (a crash never looks like a failed gate)
    def crash(*args: object, **kw: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(report_cli.Auditor, "audit", crash)
    capsys.readouterr()
    assert _cli(bed, "--no-unlearn") == 3
    err = [
        line
        for line in capsys.readouterr().err.strip().splitlines()
        # what was loaded before the crash, and the progress bar's closing blank line
        if line.strip() and not line.startswith(("inputs:", "preflight:"))
    ]
    assert len(err) == 1 and "RuntimeError: boom" in err[0]


def test_schema_command(capsys: pytest.CaptureFixture[str]) -> None:
    for kind in ("scan", "unlearn", "audit", "gradients", "rewind", "retrain"):
        assert main(["schema", kind]) == 0
        schema = json.loads(capsys.readouterr().out)
        assert schema["properties"]["kind"]["const"] == kind
    assert main(["schema", "nope"]) == 2


def test_report_command_errors(tmp_path: Path) -> None:
    not_report = tmp_path / "x.json"
    not_report.write_text('{"a": 1}')
    assert main(["report", str(not_report), "--html", str(tmp_path / "x.html")]) == 2
    assert main(["report", str(tmp_path / "missing.json")]) == 2


def test_markdown_escapes_strings() -> None:
    assert md("<script>|*x*_[a](b)") == "&lt;script&gt;\\|\\*x\\*\\_\\[a\\](b)"


def test_report_command_renders_several_files(tmp_path: Path) -> None:
    from test_report_html import probe_reports, synthetic_scan, synthetic_unlearn

    files = []
    for i, r in enumerate([synthetic_scan(8), synthetic_scan(8, seed=1), synthetic_unlearn()]):
        files.append(str(r.to_json(tmp_path / f"r{i}.json")))
    files.append(str(probe_reports()[1].to_json(tmp_path / "rewind.json")))
    html_path, md_path = tmp_path / "all.html", tmp_path / "all.md"
    assert main(["report", *files, "--html", str(html_path), "--md", str(md_path)]) == 0
    kinds = [r.kind for r in read_html(html_path).reports]
    assert kinds == ["scan", "scan", "unlearn", "rewind"]
    text = md_path.read_text()
    assert "For comparison, 8 non-flagged examples" in text and "after example" in text
    assert main(["report", *files, "--json", str(tmp_path / "x.json")]) == 2  # one report only


def test_gates_of_the_reference_and_the_membership_test(
    bed: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fast = ("--method", "finetune", "--epochs", "1", "--max-units", "4")
    # misconfigured: each gate needs what it measures
    assert _cli(bed, *fast, "--max-gap-to-retrain", "0.5") == 2
    assert "add --compare-retrain" in capsys.readouterr().err
    assert _cli(bed, *fast, "--max-membership-tpr", "0.5") == 2
    assert "add --membership-references 2" in capsys.readouterr().err
    assert _cli(bed, "--no-unlearn", "--max-gap-to-retrain", "0.5") == 2
    # measured: a generous gate passes, an impossible one fails (exit 1), outputs written
    measured = (*fast, "--compare-retrain", "--membership-references", "2")
    assert _cli(bed, *measured, "--max-gap-to-retrain", "1") == 0
    report = AuditReport.from_json(bed["root"] / "out" / "audit.json")
    assert [g.name for g in report.gates] == ["max-gap-to-retrain"] and report.passed
    assert report.verdict.gap_to_retrain is not None and report.unlearn is not None
    assert report.unlearn.membership is not None and report.unlearn.retrain is not None
    assert "Membership test against 2 models" in (bed["root"] / "out" / "audit.md").read_text()
    capsys.readouterr()
    assert _cli(bed, *measured, "--max-gap-to-retrain", "0") == 1  # finetune is not retraining
    assert "gate --max-gap-to-retrain failed" in capsys.readouterr().err
    # 4 flagged ids x 2 references cannot resolve 1% FPR: the gate fails, it never passes silently
    assert _cli(bed, *measured, "--max-membership-tpr", "1") == 1
    assert "could not be measured" in capsys.readouterr().err
