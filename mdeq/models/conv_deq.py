"""The single-scale convolutional DEQ of the implicit-layers tutorial (Kolter, Duvenaud & Johnson)."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from mdeq.core.solution import DEQSolution
from mdeq.models.classifier_api import (
    check_head_options,
    check_output_fmt,
    default_pool,
    linear_or_identity,
    pick_intermediates,
    refuse_symbolic_tracing,
    select_levels,
)
from mdeq.nn.cells import ConvResidualCell
from mdeq.nn.deq import DEQ


class ConvDEQClassifier(nn.Module):
    """conv3x3 + BN -> DEQ(ResNet-style cell with GroupNorm) -> BN -> 8x8 average pool -> linear.

    With 48 channels and inner width 64 on 32x32 RGB this is the tutorial's ~65K-parameter model.

    Head and feature API (:mod:`mdeq.models.classifier_api`): ``forward_features`` is the
    normalised equilibrium ``(B, channels, H, W)``; its pooling is the tutorial's ``pool x pool``
    average (the classifier reads the flattened pooled map, ``head_hidden_size`` wide), so the input
    size is fixed. Feature levels: the stem output, the equilibrium, and the pooled map the
    classifier reads.
    """

    first_conv = "stem.0"
    classifier_name = "classifier"
    fixed_input_size = True

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 48,
        inner_channels: int = 64,
        num_classes: int = 10,
        image_size: int = 32,
        pool: int = 8,
        num_groups: int = 8,
        global_pool: str = "avg",
        **deq_kwargs: Any,
    ) -> None:
        super().__init__()
        if image_size % pool:
            raise ValueError(f"image_size {image_size} must be divisible by the pooling size {pool}")
        check_head_options(num_classes, global_pool, type(self).__name__)
        self.in_channels, self.image_size, self.channels, self.pool_window = in_channels, image_size, channels, pool
        self.num_classes, self.global_pool = num_classes, global_pool
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=True), nn.BatchNorm2d(channels))
        kwargs = {"solver": "anderson", "tol": 1e-2, "max_steps": 25, **deq_kwargs}
        self.deq = DEQ(ConvResidualCell(channels, inner_channels, num_groups=num_groups), **kwargs)
        self.norm = nn.BatchNorm2d(channels)
        self.pool = nn.AvgPool2d(pool, pool)
        self.classifier: nn.Module = linear_or_identity(self.head_hidden_size, num_classes)

    # ---- head API ----------------------------------------------------------------------------
    @property
    def in_chans(self) -> int:
        """Input channels (timm's name)."""
        return self.in_channels

    @property
    def num_features(self) -> int:
        return self.channels

    @property
    def head_hidden_size(self) -> int:
        return self.channels * (self.image_size // self.pool_window) ** 2

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        c = self.channels
        return [
            {"num_chs": c, "reduction": 1, "module": "stem"},
            {"num_chs": c, "reduction": 1, "module": "deq"},
            {"num_chs": c, "reduction": self.pool_window, "module": "pool"},
        ]

    def pool_size(self, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    def get_classifier(self) -> nn.Module:
        return self._classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none); ``global_pool`` 'avg' or '' (none)."""
        pool = default_pool(self.global_pool, num_classes) if global_pool is None else global_pool
        check_head_options(num_classes, pool, type(self).__name__)
        ref = self.stem[0].weight
        self.classifier = linear_or_identity(self.head_hidden_size, num_classes).to(device=ref.device, dtype=ref.dtype).train(self.training)
        self.num_classes, self.global_pool = num_classes, pool

    # ---- forward paths -----------------------------------------------------------------------
    def _classifier(self) -> nn.Module:
        if self.classifier is None:
            raise RuntimeError("this model's classifier was removed (features_only / prune_intermediate_layers); use forward_intermediates")
        return self.classifier

    def _solve(self, x: Tensor, unroll: int | None = None) -> tuple[Tensor, Tensor, DEQSolution]:
        refuse_symbolic_tracing(x)
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (batch, {self.in_channels}, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
            )
        stem = self.stem(x)
        z, solution = self.deq(stem, unroll=unroll)
        return stem, z, solution

    def forward_features(self, x: Tensor) -> Tensor:
        """The normalised equilibrium, ``(B, channels, image_size, image_size)``."""
        return self.norm(self._solve(x)[1])

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = self.pool(x).flatten(1)
        return x if pre_logits else self._classifier()(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_solution: bool = False,
    ) -> Any:
        """Feature levels (stem, equilibrium, pooled map) as in :class:`~mdeq.models.MDEQClassifier`."""
        check_output_fmt(output_fmt)
        stem, z, solution = self._solve(x)
        feats = self.norm(z)
        return pick_intermediates([stem, z, self.pool(feats)], lambda: feats, solution, indices, intermediates_only, return_solution)

    def prune_intermediate_layers(self, indices: int | Sequence[int] | None = None, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        if prune_head:
            self.classifier = None  # type: ignore[assignment]
        return select_levels(len(self.feature_info), indices)

    def forward(self, x: Tensor, return_solution: bool = False, unroll: int | None = None) -> Tensor | tuple[Tensor, DEQSolution]:  # type: ignore[override]
        _, z, solution = self._solve(x, unroll)
        logits = self.forward_head(self.norm(z))
        return (logits, solution) if return_solution else logits


def conv_deq_small(**overrides: Any) -> ConvDEQClassifier:
    """The tutorial's CIFAR-10 conv DEQ (~65K parameters)."""
    return ConvDEQClassifier(**overrides)


def conv_deq_small_gray(**overrides: Any) -> ConvDEQClassifier:
    """``conv_deq_small`` for 28x28 grayscale images (7x7 pooling to a 4x4 map)."""
    return ConvDEQClassifier(**{"in_channels": 1, "image_size": 28, "pool": 7, **overrides})
