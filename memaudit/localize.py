"""Localization: a batched greedy search for the few units whose zeroing flips an example.

For each flagged example ``(x_i, y_i)`` the model predicts correctly, the search zeroes units one
step at a time, choosing by a first-order estimate of the paper's objective

    L_i(m) = -CE(f(x_i; m), y_i) + w * mean_r CE(f(x_r; m), y_r)

(make the example's loss go up while the loss on non-flagged reference rows ``r`` stays down),
until the prediction is no longer ``y_i``. Every example has its own mask row ``m_i``; one forward
and one backward per step serve the whole active batch, and examples leave the batch as they flip.

**The reference term in the batched setting.** The authors recompute the reference loss's
gradient ``g_ref(m_i) = d mean_r CE(x_r; m_i) / dm`` on the edited model at every step, for every
example; the score is ``dL_i/dm = -dCE_i/dm (at m_i) + w * g_ref``. Three modes
(``ScanSettings.reference_mode``):

- ``shared``: ``g_ref(1)``, computed once per scan on the unedited model and shared by all
  examples and steps. A memorized example flips after a few units, so the term barely moves and
  the answers match the authors'. An example that needs many units drifts: the shared term
  under-counts the damage of a long edit, so it flips with fewer units (on the testbed's clean
  examples, a median of 5 against the authors' 9) at a higher accuracy cost.
- ``refreshed`` (default): the search first runs in shared mode with a budget of
  ``shared_units`` (4). Examples that flip within it keep that answer. The rest are searched
  again from the start, with ``g_ref`` recomputed exactly at each example's own mask after 1, 2,
  4, 8, ... zeroed units and held in between. This removes most of the drift at a fraction of
  the exact cost (clean examples: a median of 8 against the authors' 9).
- ``exact``: ``g_ref(m_i)`` at every step: every example's mask on every reference row
  (``A x R`` rows per step, shared by examples with equal masks). It gives the authors' term
  unit for unit, at close to their cost on a CPU.

``benchmarks/bench_scan.py`` measures all three against the sequential search in the same run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from memaudit.data import ImageDataset
from memaudit.errors import MemauditError, validated
from memaudit.masks import UnitMasks
from memaudit.models import Classifier
from memaudit.schema._scan import ExampleResult, ScanSettings, Status, UnitRef
from memaudit.units import Unit, UnitSpace


def rows_per_pass(device: torch.device) -> int:
    """Rows per forward when many masked copies of a batch run at once. CPUs are fastest at a
    few hundred rows (2,000-row batches ran 1.7x slower per row on the 2-core test machine);
    GPUs want large batches."""
    return 4096 if device.type == "cuda" else 256


@dataclass
class ScoreContext:
    """What a scorer sees for one greedy step of the active batch."""

    model: Classifier
    masks: UnitMasks
    x: torch.Tensor  # [A, ...] inputs of the active examples
    y: torch.Tensor  # [A] their labels
    mask: torch.Tensor  # [A, U] current masks (1 = on, 0 = zeroed)
    # d mean CE(reference) / d m: [U] at m = 1 (shared by all), or [A, U] at each example's mask
    # as last refreshed (see the module docstring).
    reference_grad: torch.Tensor
    settings: ScanSettings
    generator: torch.Generator
    # Logits at the current mask, left by a scorer whose forward computed them anyway, so the
    # search can check for flips without another forward pass.
    logits: torch.Tensor | None = None


Scorer = Callable[[ScoreContext], torch.Tensor]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Register a scorer: ``scorer(ctx) -> [A, U]``, higher = zero this unit first."""

    def add(fn: Scorer) -> Scorer:
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is already registered")
        SCORERS[name] = fn
        return fn

    return add


def target_objective(
    ctx: ScoreContext, mask: torch.Tensor, *, at_current_mask: bool = False
) -> torch.Tensor:
    """``-CE`` of each example under its mask row, averaged over noisy copies if asked: ``[A]``.

    With ``at_current_mask`` (``mask`` equals ``ctx.mask``) the clean logits are kept on ``ctx``.
    """
    copies = ctx.settings.noise_copies
    x, y, rows = ctx.x, ctx.y, mask
    if copies:
        x = x.repeat_interleave(copies, 0)
        noise = torch.randn(x.shape, generator=ctx.generator).to(x.device)
        x = x + ctx.settings.noise_std * noise
        y, rows = y.repeat_interleave(copies), mask.repeat_interleave(copies, 0)
    ctx.masks.mask = rows
    logits = ctx.model(x).float()
    if at_current_mask and not copies:
        ctx.logits = logits.detach()
    loss = F.cross_entropy(logits, y, reduction="none")
    return -loss.view(len(ctx.y), -1).mean(1)


@register_scorer("grad-x-act")
def grad_x_act(ctx: ScoreContext) -> torch.Tensor:
    """The paper's first-order estimate: ``dL/dm``, i.e. gradient x activation per unit."""
    mask = ctx.mask.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target_objective(ctx, mask, at_current_mask=True).sum(), mask)
    return grad + ctx.settings.reference_weight * ctx.reference_grad


def exact_reference_grad(
    model: Classifier,
    masks: UnitMasks,
    mask: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """``d mean_r CE(x_r; m_i) / d m_i`` for every mask row ``m_i``: ``[A, U]``.

    The authors' exact term: every distinct mask applied to every reference row (processed in
    chunks of masks so memory stays bounded). Examples whose masks are equal share the work: at
    the first step every mask is all ones, and examples often zero the same first units.
    """
    ref_x, ref_y = reference
    distinct, inverse = torch.unique(mask.detach(), dim=0, return_inverse=True)
    n_ref = len(ref_y)
    per_chunk = max(1, rows_per_pass(mask.device) // max(1, n_ref))
    grads = []
    for rows in distinct.split(per_chunk):
        leaf = rows.requires_grad_(True)
        masks.mask = leaf.repeat_interleave(n_ref, 0)
        x = ref_x.repeat(len(leaf), *([1] * (ref_x.ndim - 1)))
        loss = F.cross_entropy(model(x).float(), ref_y.repeat(len(leaf)))
        # The mean over each mask's rows, summed over masks.
        (grad,) = torch.autograd.grad(loss * len(leaf), leaf)
        grads.append(grad)
    return torch.cat(grads)[inverse]


@register_scorer("integrated-gradients")
def integrated_gradients(ctx: ScoreContext) -> torch.Tensor:
    """Captum's integrated gradients of the objective w.r.t. the mask, from all-off to current."""
    from captum.attr import IntegratedGradients

    def forward(mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sub = ScoreContext(**{**ctx.__dict__, "x": x, "y": y})
        return target_objective(sub, mask)

    mask = ctx.mask.detach().clone()
    attr = IntegratedGradients(forward).attribute(
        mask,
        baselines=torch.zeros_like(mask),
        additional_forward_args=(ctx.x, ctx.y),
        n_steps=ctx.settings.ig_steps,
    )
    return attr.detach() + ctx.settings.reference_weight * ctx.reference_grad


@register_scorer("random")
def random_scores(ctx: ScoreContext) -> torch.Tensor:
    """A baseline: zero random units."""
    return torch.rand(ctx.mask.shape, generator=ctx.generator).to(ctx.mask.device)


@dataclass
class Found:
    """In-memory search result for one example (``units`` are flat indices of the space)."""

    row: int
    label: int
    predicted_before: int
    status: Status
    greedy: list[int] = field(default_factory=list)
    minimal: list[int] = field(default_factory=list)
    predicted_after: int | None = None
    steps: int = 0


def reference_gradient(
    model: Classifier,
    masks: UnitMasks,
    data: ImageDataset,
    rows: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """``d mean CE(reference rows) / d m`` at ``m = 1`` (one mask shared by all rows): ``[U]``."""
    shared = torch.ones(1, masks.space.total, device=device, requires_grad=True)
    if rows.numel() == 0:
        return torch.zeros(masks.space.total, device=device)
    for chunk in rows.split(batch_size):
        masks.mask = shared.expand(len(chunk), -1)
        logits = model(data.batch(chunk, device)).float()
        loss = F.cross_entropy(logits, data.labels[chunk].to(device), reduction="sum")
        (loss / len(rows)).backward()
    masks.mask = None
    assert shared.grad is not None
    return shared.grad[0].detach()


@torch.no_grad()
def _predict(
    masks: UnitMasks, model: Classifier, x: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    masks.mask = mask
    return model(x).argmax(1)


def greedy_search(
    model: Classifier,
    masks: UnitMasks,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    settings: ScanSettings,
    reference_grad: torch.Tensor,
    generator: torch.Generator,
    reference_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[Found]:
    """Zero units per example until each flips or hits the budget. All of ``x`` must be correct.

    ``reference_batch`` (inputs, labels) are the reference rows, needed to refresh the reference
    term at each example's mask (``settings.reference_mode`` other than ``shared``).
    """
    search = functools.partial(
        _search,
        model,
        masks,
        settings=settings,
        reference_grad=reference_grad,
        generator=generator,
        reference_batch=reference_batch,
    )
    budget = min(settings.max_units, masks.space.total)
    mode = settings.reference_mode if reference_batch is not None else "shared"
    if mode == "refreshed" and settings.shared_units >= budget:
        mode = "shared"
    if mode != "refreshed":
        return search(x, y, budget=budget, mode=mode)
    found = search(x, y, budget=settings.shared_units, mode="shared")
    redo = [i for i, f in enumerate(found) if f.status is Status.BUDGET_EXHAUSTED]
    if redo:
        again = search(x[redo], y[redo], budget=budget, mode="refreshed")
        for i, f in zip(redo, again, strict=True):
            found[i] = f
    return found


def _search(
    model: Classifier,
    masks: UnitMasks,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    budget: int,
    mode: str,
    settings: ScanSettings,
    reference_grad: torch.Tensor,
    generator: torch.Generator,
    reference_batch: tuple[torch.Tensor, torch.Tensor] | None,
) -> list[Found]:
    """The greedy loop, with the reference term refreshed as ``mode`` says."""
    scorer = SCORERS[settings.scorer]
    n_rows, total = len(y), masks.space.total
    zeroed = torch.zeros(n_rows, total, dtype=torch.bool, device=x.device)
    order = torch.full((n_rows, budget), -1, dtype=torch.long, device=x.device)
    found = [Found(-1, int(y[i]), int(y[i]), Status.BUDGET_EXHAUSTED) for i in range(n_rows)]
    active = torch.arange(n_rows, device=x.device)
    ref_grads = reference_grad.expand(n_rows, -1).clone() if mode != "shared" else None
    next_refresh = 0 if mode == "exact" else 1
    n_zeroed = step = 0
    while active.numel():
        mask = (~zeroed[active]).float()
        due = n_zeroed >= next_refresh and n_zeroed < budget
        if ref_grads is not None and reference_batch is not None and due:
            ref_grads[active] = exact_reference_grad(model, masks, mask, reference_batch)
            next_refresh = n_zeroed + 1 if mode == "exact" else 2 * n_zeroed
        ref_grad = ref_grads[active] if ref_grads is not None else reference_grad
        ctx = ScoreContext(model, masks, x[active], y[active], mask, ref_grad, settings, generator)
        # Score before checking for flips: the default scorer's forward also gives predictions.
        scores = scorer(ctx) if n_zeroed < budget else None
        pred = (
            ctx.logits.argmax(1) if ctx.logits is not None else _predict(masks, model, ctx.x, mask)
        )
        flipped = pred != ctx.y
        done = flipped | (n_zeroed >= budget)
        for i, p, f in zip(
            active[done].tolist(), pred[done].tolist(), flipped[done].tolist(), strict=True
        ):
            found[i].status = Status.FLIPPED if f else Status.BUDGET_EXHAUSTED
            found[i].predicted_after, found[i].steps = p, step
            found[i].greedy = order[i, :n_zeroed].tolist()
        if scores is None or bool(done.all()):
            break
        active, scores = active[~done], scores[~done]
        scores = scores.masked_fill(zeroed[active], float("-inf"))
        k = min(settings.units_per_step, budget - n_zeroed)
        top = scores.topk(k, dim=1).indices
        zeroed[active.unsqueeze(1), top] = True
        order[active, n_zeroed : n_zeroed + k] = top
        n_zeroed, step = n_zeroed + k, step + 1
    masks.mask = None
    return found


def prune(
    model: Classifier, masks: UnitMasks, x: torch.Tensor, y: torch.Tensor, found: list[Found]
) -> None:
    """Drop every greedy unit the flip does not need (one removal tried per unit, batched)."""
    flipped = [i for i, f in enumerate(found) if f.status is Status.FLIPPED]
    for i in flipped:
        found[i].minimal = list(found[i].greedy)
    longest = max((len(found[i].greedy) for i in flipped), default=0)
    total = masks.space.total
    for j in range(longest):
        rows = [i for i in flipped if j < len(found[i].greedy) and len(found[i].minimal) > 1]
        if not rows:
            continue
        mask = torch.ones(len(rows), total, device=x.device)
        for r, i in enumerate(rows):
            keep = [u for u in found[i].minimal if u != found[i].greedy[j]]
            mask[r, keep] = 0
        pred = _predict(masks, model, x[rows], mask)
        for r, i in enumerate(rows):
            if pred[r] != y[i]:
                found[i].minimal.remove(found[i].greedy[j])
    for i in flipped:
        mask = torch.ones(1, total, device=x.device)
        mask[0, found[i].minimal] = 0
        found[i].predicted_after = int(_predict(masks, model, x[i : i + 1], mask)[0])
    masks.mask = None


@torch.no_grad()
def edited_accuracy(
    model: Classifier,
    masks: UnitMasks,
    unit_sets: list[list[int]],
    data: ImageDataset,
    rows: torch.Tensor,
    *,
    device: torch.device,
) -> torch.Tensor:
    """Accuracy on ``rows`` of each edited model (one unit set each), batched: ``[E]``."""
    n_sets = len(unit_sets)
    if n_sets == 0 or rows.numel() == 0:
        return torch.full((n_sets,), float("nan"))
    set_masks = torch.ones(n_sets, masks.space.total, device=device)
    for e, units in enumerate(unit_sets):
        set_masks[e, units] = 0
    correct = torch.zeros(n_sets, device=device)
    block = max(1, rows_per_pass(device) // n_sets)
    for chunk in rows.split(block):
        x, y = data.batch(chunk, device), data.labels[chunk].to(device)
        masks.mask = set_masks.repeat_interleave(len(chunk), 0)
        logits = model(x.repeat(n_sets, *([1] * (x.ndim - 1))))
        correct += (logits.argmax(1) == y.repeat(n_sets)).view(n_sets, -1).sum(1)
    masks.mask = None
    return (correct / rows.numel()).cpu()


def to_result(
    found: Found, space: UnitSpace, ref_acc: float | None, test_acc: float | None, id_: int
) -> ExampleResult:
    """The report entry of one searched (or skipped) example."""
    return ExampleResult(
        id=id_,
        label=found.label,
        predicted_before=found.predicted_before,
        status=found.status,
        flipped=found.status is Status.FLIPPED,
        n_units=len(found.greedy),
        n_units_minimal=len(found.minimal),
        units=[UnitRef(layer=u.layer, index=u.index) for u in space.units(found.minimal)],
        predicted_after=found.predicted_after,
        steps=found.steps,
        reference_accuracy=ref_acc,
        test_accuracy=test_acc,
    )


def scan_settings(base: ScanSettings | None = None, **overrides: Any) -> ScanSettings:
    """``base`` (or the defaults) with ``overrides``, validated; one-line errors."""
    values = {**(base or ScanSettings()).model_dump(), **overrides}
    settings = validated(ScanSettings, values, "scan setting")
    if settings.scorer not in SCORERS:
        raise MemauditError(f"unknown scorer {settings.scorer!r}; choose from {', '.join(SCORERS)}")
    return settings


def search_chunk(
    model: Classifier,
    masks: UnitMasks,
    data: ImageDataset,
    rows: torch.Tensor,
    *,
    settings: ScanSettings,
    reference_grad: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
    reference_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[Found]:
    """Search one chunk of flagged rows; misclassified rows are reported, not searched."""
    x, y = data.batch(rows, device), data.labels[rows].to(device)
    pred = _predict(masks, model, x, torch.ones(len(rows), masks.space.total, device=device))
    ok = pred == y
    found: list[Found] = [
        Found(int(r), int(y[i]), int(pred[i]), Status.MISCLASSIFIED, predicted_after=int(pred[i]))
        for i, r in enumerate(rows.tolist())
    ]
    if ok.any():
        idx = ok.nonzero().flatten()
        searched = greedy_search(
            model,
            masks,
            x[idx],
            y[idx],
            settings=settings,
            reference_grad=reference_grad,
            generator=generator,
            reference_batch=reference_batch,
        )
        if settings.prune:
            prune(model, masks, x[idx], y[idx], searched)
        else:
            for f in searched:
                f.minimal = list(f.greedy)
        for i, f in zip(idx.tolist(), searched, strict=True):
            f.row, f.predicted_before = int(rows[i]), int(pred[i])
            found[i] = f
    return found


def flip_units(
    model: Classifier,
    train: ImageDataset,
    rows: torch.Tensor,
    *,
    settings: ScanSettings | None = None,
    device: str | torch.device = "auto",
) -> list[list[int]]:
    """Minimal unit sets (flat indices of ``model.units()``) that flip each row; ``[]`` if none.

    A convenience over :meth:`memaudit.Auditor.scan` for methods that edit by units.
    """
    from memaudit.auditor import Auditor  # the Auditor builds on this module

    ids = rows.tolist() if train.ids is None else train.ids[rows].tolist()
    # A step inside unlearning, whose caller ran the preflight check: never refused here.
    auditor = Auditor(model, train, device=device, min_train_accuracy=0)
    report = auditor.scan(ids, settings=settings, eval_size=0)
    space = model.units()
    return [
        [space.flat(Unit(u.layer, u.index)) for u in e.units] if e.flipped else []
        for e in report.examples
    ]
