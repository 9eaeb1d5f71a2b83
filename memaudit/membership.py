"""Membership inference against reference models: like with like.

Does a model recognise the flagged ids as its training members? The fair comparison is the same
ids under models that never saw them, not other images: a mislabeled image has a high loss
under its given label in any model that did not memorize it, so comparing it with test images
under their true labels tells nothing (memaudit's former loss-threshold AUC said "less
member-like than test data" for 400 memorized ids).

The attack is offline LiRA (Carlini et al., S&P 2022) with a fixed variance: an id's score is
the logit margin of its given label, ``z_y - max_{k != y} z_k``; the reference models (trained
without the flagged ids) give each id its own mean, and one pooled standard deviation makes the
test usable with two to four references, as a CPU can afford (the paper's "fixed variance"
variant is the one it recommends for few references). The membership score of an id is how
many pooled standard deviations its margin under the audited model lies above the references'
mean. RMIA (Zarifzadeh et al., ICML 2024) works with one reference, but needs population
samples and a calibration constant per setting; with two references LiRA needs neither.

Evaluation: the audited model's scores of the flagged ids are the positives; each reference in
turn, scored against the others, gives the negatives (the same ids under a model that never saw
them). Reported: ROC AUC and TPR at 1% and 0.1% FPR, with bootstrap intervals over the ids, the
ROC curve on a log-FPR grid, and each id's score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memaudit.data import ImageDataset
from memaudit.engine import logits_of
from memaudit.errors import MemauditError
from memaudit.models import Classifier
from memaudit.schema import IdScore, Membership, MembershipFigures, RocCurve
from memaudit.schema import Interval as SchemaInterval

FPRS = (0.01, 0.001)


def margins(
    model: Classifier, data: ImageDataset, rows: torch.Tensor, *, device: str | torch.device
) -> torch.Tensor:
    """Logit margin of each row's given label over the best other class: ``[n]``."""
    return logit_margins(logits_of(model, data, rows, device=device), data.labels[rows])


def logit_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits[i, labels[i]]`` minus the largest other logit of row ``i``: ``[n]``."""
    given = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
    return given - others


def lira_scores(target: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Membership score of each id: ``(target - mean_ref) / pooled_std``. ``references`` is
    ``[K, n]``, ``K >= 1``; with one reference the spread of its margins over ids is the scale."""
    mean = references.mean(0)
    if len(references) > 1:
        std = (references - mean).pow(2).sum().div(references.numel() - references.shape[1]).sqrt()
    else:
        std = references.std()
    return (target - mean) / std.clamp_min(1e-6)


def leave_one_out(
    target: torch.Tensor, references: torch.Tensor, only: Sequence[int] = ()
) -> torch.Tensor:
    """``target``'s scores ``[K', n]`` against each set of ``K - 1`` of the ``references``
    ``[K, n]``: leaving out each reference in turn, or only those in ``only``."""
    left_out = list(only) or range(len(references))
    return torch.stack(
        [lira_scores(target, torch.cat([references[:k], references[k + 1 :]])) for k in left_out]
    )


@dataclass(frozen=True)
class Interval:
    """A value and its 95% bootstrap interval (over the ids)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class AttackResult:
    """The attack on one model: per-id scores, AUC and TPR at low FPR, with intervals."""

    scores: torch.Tensor  # [n] membership score of each flagged id under the model
    auc: Interval
    tpr: dict[float, Interval]  # FPR -> TPR
    roc: tuple[torch.Tensor, torch.Tensor]  # (FPR, TPR) at the points of :func:`roc_curve`


def roc_auc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties 1/2 (rank-based, exact)."""
    n_p, n_n = positives.numel(), negatives.numel()
    if not n_p or not n_n:
        return float("nan")
    scores = torch.cat([positives, negatives]).double()
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


def tpr_at(positives: torch.Tensor, negatives: torch.Tensor, fpr: float) -> float:
    """Share of positives above the threshold that lets through at most ``fpr`` of negatives;
    NaN with fewer than ``1 / fpr`` negatives, which cannot resolve that FPR."""
    if not positives.numel() or negatives.numel() * fpr < 1:
        return float("nan")
    ordered = negatives.sort(descending=True).values
    allowed = int(fpr * negatives.numel())  # negatives that may score above the threshold
    threshold = ordered[min(allowed, negatives.numel() - 1)]
    return float((positives > threshold).double().mean())


def roc_curve(
    positives: torch.Tensor, negatives: torch.Tensor, *, points: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ROC curve at ``points`` FPRs spaced evenly on a log scale from the smallest the
    negatives resolve (``1 / n``) to 1, plus FPR 0: ``(fpr, tpr)``, each ``[<= points + 1]``.
    The TPR at each FPR is :func:`tpr_at`'s (the threshold that lets through at most that
    share of the negatives)."""
    n = negatives.numel()
    if not positives.numel() or not n:
        return torch.zeros(0), torch.zeros(0)
    grid = torch.logspace(-math.log10(n), 0, points, dtype=torch.float64)
    allowed = (grid * n + 1e-9).floor().long().unique()  # negatives let through at each point
    ordered = negatives.double().sort(descending=True).values
    thresholds = torch.cat([ordered, ordered[-1:] - 1])[allowed.clamp_max(n)]
    tpr = (positives.double()[:, None] > thresholds[None, :]).double().mean(0)
    fpr = (negatives.double()[:, None] > thresholds[None, :]).double().mean(0)
    return torch.cat([fpr.new_zeros(1), fpr]), torch.cat([tpr.new_zeros(1), tpr])


def evaluate(
    positives: torch.Tensor,
    negatives: torch.Tensor,
    *,
    fprs: Sequence[float] = FPRS,
    rounds: int = 200,
    seed: int = 0,
) -> tuple[Interval, dict[float, Interval]]:
    """AUC and TPR at each FPR, with 95% intervals from ``rounds`` bootstrap resamples of the
    ids. ``positives`` and ``negatives`` are ``[n]`` or ``[R, n]`` (scores of the same ``n``
    ids, ``R`` ways: e.g. ``R`` non-member models); the ids are resampled in both."""
    n = positives.shape[-1]
    pos, neg = positives.reshape(-1, n), negatives.reshape(-1, n)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (rounds, n), generator=gen)

    def stats(p: torch.Tensor, q: torch.Tensor) -> list[float]:
        p, q = p.flatten(), q.flatten()
        return [roc_auc(p, q), *(tpr_at(p, q, f) for f in fprs)]

    point = stats(pos, neg)
    boot = torch.tensor([stats(pos[:, i], neg[:, i]) for i in picks])
    low, high = boot.nanquantile(0.025, dim=0), boot.nanquantile(0.975, dim=0)
    found = [Interval(point[k], float(low[k]), float(high[k])) for k in range(len(point))]
    return found[0], dict(zip(fprs, found[1:], strict=True))


def attack(
    models: dict[str, Classifier],
    references: Sequence[Classifier],
    data: ImageDataset,
    rows: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, AttackResult]:
    """The membership attack on each of ``models`` (e.g. before / after unlearning), with
    ``references`` (trained without ``rows``) as the non-member yardstick.

    Like with like, also in the number of references: the negatives are each reference scored
    against the other ``K - 1``, and a model is scored the same way, once against each set of
    ``K - 1`` references (``K`` scores per id; its per-id score is their mean). Scoring a
    model against all ``K`` while the negatives see ``K - 1`` would standardize the two by
    different spreads: with two references it gave a retrained model, which never saw the ids,
    a TPR of 12% at 1% FPR on 100 mislabeled testbed ids (5% scored like with like). A model
    that is itself one of the references is scored against the others only. Needs at least two
    references."""
    if len(references) < 2:
        raise MemauditError(
            "the membership test needs at least two reference models trained without the "
            "flagged ids (--membership-references 2)"
        )
    ref = torch.stack([margins(m, data, rows, device=device) for m in references])
    negatives = torch.cat([leave_one_out(ref[k], ref, [k]) for k in range(len(ref))])
    out = {}
    for name, model in models.items():
        mine = [k for k, r in enumerate(references) if r is model]  # never its own yardstick
        scores = leave_one_out(margins(model, data, rows, device=device), ref, mine)
        auc, tpr = evaluate(scores, negatives, seed=seed)
        curve = roc_curve(scores.flatten(), negatives.flatten())
        out[name] = AttackResult(scores.mean(0), auc, tpr, curve)
    return out


def summarize(found: dict[str, AttackResult], ids: Sequence[int], n_references: int) -> Membership:
    """The report's membership block from :func:`attack` on ``before``, ``after`` and (if
    scored) ``retrain``; ``ids`` are the flagged ids in the order of the scores."""

    def interval(value: Interval) -> SchemaInterval:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        return SchemaInterval(value=num(value.value), low=num(value.low), high=num(value.high))

    def figures(result: AttackResult) -> MembershipFigures:
        fpr, tpr = result.roc
        return MembershipFigures(
            auc=interval(result.auc),
            tpr_at_1pct_fpr=interval(result.tpr[0.01]),
            tpr_at_01pct_fpr=interval(result.tpr[0.001]),
            roc=RocCurve(fpr=fpr.tolist(), tpr=tpr.tolist()),
        )

    before, after, retrain = found["before"], found["after"], found.get("retrain")
    ref = retrain.scores.tolist() if retrain is not None else [None] * len(ids)
    return Membership(
        n_references=n_references,
        before=figures(before),
        after=figures(after),
        retrain=figures(retrain) if retrain is not None else None,
        scores=[
            IdScore(id=int(i), before=float(b), after=float(a), retrain=r)
            for i, b, a, r in zip(
                ids, before.scores.tolist(), after.scores.tolist(), ref, strict=True
            )
        ],
    )
