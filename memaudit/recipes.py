"""Recipes: a whole study in one declarative YAML file, validated, run by ``memaudit run``.

A recipe builds the label-noise testbed (with per-epoch checkpoints), runs the layer probes,
audits the noisy ids (scan with a clean comparison group, unlearning, re-scan) and optionally
trains the testbed again with example-tied dropout; every report lands as JSON in one folder,
with one HTML page over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memaudit.audit import audit
from memaudit.data import ImageDataset, load_dataset, read_ids
from memaudit.engine import pick_device
from memaudit.errors import MemauditError, validation_problem
from memaudit.models import Classifier, load_model
from memaudit.preflight import preflight
from memaudit.schema import AuditPlan, Grouping, Report, ScanSettings, UnlearnSettings
from memaudit.testbed import TestbedConfig, TestbedResult, build_testbed, load_testbed

Stage = Callable[[str], None]
Progress = Callable[[str, int, int], None]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProbeStage(_Strict):
    """The layer probes (memaudit.probes) over the testbed's checkpoints."""

    gradients: bool = True
    rewind: bool = True
    retrain: bool = True
    grouping: Grouping = Grouping.BLOCK
    epochs: list[int] | None = Field(None, description="checkpoint epochs to use; all if None")
    rewind_to: int = Field(0, ge=0, description="epoch that retraining rewinds each layer to")
    retrain_epochs: int = Field(3, ge=1)


class AuditStage(_Strict):
    """The audit of the testbed's noisy ids: scan, comparison scan, unlearning, re-scan."""

    noisy: int = Field(100, ge=0, description="noisy ids to audit (0 = all)")
    clean: int = Field(100, ge=0, description="clean ids scanned for comparison")
    scan: ScanSettings = ScanSettings()
    unlearn: str | None = Field("example-tied-dropout", description="method; None to skip")
    compare_retrain: bool = False


class Recipe(_Strict):
    """A study: testbed, probes, audit and example-tied-dropout training (``memaudit run``)."""

    name: str
    description: str = ""
    testbed: TestbedConfig = TestbedConfig()
    probes: ProbeStage | None = ProbeStage()
    audit: AuditStage | None = AuditStage()
    example_tied_dropout: bool = Field(
        True, description="also train the testbed from scratch with example-tied dropout"
    )


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe file; one-line errors name the key and the problem."""
    file = Path(path)
    if not file.is_file():
        raise MemauditError(f"recipe {str(path)!r} not found")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise MemauditError(f"{file} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise MemauditError(f"{file} must hold a mapping of recipe keys (name, testbed, ...)")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise MemauditError(f"{file}: {validation_problem(err)}") from None


def run_recipe(
    recipe: Recipe,
    out: str | os.PathLike[str],
    *,
    device: str = "auto",
    on_stage: Stage | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Path]:
    """Run ``recipe`` into ``out``; returns the written files by name (reports and the page).

    An existing finished testbed in ``out/testbed`` is reused, so a rerun only redoes analysis.
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    stage = on_stage or (lambda name: None)
    written: dict[str, Path] = {}
    reports: list[Report] = []

    stage("testbed")
    bed = _testbed(root / "testbed", recipe.testbed, device, on_progress)
    written["testbed"] = root / "testbed" / "testbed.json"
    model = load_model(bed.model)
    train = load_dataset(bed.data, split="train", model=model)
    test = load_dataset(bed.data, split="test", model=model)
    noisy = read_ids(bed.noisy_ids)

    if recipe.probes is not None:
        from memaudit.probes import find_checkpoints

        checkpoints = find_checkpoints(
            Path(bed.model).parent / "checkpoints", epochs=recipe.probes.epochs
        )
        for name, report in _probes(
            recipe.probes, model, train, test, noisy, checkpoints, device, stage, on_progress
        ):
            written[name] = report.to_json(root / f"{name}.json")
            reports.append(report)

    if recipe.audit is not None:
        stage("audit")
        result = _audit(recipe.audit, model, train, test, noisy, root, device, on_progress)
        written["audit"] = result.to_json(root / "audit.json")
        reports.insert(0, result)

    if recipe.example_tied_dropout:
        stage("example-tied dropout testbed")
        _testbed(
            root / "testbed-etd",
            recipe.testbed.model_copy(update={"example_tied_dropout": True}),
            device,
            on_progress,
        )
        written["testbed-etd"] = root / "testbed-etd" / "testbed.json"

    from memaudit.render.html import write_html

    written["html"] = write_html(
        root / "report.html", *reports, title=f"memaudit recipe: {recipe.name}"
    )
    return written


def _testbed(
    out: Path, config: TestbedConfig, device: str, on_progress: Progress | None
) -> TestbedResult:
    done = load_testbed(out)
    if done is not None and done.config == config:
        return done

    def epoch(event: Any) -> None:
        if on_progress:
            on_progress("training", event.epoch, event.epochs)

    return build_testbed(out, config, device=device, on_epoch=epoch)


def _probes(
    cfg: ProbeStage,
    model: Any,
    train: Any,
    test: Any,
    noisy: list[int],
    checkpoints: Any,
    device: str,
    stage: Stage,
    on_progress: Progress | None,
) -> list[tuple[str, Report]]:
    from memaudit.probes import ProbeStep, gradient_history, retrain_layers, rewind_layers

    def hook(name: str) -> Callable[[ProbeStep], None]:
        return lambda step: on_progress(name, step.done, step.total) if on_progress else None

    common: dict[str, Any] = {"grouping": cfg.grouping, "device": device}
    out: list[tuple[str, Report]] = []
    if cfg.gradients:
        stage("gradient accounting")
        out.append(
            (
                "gradients",
                gradient_history(
                    model, train, noisy, checkpoints, on_progress=hook("gradients"), **common
                ),
            )
        )
    if cfg.rewind:
        stage("layer rewinding")
        out.append(
            (
                "rewind",
                rewind_layers(
                    model,
                    train,
                    noisy,
                    checkpoints,
                    test=test,
                    on_progress=hook("rewind"),
                    **common,
                ),
            )
        )
    if cfg.retrain:
        stage("layer retraining")
        out.append(
            (
                "retrain",
                retrain_layers(
                    model,
                    train,
                    noisy,
                    checkpoints,
                    test=test,
                    rewind_epoch=cfg.rewind_to,
                    epochs=cfg.retrain_epochs,
                    on_progress=hook("retrain"),
                    **common,
                ),
            )
        )
    return out


def _audit(
    cfg: AuditStage,
    model: Classifier,
    train: ImageDataset,
    test: ImageDataset | None,
    noisy: list[int],
    root: Path,
    device: str,
    on_progress: Progress | None,
) -> Report:
    ids = noisy[: cfg.noisy] if cfg.noisy else noisy
    plan = AuditPlan(
        scan=cfg.scan,
        unlearn=UnlearnSettings(
            method=cfg.unlearn or "example-tied-dropout", compare_retrain=cfg.compare_retrain
        ),
        no_unlearn=cfg.unlearn is None,
        compare=cfg.clean,
    )
    checked = preflight(model, train, train.rows(ids), test=test, device=pick_device(device))
    result = audit(
        model,
        train,
        ids,
        test=test,
        plan=plan,
        device=device,
        preflight=checked,
        out_model=None if cfg.unlearn is None else root / "unlearned.safetensors",
        on_progress=on_progress,
    )
    return result.report
