"""A small VGG-style CNN with BatchNorm for 28x28 (or any small) images: the CPU default."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import ImageClassifier


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(ImageClassifier):
    """conv(c1)x2 -> pool -> conv(c2)x2 -> pool -> global avg -> fc(hidden)+BN+ReLU = h -> fc(classes).

    Named layers: block1.{0,1}, block2.{0,1} (each conv/bn/relu as .0/.1/.2), fc, fc_bn.
    Global average pooling keeps it size-agnostic (28x28 grey and 32x32 RGB both work).
    """

    def __init__(self, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float],
                 widths: tuple[int, int] = (16, 32), hidden: int = 64) -> None:
        super().__init__(mean, std)
        c1, c2 = widths
        self.block1 = nn.Sequential(_conv_bn(in_channels, c1), _conv_bn(c1, c1), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(_conv_bn(c1, c2), _conv_bn(c2, c2), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, hidden, bias=False)
        self.fc_bn = nn.BatchNorm1d(hidden)
        self.relu = nn.ReLU()
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, num_classes)

    def feature_layers(self) -> list[str]:
        """The BN of both convs of the last conv block and fc_bn (whose ReLU output is h)."""
        convs = [i for i, m in enumerate(self.block2) if isinstance(m, nn.Sequential)]
        return [f"block2.{i}.1" for i in convs] + ["fc_bn"]

    def features(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(x))          # (B, c2, H/4, W/4)
        x = self.pool(x).flatten(1)              # (B, c2)
        return self.relu(self.fc_bn(self.fc(x)))  # (B, hidden)
