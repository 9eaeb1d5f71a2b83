"""The preflight check: before any audit work, is this the model the data trained, seen as it was?

A model shown its data in another way than in training (another image size, normalization,
channel count, label order) scores near chance on its own training rows, and every figure
after that is silently wrong. :func:`preflight` measures the model's accuracy on a sample of
non-flagged training rows (and of the test split), checks that weights and outputs are
finite, and refuses (:class:`~memaudit.errors.MemauditError`) a model at chance.

Unless given, the refusal threshold is a quarter of the way from chance to 100%:
``chance + (1 - chance) / 4``, where chance is the share of the most common label among the
measured rows (32.5% for ten balanced classes, 62.5% for two). A model above it but below
:data:`WEAK_TRAIN_ACCURACY` is audited with a warning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from memaudit.data import ImageDataset, complement, sample
from memaudit.errors import MemauditError
from memaudit.models import Classifier
from memaudit.schema._inputs import Preflight, Preprocessing

PREFLIGHT_ROWS = 256  # per split: enough to tell chance from a fitted model, cheap on a CPU
WEAK_TRAIN_ACCURACY = 0.9  # below this, the verdict says the model does not fit its data


def default_min_accuracy(chance: float) -> float:
    """The refusal threshold for a given chance level: a quarter of the way to 100%."""
    return chance + (1.0 - chance) / 4


def preflight(
    model: Classifier,
    train: ImageDataset,
    flagged_rows: Sequence[int] | torch.Tensor = (),
    *,
    test: ImageDataset | None = None,
    min_train_accuracy: float | None = None,
    rows: int = PREFLIGHT_ROWS,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Preflight:
    """Measure ``model`` on up to ``rows`` non-flagged training rows (and test rows); check it.

    Raises a one-line :class:`MemauditError` when weights or logits are not finite, when the
    logits do not have the model's class count, or when training accuracy is below
    ``min_train_accuracy`` (default :func:`default_min_accuracy`; ``0`` never refuses).
    """
    start = time.perf_counter()
    _check_finite_weights(model)
    gen = torch.Generator().manual_seed(seed)
    train_rows = sample(complement(len(train), flagged_rows), rows, gen)
    train_pred = _predictions(model, train, train_rows, device)
    test_rows = sample(torch.arange(len(test)), rows, gen) if test is not None else None
    test_pred = (
        _predictions(model, test, test_rows, device)
        if test is not None and test_rows is not None
        else None
    )
    labels = train.labels[train_rows]
    train_acc = _share(train_pred == labels)
    chance = float(labels.bincount().max()) / len(labels) if len(labels) else None
    threshold = (
        min_train_accuracy
        if min_train_accuracy is not None
        else (default_min_accuracy(chance) if chance is not None else 0.0)
    )
    test_acc = (
        _share(test_pred == test.labels[test_rows])
        if test is not None and test_pred is not None and test_rows is not None
        else None
    )
    found = Preflight(
        preprocessing=train.preprocessing,
        n_train=len(train_rows),
        train_accuracy=train_acc,
        n_test=len(test_rows) if test_rows is not None else 0,
        test_accuracy=test_acc,
        chance=chance,
        min_train_accuracy=threshold,
        warnings=_warnings(
            model, train, flagged_rows, train_acc, [train_pred, test_pred], len(train_rows)
        ),
        seconds=time.perf_counter() - start,
    )
    if train_acc is not None and train_acc < threshold:
        raise MemauditError(_refusal(found))
    return found


def _check_finite_weights(model: Classifier) -> None:
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    named = [*model.net.named_parameters(), *model.net.named_buffers()]
    bad = [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    raise MemauditError(
        f"{model.info.source}: {len(bad)} weight tensors hold NaN or infinite values (e.g. "
        f"{bad[0]!r}); the checkpoint is damaged or its training diverged: pass a sound one"
    )


@torch.inference_mode()
def _predictions(
    model: Classifier, data: ImageDataset, rows: torch.Tensor, device: str | torch.device
) -> torch.Tensor:
    """Predicted classes of ``rows``; refuses non-finite logits or the wrong class count."""
    model.to(device).eval()
    preds = []
    for batch in rows.split(128):
        logits = model(data.batch(batch, device))
        if logits.ndim != 2 or logits.shape[1] != model.info.num_classes:
            raise MemauditError(
                f"{model.info.source} returns logits of shape {list(logits.shape)}, but it "
                f"should have {model.info.num_classes} classes; check the architecture (--arch)"
            )
        if not bool(torch.isfinite(logits).all()):
            raise MemauditError(
                f"{model.info.source} returns NaN or infinite logits on {data.ref.source}; its "
                "weights or the inputs are broken (check --mean/--std: a std of 0 divides by 0)"
            )
        preds.append(logits.argmax(1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def _share(hits: torch.Tensor) -> float | None:
    return float(hits.float().mean()) if hits.numel() else None


def _warnings(
    model: Classifier,
    train: ImageDataset,
    flagged_rows: Sequence[int] | torch.Tensor,
    train_acc: float | None,
    predictions: list[torch.Tensor | None],
    n_rows: int,
) -> list[str]:
    found = []
    if train_acc is not None and train_acc < WEAK_TRAIN_ACCURACY:
        found.append(
            f"the model fits only {train_acc:.1%} of {n_rows} non-flagged training rows: an "
            "audit of memorization means little on a model that does not fit its training data"
        )
    flagged = torch.as_tensor(flagged_rows, dtype=torch.long)
    seen = torch.cat([p for p in predictions if p is not None])
    if flagged.numel() and seen.numel():
        predicted = torch.zeros(model.info.num_classes, dtype=torch.bool)
        predicted[seen] = True
        labels = train.labels[flagged]
        never = labels[~predicted[labels]]
        if never.numel():
            classes = ", ".join(str(int(c)) for c in never.unique()[:5])
            found.append(
                f"{never.numel()} flagged ids have given labels the model never predicts on "
                f"{seen.numel()} preflight rows (class {classes}): check the label order "
                "(--class-map)"
            )
    return found


def _refusal(found: Preflight) -> str:
    """The one-line refusal: what was measured, how the data was shown, and what to try."""
    pre: Preprocessing = found.preprocessing
    test = (
        f", test {found.test_accuracy:.1%} of {found.n_test}"
        if found.test_accuracy is not None
        else ""
    )
    h, w = pre.native_size
    size = (
        f"image size: the images were resized from {h}×{w} to "
        f"{pre.image_size[0]}×{pre.image_size[1]}; --image-size {h} keeps them as stored"
        if pre.resized
        else f"image size: the model sees the images as stored ({h}×{w}); --image-size N if it "
        "was trained at N×N"
    )
    chance = f"{found.chance:.1%}" if found.chance is not None else "n/a"
    return (
        f"preflight: the model predicts {found.train_accuracy or 0.0:.1%} of {found.n_train} "
        f"non-flagged training rows as labelled (chance {chance}, refused below "
        f"{found.min_train_accuracy:.1%}){test}: it is not the model this data trained, or it "
        f"is shown the data differently. Inputs: {pre.describe()}. Likely causes: {size}; "
        "normalization: --mean/--std; channel count: the data has "
        f"{pre.native_channels}, the model takes {pre.channels}; label order or class mapping: "
        "--class-map. To audit anyway: --min-train-accuracy 0"
    )
