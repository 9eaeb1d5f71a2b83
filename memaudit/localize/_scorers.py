"""Unit scorers: which unit to zero next, for every example of the active batch at once.

A scorer takes a :class:`ScoreContext` and returns :class:`Scores`: ``[A, U]`` (higher = zero
this unit first) and, when its forward ran at the current mask anyway, the logits there, so
the search checks for flips without another forward pass. A scorer of the objective scores its
target term ``-CE(x_i; m_i)``; the search adds the reference term (:mod:`memaudit.localize`)
to the examples that did not flip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memaudit import keyed
from memaudit.masks import UnitMasks
from memaudit.models import Classifier
from memaudit.schema import ScanSettings


def rows_per_pass(device: torch.device, *, backward: bool = False) -> int:
    """Rows per pass when many masked copies of a batch run at once. CPUs are fastest at a
    few hundred rows for a forward (2,000-row batches ran 1.7x slower per row on the 2-core
    test machine) and at fewer with a backward (channels-last, two threads: 128-row passes
    took 19% less time per row than 256-row ones); GPUs want large batches."""
    if device.type == "cuda":
        return 4096
    return 128 if backward else 256


@dataclass(frozen=True)
class ScoreContext:
    """What a scorer sees for one greedy step of the active batch."""

    model: Classifier
    masks: UnitMasks
    x: torch.Tensor  # [A, ...] inputs of the active examples
    y: torch.Tensor  # [A] their labels
    mask: torch.Tensor  # [A, U] current masks (1 = on, 0 = zeroed)
    settings: ScanSettings
    ids: torch.Tensor  # [A] the examples' ids: the keys of their random draws
    step: int  # the greedy step: each draws afresh

    def draw_seed(self) -> int:
        """The seed of this step's keyed draws (:mod:`memaudit.keyed`): the same for an example
        whichever batch or process it is searched in."""
        return keyed.subseed(self.settings.seed, self.step)


@dataclass(frozen=True)
class Scores:
    """A scorer's answer: ``scores`` ``[A, U]``; ``logits`` ``[A, K]`` at the current mask or
    ``None`` when its forward did not compute them; ``with_reference``: the search adds the
    reference term (``False``: a baseline ranked by ``scores`` alone)."""

    scores: torch.Tensor
    logits: torch.Tensor | None = None
    with_reference: bool = True


Scorer = Callable[[ScoreContext], Scores]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Register a scorer: ``scorer(ctx) -> Scores``; refuses to replace an existing one."""

    def add(fn: Scorer) -> Scorer:
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is already registered")
        SCORERS[name] = fn
        return fn

    return add


def target_objective(
    ctx: ScoreContext, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``-CE`` of each example under its mask row (averaged over noisy copies if asked): ``[A]``,
    and the logits under ``mask`` (``None`` with noisy copies)."""
    copies = ctx.settings.noise_copies
    x, y, rows = ctx.x, ctx.y, mask
    if copies:
        per_copy = x[0].numel()
        noise = keyed.normal(ctx.ids.to(x.device), copies * per_copy, seed=ctx.draw_seed())
        x = x.repeat_interleave(copies, 0)
        x = x + ctx.settings.noise_std * noise.view(x.shape)
        y, rows = y.repeat_interleave(copies), mask.repeat_interleave(copies, 0)
    with ctx.masks.applied(rows):
        logits = ctx.model(x).float()
    loss = F.cross_entropy(logits, y, reduction="none")
    return -loss.view(len(ctx.y), -1).mean(1), None if copies else logits.detach()


@register_scorer("grad-x-act")
def grad_x_act(ctx: ScoreContext) -> Scores:
    """The paper's first-order estimate: ``d(-CE)/dm``, i.e. gradient x activation per unit."""
    mask = ctx.mask.detach().clone().requires_grad_(True)
    objective, logits = target_objective(ctx, mask)
    (grad,) = torch.autograd.grad(objective.sum(), mask)
    return Scores(grad, logits)


@register_scorer("integrated-gradients")
def integrated_gradients(ctx: ScoreContext) -> Scores:
    """Captum's integrated gradients of the objective w.r.t. the mask, from all-off to current."""
    from captum.attr import IntegratedGradients

    def forward(mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sub = ScoreContext(**{**ctx.__dict__, "x": x, "y": y})
        return target_objective(sub, mask)[0]

    mask = ctx.mask.detach().clone()
    attr = IntegratedGradients(forward).attribute(
        mask,
        baselines=torch.zeros_like(mask),
        additional_forward_args=(ctx.x, ctx.y),
        n_steps=ctx.settings.ig_steps,
    )
    return Scores(attr.detach())


@register_scorer("random")
def random_scores(ctx: ScoreContext) -> Scores:
    """A baseline: zero random units."""
    draws = keyed.uniform(ctx.ids.to(ctx.mask.device), ctx.mask.shape[1], seed=ctx.draw_seed())
    return Scores(draws, with_reference=False)
