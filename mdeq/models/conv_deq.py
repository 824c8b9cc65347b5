"""The single-scale convolutional DEQ of the implicit-layers tutorial (Kolter, Duvenaud & Johnson)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mdeq.core.solution import DEQSolution
from mdeq.nn.cells import ConvResidualCell
from mdeq.nn.deq import DEQ


class ConvDEQClassifier(nn.Module):
    """conv3x3 + BN -> DEQ(ResNet-style cell with GroupNorm) -> BN -> 8x8 average pool -> linear.

    With 48 channels and inner width 64 on 32x32 RGB this is the tutorial's ~65K-parameter model.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 48,
        inner_channels: int = 64,
        num_classes: int = 10,
        image_size: int = 32,
        pool: int = 8,
        num_groups: int = 8,
        **deq_kwargs: Any,
    ) -> None:
        super().__init__()
        if image_size % pool:
            raise ValueError(f"image_size {image_size} must be divisible by the pooling size {pool}")
        self.in_channels, self.image_size = in_channels, image_size
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=True), nn.BatchNorm2d(channels))
        kwargs = {"solver": "anderson", "tol": 1e-2, "max_steps": 25, **deq_kwargs}
        self.deq = DEQ(ConvResidualCell(channels, inner_channels, num_groups=num_groups), **kwargs)
        self.norm = nn.BatchNorm2d(channels)
        self.pool = nn.AvgPool2d(pool, pool)
        self.classifier = nn.Linear(channels * (image_size // pool) ** 2, num_classes)

    def forward(self, x: Tensor, return_solution: bool = False, unroll: int | None = None) -> Tensor | tuple[Tensor, DEQSolution]:  # type: ignore[override]
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (batch, {self.in_channels}, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
            )
        z, solution = self.deq(self.stem(x), unroll=unroll)
        logits = self.classifier(self.pool(self.norm(z)).flatten(1))
        return (logits, solution) if return_solution else logits


def conv_deq_small(**overrides: Any) -> ConvDEQClassifier:
    """The tutorial's CIFAR-10 conv DEQ (~65K parameters)."""
    return ConvDEQClassifier(**overrides)


def conv_deq_small_gray(**overrides: Any) -> ConvDEQClassifier:
    """``conv_deq_small`` for 28x28 grayscale images (7x7 pooling to a 4x4 map)."""
    return ConvDEQClassifier(**{"in_channels": 1, "image_size": 28, "pool": 7, **overrides})
