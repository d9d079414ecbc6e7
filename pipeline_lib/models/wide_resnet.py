"""WideResNet-34-10 as in the TRADES / AR-AT / CURE code (pre-activation blocks).

Names follow that code: `block3.layer.0.relu1`, `block3.layer.4.relu2`, ... which
are the 10 inner layers AR-AT regularises on WRN-34-10 (plus the final pooling).
Each block owns separate `relu1` / `relu2` modules so forward hooks see them.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import ImageClassifier


class WideBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = cin == cout and stride == 1
        self.conv_shortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu1(self.bn1(x))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(o)
        out = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return out + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(ImageClassifier):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(mean, std)
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3]
        self.head = nn.Linear(widths[3], num_classes)

    def feature_layers(self) -> list[str]:
        """relu1/relu2 of every block of block3, then the final pooling (AR-AT's choice on WRN-34-10)."""
        return [f"block3.layer.{i}.relu{j}" for i in range(len(self.block3.layer)) for j in (1, 2)] + ["pool"]

    def features(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))  # (B, 64*widen, H/4, W/4)
        out = self.relu(self.bn1(out))
        return self.pool(out).flatten(1)                            # (B, 64*widen)


