"""The verdict in plain words: sentences for the HTML page, the Markdown summary and the CLI."""

from __future__ import annotations

from collections.abc import Sequence

from memaudit.schema._audit import Gate, Verdict
from memaudit.schema._scan import ScanReport
from memaudit.schema._unlearn import MembershipFigures, UnlearnReport


def gate_message(gate: Gate) -> str:
    """One line: which gate, the measured value, and by how much it missed (or passed)."""
    what = {
        "max-flagged-accuracy": "flagged accuracy after unlearning",
        "max-localized-fraction": "share of flagged examples localized",
        "max-gap-to-retrain": "average gap to retraining",
        "max-membership-tpr": "membership TPR at 1% FPR after unlearning",
    }[gate.name]
    if gate.value is None:
        hint = (
            " (TPR at 1% FPR needs at least 100 negatives: more flagged ids or references)"
            if gate.name == "max-membership-tpr"
            else ""
        )
        return f"gate --{gate.name} failed: the {what} could not be measured{hint}"
    if gate.weak_reference:
        return (
            f"gate --{gate.name} failed: the {what} is {gate.value:.1%}, but the retrained "
            "reference falls short of the original's test accuracy, so it is no evidence"
        )
    if gate.passed:
        return f"gate --{gate.name} passed: {what} {gate.value:.1%} <= {gate.threshold:.1%}"
    return (
        f"gate --{gate.name} failed: {what} is {gate.value:.1%}, above the limit "
        f"{gate.threshold:.1%} by {(gate.value - gate.threshold) * 100:.1f} pts"
    )


def membership_sentence(u: UnlearnReport) -> str | None:
    """The membership test in a reviewer's words: can the flagged ids be told from unseen ones?"""
    m = u.membership
    if m is None:
        return None

    def figures(f: MembershipFigures) -> str:
        tpr, auc = f.tpr_at_1pct_fpr.value, f.auc.value
        return f"TPR {_pct(tpr)} at 1% FPR, AUC {_num(auc)}"

    line = (
        f"Membership test against {m.n_references} models trained without the flagged ids: "
        f"before unlearning {figures(m.before)}; after {figures(m.after)}"
    )
    if m.retrain is not None:
        line += f"; a model retrained without them {figures(m.retrain)}"
    after = m.after.auc
    if after.high is not None and after.high < 0.5:
        line += (
            ". After unlearning the flagged ids look less like members than under models that "
            "never saw them: that is itself a signal an attacker can use, not success"
        )
    elif after.low is not None and after.low > 0.5:
        line += ". After unlearning the flagged ids are still distinguishable from unseen ones"
    else:
        line += ". After unlearning the flagged ids are not distinguishable from unseen ones"
    return line + "."


def reference_sentence(u: UnlearnReport) -> str | None:
    """Whether the yardstick is trustworthy, with the test accuracies that say so."""
    check = u.reference_check
    if check is None:
        return None
    parts = []
    if check.retrain_test_accuracy is not None:
        parts.append(f"the retrained reference {_pct(check.retrain_test_accuracy)}")
    if check.references_test_accuracy:
        low = min(check.references_test_accuracy)
        parts.append(f"the membership references {_pct(low)} at the lowest")
    if not parts:
        return None
    line = f"Test accuracy of the original model {_pct(check.original_test_accuracy)}; " + (
        ", ".join(parts)
    )
    if check.weak:
        return (
            f"{line}: {check.shortfall * 100:.1f} pts short, more than the "
            f"{check.margin * 100:g}-pt margin. The yardstick is weak (the retraining recipe may "
            "not suit this architecture): the gaps to it are not evidence."
        )
    return f"{line}: within {check.margin * 100:g} pts, a fair yardstick."


def gap_sentence(u: UnlearnReport) -> str | None:
    """How far the unlearned model is from the reference retrained without the flagged ids."""
    gap = u.average_gap()
    if gap is None:
        return None
    what = "membership TPR included" if u.membership and u.membership.retrain else "accuracies"
    line = (
        f"Average gap to the model retrained without the flagged ids: {gap * 100:.1f} pts ({what})"
    )
    if u.agreement_with_retrain is not None:
        line += (
            f"; {_pct(u.agreement_with_retrain)} of flagged ids are predicted as it predicts them"
        )
    return line + "."


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def verdict_sentences(
    scan: ScanReport,
    found: Verdict,
    *,
    unlearns: Sequence[UnlearnReport] = (),
    rescan: ScanReport | None = None,
    comparisons: Sequence[ScanReport] = (),
    unlearn_skipped: bool = False,
) -> list[str]:
    """The verdict in plain words (plain text: callers escape it for HTML or Markdown)."""
    n, c, k, cap = found.n_flagged, found.n_correct_before, found.n_localized, found.localized_units
    s = scan.summary
    share = _pct(c / n if n else None)
    lines = [f"The model predicts the given label for {c} of {n} flagged examples ({share})."]
    if s.n_misclassified:
        lines[0] += (
            f" The other {s.n_misclassified} are misclassified already and were not searched."
        )
    if c:
        median = (
            f"median {s.median_units_minimal:g} units" if s.median_units_minimal else "none flipped"
        )
        lines.append(
            f"{k} of them ({_pct(found.localized_fraction)} of all flagged) rest on a handful of "
            f"units: zeroing at most {cap} of the model's {scan.model.n_units} units flips their "
            f"prediction ({median} among the {s.n_flipped} that flipped)."
        )
    if s.n_budget_exhausted:
        lines.append(
            f"{s.n_budget_exhausted} did not flip within the budget of "
            f"{scan.settings.max_units} units."
        )
    if s.mean_test_accuracy_drop is not None:
        lines.append(
            f"An edit costs on average {s.mean_test_accuracy_drop * 100:.1f} pts of test accuracy"
            f" (from {_pct(s.test_accuracy_before)})."
        )
    elif s.mean_reference_accuracy_drop is not None:
        lines.append(
            f"An edit costs on average {s.mean_reference_accuracy_drop * 100:.1f} pts of accuracy "
            "on the reference examples."
        )
    for other in comparisons:
        m = other.summary.median_units_minimal
        ratio = (
            f" ({m / s.median_units_minimal:.1f}× the flagged median)"
            if (m and s.median_units_minimal)
            else ""
        )
        lines.append(
            f"For comparison, {other.summary.n_flagged} non-flagged examples: "
            f"{other.summary.n_flipped} flipped, median {'n/a' if m is None else f'{m:g}'} "
            f"units{ratio}."
        )
    for u in unlearns:
        retrain = (
            f" (retraining from scratch: {_pct(u.retrain.flagged_accuracy)})" if u.retrain else ""
        )
        lines.append(
            f"Unlearning with {u.method} ({u.seconds:.0f} s) took flagged accuracy from "
            f"{_pct(u.before.flagged_accuracy)} to {_pct(u.after.flagged_accuracy)}{retrain}; "
            f"retained {_pct(u.before.retained_accuracy)} → {_pct(u.after.retained_accuracy)}, "
            f"test {_pct(u.before.test_accuracy)} → {_pct(u.after.test_accuracy)}, "
            f"loss-threshold AUC against test images {_num(u.before.mia_auc)} → "
            f"{_num(u.after.mia_auc)}."
        )
    lines += [said for u in unlearns if (said := membership_sentence(u))]
    lines += [said for u in unlearns if (said := reference_sentence(u))]
    lines += [said for u in unlearns if (said := gap_sentence(u))]
    if unlearn_skipped:
        lines.append("Unlearning was not run (--no-unlearn).")
    if rescan is not None and found.n_correct_after is not None:
        lines.append(
            f"After unlearning, the model predicts the given label for {found.n_correct_after} of "
            f"{n} flagged examples; {found.n_localized_after} still flip with ≤ {cap} units."
        )
    return lines + [f"Caution: {w}." for w in found.warnings]


def unlearn_sentences(unlearns: Sequence[UnlearnReport]) -> list[str]:
    """Plain-words lines for unlearning runs without a scan."""
    lines = [
        f"Unlearning with {u.method} ({u.seconds:.0f} s) took flagged accuracy from "
        f"{u.before.flagged_accuracy:.0%} to {u.after.flagged_accuracy:.0%}"
        + (f" (retraining: {u.retrain.flagged_accuracy:.0%})" if u.retrain else "")
        + "."
        for u in unlearns
    ]
    lines += [said for u in unlearns if (said := membership_sentence(u))]
    lines += [said for u in unlearns if (said := reference_sentence(u))]
    lines += [said for u in unlearns if (said := gap_sentence(u))]
    warnings = dict.fromkeys(w for u in unlearns if u.preflight for w in u.preflight.warnings)
    return lines + [f"Caution: {w}." for w in warnings]
