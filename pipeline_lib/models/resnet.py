"""ResNet-18 in its CIFAR form (3x3 stem, no max-pool), as in the TRADES / AR-AT / CURE code.

Module names follow the usual CIFAR implementation (`layer4.0.bn1`, `layer4.1.bn2`,
`shortcut.1`), which are the names AR-AT's official code hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import ImageClassifier


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(ImageClassifier):
    """CIFAR ResNet; `width` is the first stage's channels (64 in ResNet-18; stages w, 2w, 4w, 8w)."""

    def __init__(self, blocks: Sequence[int], num_classes: int, in_channels: int,
                 mean: Sequence[float], std: Sequence[float], width: int = 64) -> None:
        super().__init__(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        layers = []
        for i, (width, n) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), blocks, strict=True)):
            stride = 1 if i == 0 else 2
            seq = []
            for j in range(n):
                seq.append(BasicBlock(cin, width, stride if j == 0 else 1))
                cin = width
            layers.append(nn.Sequential(*seq))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)

    def feature_layers(self) -> list[str]:
        """Both BNs of every block of the last stage (AR-AT's choice on ResNet-18)."""
        return [f"layer4.{i}.bn{j}" for i in range(len(self.layer4)) for j in (1, 2)]

    def features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (B, 512, H/8, W/8)
        return self.pool(out).flatten(1)                                 # (B, 8 * width), 512 in ResNet-18
