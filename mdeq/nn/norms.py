"""Weight normalisation that survives pickling and deep copies (unlike torch's parametrizations,
which refuse to pickle and so break ``ddp_spawn`` and some EMA implementations)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WeightNormConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose kernel is w = g * v / ||v|| (norm per output channel), recomputed at
    every forward, so each f evaluation of a solve sees the same normalised weight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        w = self.weight.detach().clone()
        del self.weight
        self.weight_v = nn.Parameter(w)
        self.weight_g = nn.Parameter(w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        norm = self.weight_v.flatten(1).norm(dim=1).clamp_min(torch.finfo(self.weight_v.dtype).tiny)
        return self.weight_g * self.weight_v / norm.view(-1, 1, 1, 1)

    @torch.no_grad()
    def set_weight(self, w: Tensor) -> None:
        """Make the effective kernel equal ``w`` (v = w, g = ||w||)."""
        self.weight_v.copy_(w)
        self.weight_g.copy_(w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "WeightNormConv2d":
        """A weight-normalised copy of ``conv`` computing the same function."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        new.set_weight(conv.weight.detach())
        if conv.bias is not None:
            with torch.no_grad():
                new.bias.copy_(conv.bias)  # type: ignore[union-attr]
        return new
