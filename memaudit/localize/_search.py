"""The batched greedy search, its reference term, pruning, and the cost of each edit.

Every function here runs inside an open :class:`~memaudit.masks.UnitMasks` and applies its
masks with ``masks.applied``; results are flat unit indices of the model's unit space.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from memaudit.data import ImageDataset
from memaudit.engine import native_bf16
from memaudit.localize._scorers import SCORERS, ScoreContext, rows_per_pass
from memaudit.masks import UnitMasks
from memaudit.models import Classifier
from memaudit.schema import ScanSettings, Status


class Stages:
    """Seconds spent in each stage, summed over its calls; CUDA is synchronized at each
    boundary (once per stage and chunk, never inside the greedy loop)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def resolved(cfg: ScanSettings, device: torch.device) -> ScanSettings:
    """``cfg`` with ``precision="auto"`` made the one used on ``device`` (:func:`native_bf16`)."""
    if cfg.precision != "auto":
        return cfg
    return cfg.model_copy(update={"precision": "mixed" if native_bf16(device) else "float32"})


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
        with masks.applied(shared.expand(len(chunk), -1)):
            logits = model(data.batch(chunk, device)).float()
        loss = F.cross_entropy(logits, data.labels[chunk].to(device), reduction="sum")
        (loss / len(rows)).backward()
    assert shared.grad is not None
    return shared.grad[0].detach()


class Reference:
    """The reference rows of the clean term (inputs and labels on the device), and the exact
    reference gradients computed so far, by mask: every chunk of a scan reuses them (examples
    often zero the same first units), up to ``cache_bytes``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, cache_bytes: int = 256 * 2**20):
        self.x, self.y, self.cache_bytes = x, y, cache_bytes
        self.cache: dict[bytes, torch.Tensor] = {}

    def keep(self, keys: list[bytes], grads: torch.Tensor) -> None:
        """Hold copies of ``grads`` ``[n, U]`` under ``keys``, as far as the byte budget
        allows (copies: a view would keep the whole batch of gradients alive)."""
        room = self.cache_bytes // max(1, grads.shape[1] * grads.element_size()) - len(self.cache)
        self.cache.update(zip(keys, grads[: max(0, room)].clone(), strict=False))


def exact_reference_grad(
    model: Classifier, masks: UnitMasks, mask: torch.Tensor, reference: Reference
) -> torch.Tensor:
    """``d mean_r CE(x_r; m_i) / d m_i`` for every mask row ``m_i``: ``[A, U]``.

    The authors' exact term: every distinct mask applied to every reference row (processed in
    chunks of masks so memory stays bounded). Examples whose masks are equal share the work (at
    the first step every mask is all ones, and examples often zero the same first units), and
    so do chunks: masks seen before come from ``reference``'s cache. One transfer of the
    distinct masks to the host per call, for the cache keys.
    """
    distinct, inverse = torch.unique(mask.detach(), dim=0, return_inverse=True)
    keys = [row.tobytes() for row in np.packbits((distinct == 0).cpu().numpy(), axis=1)]
    held = [reference.cache.get(k) for k in keys]
    todo = [k for k, g in enumerate(held) if g is None]
    n_ref = len(reference.y)
    per_chunk = max(1, rows_per_pass(mask.device, backward=True) // max(1, n_ref))
    fresh = []
    for rows in distinct[todo].split(per_chunk):
        leaf = rows.requires_grad_(True)
        x = reference.x.repeat(len(leaf), *([1] * (reference.x.ndim - 1)))
        with masks.applied(leaf.repeat_interleave(n_ref, 0)):
            loss = F.cross_entropy(model(x).float(), reference.y.repeat(len(leaf)))
        # The mean over each mask's rows, summed over masks.
        (grad,) = torch.autograd.grad(loss * len(leaf), leaf)
        fresh.append(grad)
    if fresh:
        computed = torch.cat(fresh)
        reference.keep([keys[k] for k in todo], computed)
        for k, g in zip(todo, computed, strict=True):
            held[k] = g
    return torch.stack(cast(list[torch.Tensor], held))[inverse]


@torch.no_grad()
def predict_masked(
    masks: UnitMasks, model: Classifier, x: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Predicted class of each row of ``x`` under its own mask row."""
    with masks.applied(mask):
        return model(x).argmax(1)


def greedy_search(
    model: Classifier,
    masks: UnitMasks,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    settings: ScanSettings,
    reference_grad: torch.Tensor,
    ids: torch.Tensor,
    reference: Reference | None = None,
) -> list[Found]:
    """Zero units per example until each flips or hits the budget. All of ``x`` must be correct.
    ``ids`` (the examples' ids) key their random draws (noisy copies, the random scorer).

    ``reference`` (the reference rows) is needed to refresh the reference term at each
    example's mask (``settings.reference_mode`` other than ``shared``).
    """
    search = functools.partial(
        _search,
        model,
        masks,
        settings=settings,
        reference_grad=reference_grad,
        reference=reference,
    )
    budget = min(settings.max_units, masks.space.total)
    mode = settings.reference_mode if reference is not None else "shared"
    if mode == "refreshed" and settings.shared_units >= budget:
        mode = "shared"
    if mode != "refreshed":
        return search(x, y, ids, budget=budget, mode=mode)
    found = search(x, y, ids, budget=settings.shared_units, mode="shared")
    redo = [i for i, f in enumerate(found) if f.status is Status.BUDGET_EXHAUSTED]
    if redo:
        again = search(x[redo], y[redo], ids[redo], budget=budget, mode="refreshed")
        for i, f in zip(redo, again, strict=True):
            found[i] = f
    return found


def _search(
    model: Classifier,
    masks: UnitMasks,
    x: torch.Tensor,
    y: torch.Tensor,
    ids: torch.Tensor,
    *,
    budget: int,
    mode: str,
    settings: ScanSettings,
    reference_grad: torch.Tensor,
    reference: Reference | None,
) -> list[Found]:
    """The greedy loop, with the reference term refreshed as ``mode`` says."""
    scorer = SCORERS[settings.scorer]
    n_rows, total = len(y), masks.space.total
    zeroed = torch.zeros(n_rows, total, dtype=torch.bool, device=x.device)
    order = torch.full((n_rows, budget), -1, dtype=torch.long, device=x.device)
    found = [Found(-1, label, label, Status.BUDGET_EXHAUSTED) for label in y.tolist()]
    active = torch.arange(n_rows, device=x.device)
    ids = ids.to(x.device)  # indexed by ``active`` each step, with no transfer
    ref_grads = reference_grad.expand(n_rows, -1).clone() if mode != "shared" else None
    next_refresh = 0 if mode == "exact" else 1
    # The refreshes under autocast
    low = resolved(settings, x.device).precision in ("bf16", "mixed")
    n_zeroed = step = 0
    while active.numel():
        mask = (~zeroed[active]).float()
        ctx = ScoreContext(model, masks, x[active], y[active], mask, settings, ids[active], step)
        # Score before checking for flips: the default scorer's forward also gives predictions.
        scored = scorer(ctx) if n_zeroed < budget else None
        logits = scored.logits if scored is not None else None
        pred = logits.argmax(1) if logits is not None else predict_masked(masks, model, ctx.x, mask)
        flipped = pred != ctx.y
        done = flipped | (n_zeroed >= budget)
        for i, p, f in zip(
            active[done].tolist(), pred[done].tolist(), flipped[done].tolist(), strict=True
        ):
            found[i].status = Status.FLIPPED if f else Status.BUDGET_EXHAUSTED
            found[i].predicted_after, found[i].steps = p, step
            found[i].greedy = order[i, :n_zeroed].tolist()
        if scored is None or bool(done.all()):
            break
        active, mask, scores = active[~done], mask[~done], scored.scores[~done]
        if scored.with_reference:
            # Refreshed after the flip check: an example that flips here needs no new term.
            if ref_grads is not None and reference is not None and n_zeroed >= next_refresh:
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low):
                    ref_grads[active] = exact_reference_grad(model, masks, mask, reference)
                next_refresh = n_zeroed + 1 if mode == "exact" else 2 * n_zeroed
            ref_grad = ref_grads[active] if ref_grads is not None else reference_grad
            scores = scores + settings.reference_weight * ref_grad
        scores = scores.masked_fill(zeroed[active], float("-inf"))
        k = min(settings.units_per_step, budget - n_zeroed)
        top = scores.topk(k, dim=1).indices
        zeroed[active.unsqueeze(1), top] = True
        order[active, n_zeroed : n_zeroed + k] = top
        n_zeroed, step = n_zeroed + k, step + 1
    return found


def _zeroing_masks(units: torch.Tensor, keep: torch.Tensor, total: int) -> torch.Tensor:
    """Masks ``[E, U]`` with the units ``units[e, l]`` zeroed where ``keep[e, l]``."""
    cols = torch.where(keep, units, total)  # a dropped or padded place zeroes a spare column
    masks = torch.ones(len(units), total + 1, device=units.device)
    return masks.scatter_(1, cols, 0.0)[:, :total]


def prune(
    model: Classifier, masks: UnitMasks, x: torch.Tensor, y: torch.Tensor, found: list[Found]
) -> None:
    """Drop every greedy unit the flip does not need: one removal tried per unit, in greedy
    order, for all flipped examples at once (one forward per position)."""
    flipped = [i for i, f in enumerate(found) if f.status is Status.FLIPPED]
    if not flipped:
        return
    total, dev = masks.space.total, x.device
    lengths = torch.tensor([len(found[i].greedy) for i in flipped], device=dev)
    width = int(lengths.max())
    units = torch.full((len(flipped), width), total, dtype=torch.long, device=dev)
    for r, i in enumerate(flipped):  # Python lists to one padded tensor
        units[r, : len(found[i].greedy)] = torch.tensor(found[i].greedy, device=dev)
    keep = torch.arange(width, device=dev) < lengths.unsqueeze(1)
    rows = torch.tensor(flipped, device=dev)
    for j in range(width):
        trial = keep[:, j] & (keep.sum(1) > 1)
        if not bool(trial.any()):
            continue
        tried = trial.nonzero().flatten()
        without = keep[tried].clone()
        without[:, j] = False
        pred = predict_masked(
            masks, model, x[rows[tried]], _zeroing_masks(units[tried], without, total)
        )
        keep[tried, j] = pred == y[rows[tried]]  # still flipped without it: drop it
    after = predict_masked(masks, model, x[rows], _zeroing_masks(units, keep, total))
    for i, kept, p in zip(flipped, keep.tolist(), after.tolist(), strict=True):
        found[i].minimal = [u for u, k in zip(found[i].greedy, kept, strict=False) if k]
        found[i].predicted_after = p


# A bfloat16 prediction stands only when its top two logits are more than 2 x CHECK_FACTOR x
# the unedited model's largest bfloat16 logit error on the same rows apart (the edited models'
# errors on the testbed were at most 1.3x the unedited one's); closer calls are redone in float32.
CHECK_FACTOR = 4.0


@torch.no_grad()
def edited_accuracy(
    model: Classifier,
    masks: UnitMasks,
    unit_sets: list[list[int]],
    data: ImageDataset,
    rows: torch.Tensor,
    *,
    device: torch.device,
    checked_bf16: bool = False,
) -> torch.Tensor:
    """Accuracy on ``rows`` of each edited model (one unit set each), batched: ``[E]``. Equal
    sets are evaluated once (200 memorized testbed ids had 172 distinct minimal sets).

    ``checked_bf16``: the forwards in bfloat16, and every prediction within reach of bfloat16's
    error (:data:`CHECK_FACTOR`) redone in float32, so the accuracies are float32's."""
    if not unit_sets or rows.numel() == 0:
        return torch.full((len(unit_sets),), float("nan"))
    sizes = torch.tensor([len(u) for u in unit_sets])
    set_masks = torch.ones(len(unit_sets), masks.space.total, device=device)
    which = torch.arange(len(unit_sets)).repeat_interleave(sizes).to(device)
    flat = torch.tensor([u for s in unit_sets for u in s], dtype=torch.long).to(device)
    set_masks[which, flat] = 0
    distinct, inverse = torch.unique(set_masks, dim=0, return_inverse=True)
    correct = torch.zeros(len(distinct), device=device)
    per_pass = rows_per_pass(device)
    for chunk in rows.split(per_pass):  # every (edit, row) pair once, in full passes
        x, y = data.batch(chunk, device), data.labels[chunk].to(device)
        tol = _bf16_tolerance(model, masks, x) if checked_bf16 else None
        for pairs in torch.arange(len(distinct) * len(chunk), device=device).split(per_pass):
            edit, row = pairs // len(chunk), pairs % len(chunk)
            right = _correct(model, masks, x[row], y[row], distinct[edit], tol)
            correct.index_add_(0, edit, right.float())
    return (correct[inverse] / rows.numel()).cpu()


def _correct(
    model: Classifier,
    masks: UnitMasks,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    tol: float | None,
) -> torch.Tensor:
    """Whether each row of ``x``, under its own mask row, is classified as ``y``: in float32,
    or (``tol``) in bfloat16 with every row whose top two logits are within ``tol`` redone in
    float32."""
    if tol is None:
        with masks.applied(mask):
            return model(x).argmax(1) == y
    with masks.applied(mask), torch.autocast(x.device.type, dtype=torch.bfloat16):
        logits = model(x).float()
    top = logits.topk(2, dim=1).values
    right = logits.argmax(1) == y
    close = (top[:, 0] - top[:, 1] <= tol).nonzero().flatten()  # one sync per pass
    if close.numel():
        with masks.applied(mask[close]), torch.autocast(x.device.type, enabled=False):
            right[close] = model(x[close]).argmax(1) == y[close]
    return right


def _bf16_tolerance(model: Classifier, masks: UnitMasks, x: torch.Tensor) -> float:
    """:data:`CHECK_FACTOR` times the largest bfloat16 logit error of the unedited model on
    ``x``, doubled (an error in each of two logits moves their gap by up to twice as much)."""
    ones = torch.ones(len(x), masks.space.total, device=x.device)
    with masks.applied(ones), torch.autocast(x.device.type, enabled=False):
        exact = model(x).float()
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            low = model(x).float()
    return 2 * CHECK_FACTOR * float((low - exact).abs().max())


def search_chunk(
    model: Classifier,
    masks: UnitMasks,
    data: ImageDataset,
    rows: torch.Tensor,
    *,
    settings: ScanSettings,
    reference_grad: torch.Tensor,
    device: torch.device,
    reference: Reference | None = None,
    stages: Stages | None = None,
) -> list[Found]:
    """Search one chunk of flagged rows; misclassified rows are reported, not searched. Random
    draws are keyed on each row's example id (:meth:`ImageDataset.ids_of`); ``stages`` times
    the search and the pruning."""
    timed = stages or Stages(device)
    with timed("search"):
        x, y = data.batch(rows, device), data.labels[rows].to(device)
        ones = torch.ones(len(rows), masks.space.total, device=device)
        pred = predict_masked(masks, model, x, ones)
        labels, preds = y.tolist(), pred.tolist()  # one transfer for the bookkeeping
        found: list[Found] = [
            Found(r, label, p, Status.MISCLASSIFIED, predicted_after=p)
            for r, label, p in zip(rows.tolist(), labels, preds, strict=True)
        ]
        idx = [i for i, (label, p) in enumerate(zip(labels, preds, strict=True)) if label == p]
        if not idx:
            return found
        at = torch.tensor(idx, device=device)
        searched = greedy_search(
            model,
            masks,
            x[at],
            y[at],
            settings=settings,
            reference_grad=reference_grad,
            ids=torch.tensor(data.ids_of(rows[idx])),
            reference=reference,
        )
    with timed("prune"):
        if settings.prune:
            prune(model, masks, x[at], y[at], searched)
        else:
            for f in searched:
                f.minimal = list(f.greedy)
    for i, f in zip(idx, searched, strict=True):
        f.row, f.predicted_before = found[i].row, preds[i]
        found[i] = f
    return found
