"""Shared fixtures: tiny seeded models and data, all built locally (no downloads)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models are overhead-bound: a second thread gains nothing, and on a busy machine
# spinning OpenMP threads make a 2 ms forward take 0.7 s. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ.get("MEMAUDIT_TEST_THREADS", "1")))

HF_KINDS = ("vit", "resnet", "convnext")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow end-to-end tests run only when asked for (``-m slow``), keeping ``pytest`` fast."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with `pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _float32_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process scans resolve ``precision="auto"`` to float32 whatever the test CPU has, so
    the tests' answers do not depend on AMX; a test of bf16 asks for it by name."""
    monkeypatch.setattr("memaudit.localize._search.native_bf16", lambda device: False)


def tiny_cnn(in_chans: int = 1, num_classes: int = 3) -> nn.Sequential:
    """conv(4) -> relu -> conv(6) -> relu -> pool -> linear(5) -> relu -> linear head."""
    return nn.Sequential(
        nn.Conv2d(in_chans, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
        nn.ReLU(),
        nn.Linear(5, num_classes),
    )


def hf_config(kind: str, *, num_labels: int = 4, num_channels: int = 3) -> object:
    """A tiny random-init Hugging Face config (ViT, ResNet or ConvNeXt) with named labels."""
    from transformers import ConvNextConfig, ResNetConfig, ViTConfig

    labels = {i: f"class{i}" for i in range(num_labels)}
    common = {
        "num_labels": num_labels,
        "num_channels": num_channels,
        "id2label": labels,
        "label2id": {v: k for k, v in labels.items()},
    }
    if kind == "vit":
        return ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            **common,
        )
    if kind == "resnet":
        return ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **common
        )
    if kind == "convnext":
        return ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=16, **common
        )
    raise ValueError(kind)


def save_hf(
    kind: str, path: Path, *, processor: bool = False, seed: int = 0, **config: int
) -> Path:
    """Build a tiny HF image classifier from config and ``save_pretrained`` it to ``path``."""
    from transformers import AutoModelForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    net = AutoModelForImageClassification.from_config(hf_config(kind, **config))
    net.save_pretrained(path)
    if processor:
        ViTImageProcessor(
            size={"height": 12, "width": 12}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]
        ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One ``save_pretrained`` directory per tiny HF family (built once per session)."""
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_hf(kind, root / kind) for kind in HF_KINDS}


def random_images(n: int, *, channels: int = 3, size: int = 8, seed: int = 0) -> np.ndarray:
    """``n`` random uint8 images ``[n, size, size, channels]`` (``[n, size, size]`` for gray)."""
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def make_npz(tmp_path: Path) -> Callable[..., Path]:
    """Write an ``.npz`` of arrays given as keyword arguments; returns its path."""

    def make(name: str = "data.npz", **arrays: np.ndarray) -> Path:
        path = tmp_path / name
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return path

    return make


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch, width-4 testbed on the bundled MNIST subset (a few seconds on a CPU)."""
    from memaudit.testbed import TestbedConfig, build_testbed

    out = tmp_path_factory.mktemp("testbed")
    config = TestbedConfig(epochs=1, arch_config={"width": 4}, batch_size=256)
    build_testbed(out, config, device="cpu")
    return out
