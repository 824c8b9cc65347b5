"""Building blocks of the published MDEQ (Bai, Koltun & Kolter, 2020) cell.

Per-branch residual block, multiscale fusion (upsampling and downsampling paths), post-fuse
layer, variational dropout whose mask is fixed for a whole equilibrium solve, and weight
normalisation recomputed at every forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdeq.nn.norms import WeightNormConv2d


class VariationalDropout2d(nn.Module):
    """Dropout with one mask per sample, channel and pixel that stays fixed across the solver's
    iterations (and the backward), so the map f keeps one fixed point. The DEQ layer calls
    :meth:`begin_solve` before each solve; a new mask is drawn on the next call."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.mask: Tensor | None = None

    def reset_mask(self) -> None:
        self.mask = None

    def begin_solve(self) -> None:
        """A new equilibrium solve draws a new mask (called by the DEQ layer)."""
        self.reset_mask()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None or self.mask.shape != x.shape or self.mask.device != x.device:
            keep = 1.0 - self.p
            self.mask = torch.empty_like(x, requires_grad=False).bernoulli_(keep) / keep
        return x * self.mask


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


def maybe_weight_norm(conv: nn.Conv2d, enabled: bool) -> nn.Conv2d:
    """Weight normalisation (w = g v / ||v||, recomputed at each forward) when ``enabled``."""
    return WeightNormConv2d.from_conv(conv) if enabled else conv


class ResidualBlock(nn.Module):
    """The MDEQ per-branch block: conv3x3 C->E*C, GN, ReLU, conv3x3 E*C->C, (dropout), + injection,
    GN, + residual, ReLU, GN. Called as ``block(z)`` or ``block(z, x)`` (input injection).

    ``out_gain`` is the initial affine gain of the last GroupNorm (the paper uses 1).
    """

    def __init__(
        self,
        channels: int,
        expansion: int = 5,
        num_groups: int = 8,
        dropout: float = 0.0,
        weight_norm: bool = False,
        out_gain: float = 1.0,
    ) -> None:
        super().__init__()
        inner = expansion * channels
        self.conv1 = maybe_weight_norm(conv3x3(channels, inner), weight_norm)
        self.gn1 = nn.GroupNorm(num_groups, inner)
        self.conv2 = maybe_weight_norm(conv3x3(inner, channels), weight_norm)
        self.gn2 = nn.GroupNorm(num_groups, channels)
        self.gn3 = nn.GroupNorm(num_groups, channels)
        nn.init.constant_(self.gn3.weight, out_gain)
        self.drop = VariationalDropout2d(dropout)

    def forward(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        out = F.relu(self.gn1(self.conv1(z)))
        out = self.drop(self.conv2(out))
        if x is not None:
            out = out + x
        out = self.gn2(out) + z
        return self.gn3(F.relu(out))


class UpsampleFusion(nn.Module):
    """Lower resolution -> higher: 1x1 conv, GroupNorm, nearest upsampling by ``factor``."""

    def __init__(self, cin: int, cout: int, factor: int, num_groups: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=1, bias=False)
        self.norm = nn.GroupNorm(num_groups, cout)
        self.factor = factor

    def forward(self, y: Tensor) -> Tensor:
        return F.interpolate(self.norm(self.conv(y)), scale_factor=self.factor, mode="nearest")


class DownsampleFusion(nn.Module):
    """Higher resolution -> lower: ``steps`` stride-2 3x3 convs with GroupNorm (ReLU between)."""

    def __init__(self, cin: int, cout: int, steps: int, num_groups: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for k in range(steps):
            last = k == steps - 1
            width = cout if last else cin
            layers += [conv3x3(cin, width, stride=2), nn.GroupNorm(num_groups, width)]
            if not last:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, y: Tensor) -> Tensor:
        return self.net(y)


class PostFuse(nn.Module):
    """After summing the fused inputs of a branch: ReLU, 1x1 conv, GroupNorm (initial gain ``gain``)."""

    def __init__(self, channels: int, num_groups: int = 4, weight_norm: bool = False, gain: float = 1.0) -> None:
        super().__init__()
        self.conv = maybe_weight_norm(nn.Conv2d(channels, channels, kernel_size=1, bias=False), weight_norm)
        self.norm = nn.GroupNorm(num_groups, channels)
        nn.init.constant_(self.norm.weight, gain)

    def forward(self, y: Tensor) -> Tensor:
        return self.norm(self.conv(F.relu(y)))


def fusion_layer(channels: list[int] | tuple[int, ...], src: int, dst: int, num_groups: int) -> nn.Module | None:
    """The mapping layer carrying branch ``src`` to branch ``dst`` (branch 0 = highest resolution)."""
    if src == dst:
        return None
    if src > dst:
        return UpsampleFusion(channels[src], channels[dst], 2 ** (src - dst), num_groups)
    return DownsampleFusion(channels[src], channels[dst], dst - src, num_groups)
