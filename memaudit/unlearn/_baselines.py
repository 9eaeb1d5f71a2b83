"""The unlearning literature's baselines: NegGrad+, SalUn, localize-then-reset and SSD.

Each is registered like the methods of ``_methods`` and takes the same :class:`UnlearnJob`.
Their defaults follow the papers where the papers give one, were chosen once (no tuning per
forget kind), and are stated in each docstring; every one is an ``UnlearnMethod.options``
entry or the method's ``epochs`` / ``lr_scale``, so a user can override it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from memaudit.data import ImageDataset
from memaudit.engine import EpochEnd, Mixed, pick_device
from memaudit.errors import MemauditError
from memaudit.localize import flip_units
from memaudit.models import Classifier
from memaudit.units import reset_unit_weights
from memaudit.unlearn._methods import (
    Option,
    UnlearnJob,
    UnlearnMethod,
    _fit,
    cycled,
    fresh_copy,
    number,
    register_method,
    within,
)


def _neggrad_plus(job: UnlearnJob) -> Classifier:
    """NegGrad+ (Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023).

    Each step descends ``beta * CE(retain batch) - (1 - beta) * CE(forget batch)``: one pass
    over the retained rows per epoch, the flagged rows cycled alongside in batches of the same
    size (each pass in a new order drawn from the seed). Both batches go through one forward,
    so BatchNorm normalizes them together and its running statistics see both. Defaults:
    ``beta=0.9``, 5 epochs at the fine-tuning rate, as ``finetune``. The paper tunes beta per
    setting; 0.999 was tried first, once, on the testbed's 400 mislabeled ids with seed 7 (a
    seed the benchmark does not report): 100% flagged accuracy after, as ``finetune`` (rows fit
    at near-zero loss give the forget term almost no gradient at that weight). The one
    adjustment, 0.9, on the same run: 0.0% flagged, 99.2% retained, 97.3% test (retrained:
    0.2 / 100 / 98.6), but a membership AUC of 0.000: the flagged ids end up fit worse than
    a model that never saw them.
    """
    beta = float(job.options["beta"])
    size = min(job.batch_size, len(job.flagged))
    forget = cycled(job.flagged, size, torch.Generator().manual_seed(job.seed))

    def mix(batch: torch.Tensor) -> Mixed:
        f = next(forget)
        weights = torch.cat(
            [
                torch.full((len(batch),), beta / len(batch)),
                torch.full((len(f),), -(1 - beta) / len(f)),
            ]
        )
        return Mixed(ids=torch.cat([batch, f]), weights=weights)

    return _fit(job, job.model, job.retained, mix=mix)


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _gradient_sums(
    model: Classifier,
    data: ImageDataset,
    rows: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    square: bool,
) -> tuple[list[torch.Tensor], int, float]:
    """Per parameter, the sum over batches of ``rows`` of the gradient of the batch's mean
    cross-entropy (``square``: of its square); the number of batches and the mean loss.

    The model is in eval mode: BatchNorm uses (and keeps) its running statistics."""
    params = _params(model)
    model.to(device).eval()
    sums = [torch.zeros_like(p) for p in params]
    labels = data.labels.to(device)
    n, total = 0, 0.0
    for batch in rows.split(batch_size):
        loss = F.cross_entropy(model(data.batch(batch, device)), labels[batch.to(device)])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for acc, g in zip(sums, grads, strict=True):
                if g is not None:
                    acc.add_(g.square() if square else g)
        n, total = n + 1, total + float(loss.detach()) * len(batch)
    return sums, n, total / max(1, len(rows))


def _wrong_labels(labels: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """A label drawn uniformly among the ``k - 1`` classes other than each given one."""
    return (labels + torch.randint(1, k, labels.shape, generator=gen)) % k


def _saliency_mask(saliency: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """True for the weights whose saliency is at or above the ``sparsity`` quantile of all,
    and above 0: a weight the flagged rows' loss does not touch is not salient, even where more
    than that share of them has none (e.g. the taps of a 3x3 convolution on a 1x1 input)."""
    flat = torch.cat([s.flatten() for s in saliency])
    k = max(1, math.ceil(sparsity * flat.numel()))
    threshold = flat.kthvalue(k).values
    return [(s >= threshold) & (s > 0) for s in saliency]


def _salun(job: UnlearnJob) -> Classifier:
    """SalUn (Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight
    Saliency", ICLR 2024), with random labelling, the paper's classification recipe.

    Saliency of a weight: the absolute value of the gradient of the flagged rows'
    cross-entropy (model in eval mode), summed over the flagged rows; the mask keeps the
    weights at or above the ``sparsity`` quantile of all weights' saliencies (``0.5``, the
    median: the authors' default), leaving out any of saliency 0. Then the model trains on
    every row, the flagged ones with a random wrong label (uniform over the other classes,
    drawn from the seed) and the retained ones with their own, and only the masked weights
    move: the others' gradients are zeroed before the optimizer sees them, and weight decay is
    off (it would move them). Defaults as
    the authors' (10 epochs; their rate is 0.13x their training rate, constant; here the
    family's schedule peaks at 0.26x the fine-tuning rate, whose one-cycle mean is about half
    its peak). Checked once on the testbed's 400 mislabeled ids with seed 7 (not reported by
    the benchmark): 0.5% flagged, 100% retained, 93.8% test (retrained: 0.2 / 100 / 98.6).
    """
    sparsity = float(job.options["sparsity"])
    model, dev = job.model, pick_device(job.device)
    grads, _, _ = _gradient_sums(
        model, job.train, job.flagged, batch_size=job.batch_size, device=dev, square=False
    )
    masks = _saliency_mask([g.abs() for g in grads], sparsity)
    k = max(model.info.num_classes, int(job.train.labels.max()) + 1)
    labels = job.train.labels.clone()
    gen = torch.Generator().manual_seed(job.seed)
    labels[job.flagged] = _wrong_labels(labels[job.flagged], k, gen)
    relabeled = dataclasses.replace(job.train, labels=labels)
    handles = [p.register_hook(_masked(m)) for p, m in zip(_params(model), masks, strict=True)]
    try:
        fit_job = dataclasses.replace(job, train=relabeled)
        _fit(fit_job, model, torch.arange(len(job.train)), weight_decay=0.0)
    finally:
        for handle in handles:
            handle.remove()
    return model.eval()


def _masked(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda grad: grad * mask.to(grad.device, grad.dtype)


def _localize_reset(job: UnlearnJob) -> Classifier:
    """Localize, then reset, then fine-tune: the approach of DEL (Torkzadehmahani et al.,
    TMLR 2025) with memaudit's own localization.

    The scan (:func:`memaudit.localize.flip_units`, as ``zero-units``) finds, for each flagged
    row, the units whose removal flips it; the union of them is reset to freshly initialized
    values (a new copy of the architecture drawn with the job's seed: the weights and bias
    ``zero-units`` would zero), and the model is fine-tuned on the retained rows. Defaults:
    the scan's defaults, then 5 epochs at the fine-tuning rate, as ``finetune`` (so the two
    differ by the reset alone). Checked once on the testbed's 400 mislabeled ids with seed 7
    (not reported by the benchmark): 0.2% flagged, 100% retained, 97.5% test (retrained: 0.2 /
    100 / 98.6; ``finetune`` keeps 99.9% flagged on the reported seeds).
    """
    model = job.model
    per_row = flip_units(model, job.train, job.flagged, device=job.device)
    flat = sorted({int(u) for units in per_row for u in units})
    if flat:
        fresh = fresh_copy(model, seed=job.seed)
        reset_unit_weights(model.net, model.units(), flat, fresh.net)
    return _fit(job, model, job.retained)


def _ssd(job: UnlearnJob) -> Classifier:
    """Selective Synaptic Dampening (Foster et al., "Fast Machine Unlearning Without
    Retraining Through Selective Synaptic Dampening", AAAI 2024). No training.

    Importance of each parameter: the diagonal Fisher information, as the authors compute it,
    the mean over batches of the squared gradient of the batch's cross-entropy (model in eval
    mode), over all training rows (``I_D``) and over the flagged rows (``I_f``). Where
    ``I_f > alpha * I_D`` a parameter is multiplied by ``min(lambda * I_D / I_f, 1)``; the
    others are left exactly as they were. Progress: one call of ``on_epoch`` per importance
    pass (2). Defaults: ``alpha=100``, ``lambda=1``. The authors' ``alpha=10`` was tried
    first, once, on the testbed's 400 mislabeled ids (10% of the rows) with seed 7 (a seed
    the benchmark does not report): it dampened 63% of the weights and left the model at
    chance (10.0% flagged, 10.4% retained, 8.4% test). A forget set that is a tenth of the
    data puts ``I_f / I_D`` near 10 for any weight the retained rows, fit at near-zero loss,
    hardly use (the median there was about 15 in every layer), so ``alpha=10`` selects most
    of the network. The one adjustment, ``alpha=100``, on the same run: 56.7% flagged, 97.1%
    retained, 89.8% test (retrained: 0.2 / 100 / 98.6); not tuned further.
    """
    alpha, lam = float(job.options["alpha"]), float(job.options["lambda"])
    model, dev = job.model, pick_device(job.device)
    importance = []
    for k, rows in enumerate((torch.arange(len(job.train)), job.flagged), start=1):
        sums, n, loss = _gradient_sums(
            model, job.train, rows, batch_size=job.batch_size, device=dev, square=True
        )
        importance.append([s / max(1, n) for s in sums])
        if job.on_epoch is not None:
            job.on_epoch(EpochEnd(k, 2, loss, model))
    with torch.no_grad():
        for p, i_d, i_f in zip(_params(model), *importance, strict=True):
            selected = i_f > alpha * i_d
            factor = (lam * i_d / i_f).clamp(max=1)
            p.mul_(torch.where(selected, factor, torch.ones_like(factor)))
    return model.eval()


def _check_ssd(options: Mapping[str, Option], epochs: int) -> None:
    alpha, lam = number(options, "alpha"), number(options, "lambda")
    if alpha <= 0 or lam <= 0:
        raise MemauditError(f"options alpha and lambda must be > 0, got {alpha:g} and {lam:g}")


register_method(
    "neggrad+",
    UnlearnMethod(
        _neggrad_plus,
        epochs=5,
        lr_scale=1.0,
        description="descend beta * retained loss - (1 - beta) * flagged loss (Kurmanji 2023)",
        options={"beta": 0.9},
        check=lambda options, epochs: within(options, "beta", 0, 1),
    ),
)
register_method(
    "salun",
    UnlearnMethod(
        _salun,
        epochs=10,
        lr_scale=0.26,
        description="random labels on flagged, only the salient half of the weights (Fan 2024)",
        options={"sparsity": 0.5},
        check=lambda options, epochs: within(options, "sparsity", 0, 1, low_in=True),
    ),
)
register_method(
    "localize-reset",
    UnlearnMethod(
        _localize_reset,
        epochs=5,
        lr_scale=1.0,
        description="reset the units scan localizes to fresh init, fine-tune on retained (DEL)",
    ),
)
register_method(
    "ssd",
    UnlearnMethod(
        _ssd,
        epochs=0,
        lr_scale=1.0,
        description="dampen weights far more important to flagged than to all (Foster 2024)",
        options={"alpha": 100.0, "lambda": 1.0},
        check=_check_ssd,
    ),
)
