"""The scan report: for each flagged example, the units whose zeroing flips it, and the cost."""

from __future__ import annotations

from enum import Enum
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.dataclasses import dataclass

from memaudit.schema._base import Report
from memaudit.schema._inputs import Preflight

_STRICT = ConfigDict(frozen=True, extra="forbid")


class Status(str, Enum):
    """Outcome of the search for one flagged example."""

    FLIPPED = "flipped"
    BUDGET_EXHAUSTED = "budget_exhausted"
    MISCLASSIFIED = "misclassified"  # already wrong before the search: not searched


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Unit:
    """One unit: output ``index`` of the module named ``layer`` (a conv channel or a linear
    feature). The one unit address of memaudit: in memory and in reports."""

    layer: str
    index: int


class LayerCount(BaseModel):
    model_config = _STRICT
    layer: str
    count: int


class ModelSummary(BaseModel):
    model_config = _STRICT
    source: str
    arch: str
    n_parameters: int
    n_units: int
    units_per_layer: list[LayerCount] = Field(description="units of each layer, network order")
    class_names: list[str] | None = None


class DataSummary(BaseModel):
    model_config = _STRICT
    source: str
    split: str
    n_examples: int
    n_classes: int
    test_split: str | None = None
    n_test: int | None = None


class ScanSettings(BaseModel):
    """Every option of the search (also the resume key of a journal)."""

    model_config = _STRICT
    scorer: str = Field(
        "grad-x-act",
        description="unit scorer: grad-x-act (the paper's gradient x activation), "
        "integrated-gradients (captum) or random (a baseline)",
    )
    max_units: int = Field(64, ge=1, description="unit budget per example")
    units_per_step: int = Field(1, ge=1, description="units zeroed per greedy step")
    reference_size: int = Field(256, ge=0, description="non-flagged rows in the clean term")
    reference_weight: float = Field(1.0, ge=0, description="weight w of the clean term")
    reference_mode: Literal["shared", "refreshed", "exact"] = Field(
        "refreshed",
        description="shared: the reference gradient at m = 1 for all (fastest); refreshed: "
        "examples that do not flip within shared_units are searched again with the gradient "
        "recomputed at their own mask after 1, 2, 4, 8, ... zeroed units; exact: "
        "every example's mask on every reference row at every step (the authors' term)",
    )
    shared_units: int = Field(
        4,
        ge=0,
        description="refreshed mode: an example that flips within this many units under the "
        "shared term keeps that answer; the others are searched again with refreshes",
    )
    batch_size: int = Field(64, ge=1, description="flagged examples searched together")
    noise_copies: int = Field(0, ge=0, description="noisy copies averaged (paper: input noise)")
    noise_std: float = Field(0.01, ge=0, description="std of the input noise of the copies")
    prune: bool = Field(True, description="prune the greedy set to a minimal one")
    eval_size: int = Field(512, ge=0, description="test rows for the after-edit accuracy")
    ig_steps: int = Field(8, ge=1, description="integration steps of the captum scorer")
    seed: int = Field(0, description="seed of reference sampling, noise and scorers")
    precision: Literal["auto", "float32", "mixed", "bf16"] = Field(
        "auto",
        description="mixed: bfloat16 autocast where it only steers or is checked (the "
        "refreshes of the reference term, most of a refreshed scan's work; the after-edit "
        "accuracy, every close call redone in float32, so the accuracies are float32's), "
        "float32 for the scores, flip checks and pruning; bf16: every forward under bfloat16 "
        "autocast, the masks, their gradients and the flip checks in float32; auto: mixed on a "
        "device with native bfloat16 (a CUDA GPU that has it, a CPU with AMX or AVX512-BF16), "
        "else float32 (a report holds the precision used)",
    )


class ExampleResult(BaseModel):
    """The search result for one flagged example (one line of a scan journal)."""

    model_config = _STRICT
    id: int
    label: int
    predicted_before: int
    status: Status
    flipped: bool
    n_units: int = Field(description="units zeroed by the greedy search")
    n_units_minimal: int = Field(description="units left after pruning the unneeded ones")
    units: list[Unit] = Field(description="the minimal set, in the order found")
    predicted_after: int | None
    steps: int
    reference_accuracy: float | None = Field(description="accuracy on the reference set, edited")
    test_accuracy: float | None = Field(description="accuracy on the test subset, edited")


class Timing(BaseModel):
    """Wall time of a scan; ``stages``: seconds of each stage (``reference``: the reference
    gradient, ``search``: the greedy search, ``prune``, ``evaluation``: the after-edit
    accuracy; the CLI adds ``load`` and ``preflight``)."""

    model_config = _STRICT
    seconds: float
    examples_per_second: float
    device: str
    stages: dict[str, float] = Field(default_factory=dict)


class ScanSummary(BaseModel):
    model_config = _STRICT
    n_flagged: int
    n_flipped: int
    n_budget_exhausted: int
    n_misclassified: int
    flip_rate: float = Field(description="flipped / searched (misclassified excluded)")
    median_units: float | None
    mean_units: float | None
    median_units_minimal: float | None
    mean_units_minimal: float | None
    units_per_layer: list[LayerCount] = Field(description="minimal-set units found per layer")
    depth_deciles: list[float] = Field(description="share of found units per layer-depth decile")
    reference_accuracy_before: float | None
    test_accuracy_before: float | None
    mean_reference_accuracy_drop: float | None
    mean_test_accuracy_drop: float | None


class ScanReport(Report):
    """Typed result of ``memaudit scan`` (JSON Schema: ``memaudit schema scan``)."""

    KIND: ClassVar[str] = "scan"
    SCHEMA_VERSION: ClassVar[int] = 3  # 2: preflight; 3: timing.stages

    kind: Literal["scan"] = "scan"
    schema_version: int = 3
    model: ModelSummary
    data: DataSummary
    settings: ScanSettings
    examples: list[ExampleResult]
    summary: ScanSummary
    timing: Timing
    preflight: Preflight | None = Field(
        None, description="the model's accuracy before the scan, and its effective preprocessing"
    )


def _median(values: list[int]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(
    examples: list[ExampleResult],
    layers: list[str],
    *,
    reference_accuracy_before: float | None,
    test_accuracy_before: float | None,
) -> ScanSummary:
    """Counts, units-to-flip statistics and where the found units sit (``layers`` in order)."""
    flipped = [e for e in examples if e.status is Status.FLIPPED]
    searched = [e for e in examples if e.status is not Status.MISCLASSIFIED]
    per_layer = dict.fromkeys(layers, 0)
    deciles = [0] * 10
    depth = {name: i for i, name in enumerate(layers)}
    for example in flipped:
        for unit in example.units:
            per_layer[unit.layer] += 1
            deciles[min(9, depth[unit.layer] * 10 // max(1, len(layers)))] += 1
    n_found = sum(deciles)

    def drop(before: float | None, after: list[float | None]) -> float | None:
        values = [before - a for a in after if a is not None and before is not None]
        return _mean(values)

    return ScanSummary(
        n_flagged=len(examples),
        n_flipped=len(flipped),
        n_budget_exhausted=sum(e.status is Status.BUDGET_EXHAUSTED for e in examples),
        n_misclassified=len(examples) - len(searched),
        flip_rate=len(flipped) / len(searched) if searched else 0.0,
        median_units=_median([e.n_units for e in flipped]),
        mean_units=_mean([float(e.n_units) for e in flipped]),
        median_units_minimal=_median([e.n_units_minimal for e in flipped]),
        mean_units_minimal=_mean([float(e.n_units_minimal) for e in flipped]),
        units_per_layer=[LayerCount(layer=k, count=v) for k, v in per_layer.items() if v],
        depth_deciles=[d / n_found if n_found else 0.0 for d in deciles],
        reference_accuracy_before=reference_accuracy_before,
        test_accuracy_before=test_accuracy_before,
        mean_reference_accuracy_drop=drop(
            reference_accuracy_before, [e.reference_accuracy for e in flipped]
        ),
        mean_test_accuracy_drop=drop(test_accuracy_before, [e.test_accuracy for e in flipped]),
    )
