"""memaudit's own small architectures (``memaudit:NAME``), used by the testbed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, *, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(channels, channels)
        self.conv2 = _conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class ResNet9(nn.Module):
    """The paper's ResNet-9 (prep, 3 stages, two residual blocks), with a width knob.

    ``width=64`` is the paper's size; the default 16 trains on MNIST in minutes on a CPU.
    """

    def __init__(self, *, num_classes: int = 10, in_chans: int = 3, width: int = 16) -> None:
        super().__init__()
        self.config = {"width": width}
        w = width
        self.prep = _conv_bn(in_chans, w)
        self.layer1 = nn.Sequential(_conv_bn(w, 2 * w, pool=True), _Residual(2 * w))
        self.layer2 = _conv_bn(2 * w, 4 * w, pool=True)
        self.layer3 = nn.Sequential(_conv_bn(4 * w, 8 * w, pool=True), _Residual(8 * w))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)
        # Stage outputs, in timm's convention (where example-tied dropout goes by default).
        self.feature_info = [
            {"module": name, "num_chs": chs, "reduction": red}
            for name, chs, red in (
                ("prep", w, 1),
                ("layer1", 2 * w, 2),
                ("layer2", 4 * w, 4),
                ("layer3", 8 * w, 8),
            )
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


NETS: dict[str, Callable[..., nn.Module]] = {"resnet9": ResNet9}
