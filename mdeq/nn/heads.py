"""Classification heads for multiscale equilibria."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck (expansion 4) with BatchNorm, as in the MDEQ head."""

    expansion = 4

    def __init__(self, cin: int, planes: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, affine=False)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, affine=False)
        self.conv3 = nn.Conv2d(planes, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, affine=False)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, bias=False), nn.BatchNorm2d(cout)) if cin != cout else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class MultiScaleClassificationHead(nn.Module):
    """Per-branch bottleneck, a stride-2 chain from the highest to the lowest resolution whose
    outputs are summed with each branch, a 1x1 conv to ``final_channels``, global average pool
    and a linear classifier.

    ``features(ys)`` is the map before pooling, ``classify(y, pre_logits)`` pools it and applies the
    classifier; ``num_classes=0`` has no classifier and ``global_pool=''`` no pooling."""

    def __init__(
        self,
        channels: list[int] | tuple[int, ...],
        head_channels: list[int] | tuple[int, ...],
        final_channels: int,
        num_classes: int,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if len(head_channels) != len(channels):
            raise ValueError(f"head_channels needs one entry per branch ({len(channels)}), got {len(head_channels)}")
        e = Bottleneck.expansion
        self.increase = nn.ModuleList(Bottleneck(c, h) for c, h in zip(channels, head_channels))
        self.downsample = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(head_channels[i] * e, head_channels[i + 1] * e, kernel_size=3, stride=2, padding=1),
                nn.BatchNorm2d(head_channels[i + 1] * e),
                nn.ReLU(),
            )
            for i in range(len(channels) - 1)
        )
        self.final = nn.Sequential(nn.Conv2d(head_channels[-1] * e, final_channels, kernel_size=1), nn.BatchNorm2d(final_channels), nn.ReLU())
        self.final_channels = final_channels
        self.global_pool = global_pool
        self.classifier: nn.Module = nn.Linear(final_channels, num_classes) if num_classes > 0 else nn.Identity()

    def features(self, ys: tuple[Tensor, ...]) -> Tensor:
        """The fused map at the lowest resolution (``final_channels`` channels), before pooling."""
        y = self.increase[0](ys[0])
        for i, down in enumerate(self.downsample):
            y = self.increase[i + 1](ys[i + 1]) + down(y)
        return self.final(y)

    def classify(self, y: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the map (global average unless ``global_pool=''``) and, unless ``pre_logits``, classify."""
        if self.global_pool == "avg":
            y = y.mean(dim=(2, 3))
        return y if pre_logits else self.classifier(y)

    def forward(self, ys: tuple[Tensor, ...]) -> Tensor:
        return self.classify(self.features(ys))
