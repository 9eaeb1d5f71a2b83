"""The report of an unlearning run (``memaudit unlearn``, ``Auditor.unlearn``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from memaudit.schema._base import Report
from memaudit.schema._inputs import Preflight
from memaudit.schema._recipe import Recipe


class UnlearnSettings(BaseModel):
    """How to unlearn (the method and its budget) and what to measure it against.

    ``epochs`` / ``lr`` default to the method's own (``memaudit.unlearn.METHODS``); ``budget``
    sets every training method's epochs as a share of retraining's instead. ``options`` are
    method-specific (example-tied dropout: ``p_gen``, ``p_mem``, ``tie``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field("example-tied-dropout", description="unlearning method")
    epochs: int | None = Field(None, ge=0, description="training epochs (default: the method's)")
    budget: float | None = Field(
        None,
        gt=0,
        le=1,
        description="train for this share of the retraining yardstick's epochs (retrain_epochs, "
        "else the recipe's): every training method gets max(1, round(budget x those)) "
        "epochs, methods that do not train stay at 0; instead of epochs",
    )
    lr: float | None = Field(None, gt=0, description="learning rate (default: the method's)")
    batch_size: int = Field(128, ge=1, description="training batch size")
    optimizer: Literal["sgd", "adamw"] | None = Field(
        None, description="optimizer (default: the model family's training recipe)"
    )
    warmup: float | None = Field(
        None, ge=0, lt=1, description="share of steps warming up (default: the recipe's)"
    )
    weight_decay: float | None = Field(
        None, ge=0, description="weight decay (default: the recipe's)"
    )
    seed: int = Field(0, description="seed of the shuffling, the masks and the references")
    options: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="method-specific options"
    )
    compare_retrain: bool = Field(
        False, description="also retrain from scratch without the flagged ids (slow)"
    )
    retrain_epochs: int | None = Field(
        None,
        ge=1,
        description="epochs of retraining and of the membership references (default: the "
        "recipe's: the one the model was trained with when its checkpoint records it)",
    )
    reference_margin: float = Field(
        0.02,
        ge=0,
        le=1,
        description="a reference whose test accuracy falls more than this short of the "
        "original's is reported as a weak yardstick",
    )
    membership_references: int = Field(
        0,
        ge=0,
        description="train K models without the flagged ids (K >= 2, like retraining) and run "
        "the membership test against them: AUC and TPR at 1% FPR before and after; 0: none",
    )

    @field_validator("budget")
    @classmethod
    def _budget_or_epochs(cls, budget: float | None, info: ValidationInfo) -> float | None:
        if budget is not None and info.data.get("epochs") is not None:
            raise ValueError("give epochs or budget, not both")
        return budget

    @field_validator("membership_references")
    @classmethod
    def _two_or_none(cls, k: int) -> int:
        if k == 1:
            raise ValueError(
                "the membership test needs at least two reference models (0: no membership test)"
            )
        return k


class UnlearnScores(BaseModel):
    """What a model does on the flagged, retained and test examples (fractions in [0, 1])."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flagged_accuracy: float = Field(
        ge=0, le=1, description="accuracy on flagged ids (given labels)"
    )
    retained_accuracy: float = Field(ge=0, le=1, description="accuracy on the other training rows")
    test_accuracy: float | None = Field(None, ge=0, le=1, description="accuracy on the test split")
    mia_auc: float | None = Field(
        None,
        ge=0,
        le=1,
        description="loss-based membership inference: AUC of flagged ids (members) against test "
        "examples (non-members); 0.5 = indistinguishable, below 0.5 = flagged fit worse than test",
    )


class Interval(BaseModel):
    """A figure and its 95% bootstrap interval; ``None`` where it cannot be resolved."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    value: float | None
    low: float | None
    high: float | None


class RocCurve(BaseModel):
    """A ROC curve at a few points (FPR from 0 to 1, log-spaced), as the report's plot shows it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    fpr: list[float]
    tpr: list[float]


class MembershipFigures(BaseModel):
    """The membership test on one model: ROC AUC and TPR at 1% and 0.1% FPR, and its curve."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    auc: Interval
    tpr_at_1pct_fpr: Interval
    tpr_at_01pct_fpr: Interval
    roc: RocCurve | None = None


class IdScore(BaseModel):
    """One flagged id's membership score (pooled standard deviations above the references)
    under the model before and after unlearning, and under the retrained model when scored."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: int
    before: float
    after: float
    retrain: float | None = None


class Membership(BaseModel):
    """The membership test of like with like (:mod:`memaudit.membership`): the flagged ids
    under each model against the same ids under reference models trained without them."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    attack: Literal["offline-lira-fixed-variance"] = "offline-lira-fixed-variance"
    n_references: int
    before: MembershipFigures
    after: MembershipFigures
    retrain: MembershipFigures | None = None
    scores: list[IdScore]


class ReferenceCheck(BaseModel):
    """Is the yardstick trustworthy? The retrained reference's (and the membership references')
    test accuracy beside the original model's: one more than ``margin`` short is weak."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    margin: float
    original_test_accuracy: float
    retrain_test_accuracy: float | None = None
    references_test_accuracy: list[float] = Field(default_factory=list)

    @property
    def shortfall(self) -> float:
        """The most any reference falls short of the original's test accuracy (0: none)."""
        found = [self.retrain_test_accuracy, *self.references_test_accuracy]
        return max([0.0] + [self.original_test_accuracy - a for a in found if a is not None])

    @property
    def weak(self) -> bool:
        return self.shortfall > self.margin


class UnlearnReport(Report):
    """Before/after scores of removing flagged examples from a model, on the same data.

    Example:
        >>> s = UnlearnScores(flagged_accuracy=1.0, retained_accuracy=1.0)
        >>> r = UnlearnReport(method="finetune", before=s, after=s, seconds=1.0, model="m",
        ...                   data="d", n_flagged=3, n_retained=10)
        >>> UnlearnReport.model_validate_json(r.model_dump_json()) == r
        True
    """

    KIND: ClassVar[str] = "unlearn"
    SCHEMA_VERSION: ClassVar[int] = 3  # 2: preflight; 3: membership ROC curves, retrain scores
    kind: Literal["unlearn"] = "unlearn"
    schema_version: int = 3

    method: str
    settings: dict[str, float | int | str | bool | None] = Field(
        default_factory=dict, description="the method's settings (epochs, lr, ...)"
    )
    before: UnlearnScores
    after: UnlearnScores
    retrain: UnlearnScores | None = Field(
        None, description="a model retrained from scratch without the flagged ids (gold standard)"
    )
    seconds: float = Field(ge=0, description="wall time of the unlearning step (no measurement)")
    retrain_seconds: float | None = None
    model: str = Field(description="the model that was unlearned (its source and architecture)")
    data: str = Field(description="the training data the flagged ids index")
    test_data: str | None = None
    n_flagged: int = Field(ge=0)
    n_retained: int = Field(ge=0)
    n_test: int = Field(0, ge=0)
    out_model: str | None = Field(None, description="where the unlearned model was saved")
    preflight: Preflight | None = Field(
        None, description="the original model's accuracy before unlearning, and its inputs"
    )
    membership: Membership | None = Field(
        None, description="the membership test against reference models (membership_references)"
    )
    retrain_source: str | None = Field(
        None, description="the reference model given with retrained= (else retrained here)"
    )
    agreement_with_retrain: float | None = Field(
        None, ge=0, le=1, description="share of flagged ids predicted as the reference predicts"
    )
    reference_check: ReferenceCheck | None = Field(
        None, description="the references' test accuracy against the original's (needs test)"
    )
    recipe: Recipe | None = Field(
        None, description="the training recipe of the model's family every step used"
    )

    def gap_to_retrain(self) -> float | None:
        """Mean absolute difference of the accuracies after unlearning and after retraining."""
        if self.retrain is None:
            return None
        return accuracy_gap(self.after, self.retrain)

    def average_gap(self) -> float | None:
        """The average gap to the reference (the metric of the SalUn and Unlearn-Sparse papers):
        the mean absolute gap over flagged, retained and test accuracy and, when measured, the
        membership test's TPR at 1% FPR."""
        if self.retrain is None:
            return None
        pairs = _pairs(self.after, self.retrain)
        m = self.membership
        if m is not None and m.retrain is not None:
            after, ref = m.after.tpr_at_1pct_fpr.value, m.retrain.tpr_at_1pct_fpr.value
            if after is not None and ref is not None:
                pairs.append((after, ref))
        return sum(abs(x - y) for x, y in pairs) / len(pairs)


def accuracy_gap(a: UnlearnScores, b: UnlearnScores) -> float:
    """Mean absolute difference of flagged, retained and (when both have it) test accuracy."""
    pairs = _pairs(a, b)
    return sum(abs(x - y) for x, y in pairs) / len(pairs)


def _pairs(a: UnlearnScores, b: UnlearnScores) -> list[tuple[float, float]]:
    pairs = [
        (a.flagged_accuracy, b.flagged_accuracy),
        (a.retained_accuracy, b.retained_accuracy),
    ]
    if a.test_accuracy is not None and b.test_accuracy is not None:
        pairs.append((a.test_accuracy, b.test_accuracy))
    return pairs
