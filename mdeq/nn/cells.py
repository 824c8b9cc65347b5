"""Standard DEQ cells f(z, x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + U x + b), the textbook single-layer DEQ cell.

    ``weight_scale`` rescales W at initialisation (values < 1 make the map contract).
    """

    def __init__(self, dim: int, in_dim: int | None = None, weight_scale: float = 1.0) -> None:
        super().__init__()
        self.linear_z = nn.Linear(dim, dim, bias=False)
        self.linear_x = nn.Linear(in_dim if in_dim is not None else dim, dim)
        with torch.no_grad():
            self.linear_z.weight.mul_(weight_scale)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.linear_z(z) + self.linear_x(x))


class ConvResidualCell(nn.Module):
    """The ResNet-style convolutional cell of the implicit-layers tutorial (Kolter, Duvenaud &
    Johnson): f(z, x) = GN(relu(z + GN(x + conv2(GN(relu(conv1(z))))))).

    ``channels`` is the state/injection width, ``inner_channels`` the hidden width; the
    convolution weights start at N(0, ``init_std``), which makes the map contract at init.
    """

    def __init__(
        self, channels: int = 48, inner_channels: int = 64, num_groups: int = 8, kernel_size: int = 3, init_std: float = 0.01
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(channels, inner_channels, kernel_size, padding=pad, bias=False)
        self.conv2 = nn.Conv2d(inner_channels, channels, kernel_size, padding=pad, bias=False)
        self.norm1 = nn.GroupNorm(num_groups, inner_channels)
        self.norm2 = nn.GroupNorm(num_groups, channels)
        self.norm3 = nn.GroupNorm(num_groups, channels)
        with torch.no_grad():
            self.conv1.weight.normal_(0.0, init_std)
            self.conv2.weight.normal_(0.0, init_std)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        y = self.norm1(F.relu(self.conv1(z)))
        return self.norm3(F.relu(z + self.norm2(x + self.conv2(y))))


class Tempered(nn.Module):
    """``scale * f(z, x)``: scales the Jacobian df/dz by ``scale`` (the forum's "f / 100" fix for
    a DEQ that does not converge at initialisation). The scale is a fixed number, not trained;
    training recovers the output scale through f's own weights."""

    def __init__(self, f: nn.Module, scale: float) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"Tempered needs a positive scale, got {scale}")
        self.f = f
        self.scale = float(scale)

    def forward(self, z, x):  # type: ignore[no-untyped-def]
        out = self.f(z, x)
        if isinstance(out, tuple):
            return tuple(self.scale * o for o in out)
        return self.scale * out

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class InputInjection(nn.Module):
    """f(z, x) = g(z + x) for a one-argument network g (input injection by addition). Unlike a
    lambda around g, the wrapper registers g as a submodule, so its parameters are the DEQ's
    (``deq.parameters()``, optimizers, ``.to(device)``, state dicts)."""

    def __init__(self, g: nn.Module) -> None:
        super().__init__()
        if not isinstance(g, nn.Module):
            raise TypeError(f"InputInjection wraps an nn.Module (its parameters become the DEQ's), got {type(g).__name__}")
        self.g = g

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.g(z + x)
