"""DEQ-aware weight and spectral normalisation for the layers of a cell f.

Both are recomputed at every forward from their parameters, and both survive pickling and deep
copies (torch's parametrizations refuse to pickle, which breaks ``ddp_spawn`` and some EMA
implementations). Spectral normalisation is DEQ-aware: its power-iteration vector is updated
once per equilibrium solve (``begin_solve``, called by the DEQ layer), never between the f
evaluations of one solve, so f stays one fixed map while the solver looks for its fixed point.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TINY = 1e-12


class _WeightNorm:
    """w = g * v / ||v|| with the norm taken per output unit."""

    weight_v: nn.Parameter
    weight_g: nn.Parameter

    def _init_weight_norm(self) -> None:
        w = self.weight.detach().clone()  # type: ignore[attr-defined]
        del self.weight  # type: ignore[attr-defined]
        self.weight_v = nn.Parameter(w)
        self.weight_g = nn.Parameter(w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1))))

    @property
    def weight(self) -> Tensor:
        v = self.weight_v
        norm = v.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *([1] * (v.dim() - 1)))
        return self.weight_g * v / norm

    @torch.no_grad()
    def set_weight(self, w: Tensor) -> None:
        """Make the effective weight equal ``w`` (v = w, g = ||w||)."""
        self.weight_v.copy_(w)
        self.weight_g.copy_(w.flatten(1).norm(dim=1).view_as(self.weight_g))


class WeightNormConv2d(_WeightNorm, nn.Conv2d):
    """``nn.Conv2d`` with weight normalisation."""

    def __init__(self, *args, **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "WeightNormConv2d":
        """A weight-normalised copy of ``conv`` computing the same function."""
        new = cls(**_conv_args(conv))
        new.set_weight(_plain_weight(conv))
        _copy_bias(conv, new)
        return new


class WeightNormLinear(_WeightNorm, nn.Linear):
    """``nn.Linear`` with weight normalisation."""

    def __init__(self, *args, **kwargs) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "WeightNormLinear":
        new = cls(**_linear_args(lin))
        new.set_weight(_plain_weight(lin))
        _copy_bias(lin, new)
        return new


class _SpectralNorm:
    """w = w_orig / sigma, sigma the largest singular value of w_orig (as a matrix out x rest),
    estimated by power iteration with a vector ``u`` that is updated only in ``begin_solve``."""

    weight_orig: nn.Parameter
    u: Tensor

    def _init_spectral_norm(self, n_power_iterations: int) -> None:
        w = self.weight.detach().clone()  # type: ignore[attr-defined]
        del self.weight  # type: ignore[attr-defined]
        self.weight_orig = nn.Parameter(w)
        self.n_power_iterations = n_power_iterations
        g = torch.Generator().manual_seed(0)
        u = torch.randn(w.shape[0], generator=g, dtype=w.dtype).to(w.device)
        self.register_buffer("u", F.normalize(u, dim=0, eps=_TINY))  # type: ignore[attr-defined]
        self._power_iteration(30)

    @torch.no_grad()
    def _power_iteration(self, n: int) -> None:
        m = self.weight_orig.flatten(1)
        u = self.u
        for _ in range(n):
            v = F.normalize(m.t() @ u, dim=0, eps=_TINY)
            u = F.normalize(m @ v, dim=0, eps=_TINY)
        self.u.copy_(u)

    def begin_solve(self) -> None:
        """Called by the DEQ layer before each solve: refine sigma (training mode only)."""
        if self.training:  # type: ignore[attr-defined]
            self._power_iteration(self.n_power_iterations)

    def sigma(self) -> Tensor:
        m = self.weight_orig.flatten(1)
        with torch.no_grad():
            v = F.normalize(m.t() @ self.u, dim=0, eps=_TINY)
        return torch.dot(self.u, m @ v)

    @property
    def weight(self) -> Tensor:
        return self.weight_orig / self.sigma().clamp_min(_TINY)


class SpectralNormConv2d(_SpectralNorm, nn.Conv2d):
    """``nn.Conv2d`` whose kernel (as an out x in*k*k matrix) has spectral norm 1."""

    def __init__(self, *args, n_power_iterations: int = 1, **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_spectral_norm(n_power_iterations)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class SpectralNormLinear(_SpectralNorm, nn.Linear):
    """``nn.Linear`` whose weight has spectral norm 1 (so the layer is 1-Lipschitz)."""

    def __init__(self, *args, n_power_iterations: int = 1, **kwargs) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_spectral_norm(n_power_iterations)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


# ---- apply / remove ----------------------------------------------------------------------------------
def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(
        in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        padding_mode=conv.padding_mode, device=conv.bias.device if conv.bias is not None else None,
    )


def _linear_args(lin: nn.Linear) -> dict:
    return dict(in_features=lin.in_features, out_features=lin.out_features, bias=lin.bias is not None)


def _plain_weight(layer: nn.Module) -> Tensor:
    return layer.weight.detach().clone()


def _copy_bias(src: nn.Module, dst: nn.Module) -> None:
    if getattr(src, "bias", None) is not None:
        with torch.no_grad():
            dst.bias.copy_(src.bias)  # type: ignore[union-attr]


def _replace(module: nn.Module, convert, types: tuple[type, ...]) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if type(child) in types:
            setattr(module, name, convert(child))
            count += 1
        else:
            count += _replace(child, convert, types)
    return count


def apply_weight_norm(module: nn.Module) -> nn.Module:
    """Weight-normalise every plain ``nn.Linear`` and ``nn.Conv2d`` inside ``module`` (in place;
    the function computed is unchanged). Returns ``module``."""

    def convert(layer: nn.Module) -> nn.Module:
        new = WeightNormLinear.from_linear(layer) if isinstance(layer, nn.Linear) else WeightNormConv2d.from_conv(layer)
        return new.to(_plain_weight(layer).device, _plain_weight(layer).dtype)

    _replace(module, convert, (nn.Linear, nn.Conv2d))
    return module


def remove_weight_norm(module: nn.Module) -> nn.Module:
    """Back to plain layers computing the same function."""
    return _remove(module, (WeightNormLinear, WeightNormConv2d))


def apply_spectral_norm(module: nn.Module, n_power_iterations: int = 1) -> nn.Module:
    """Spectrally normalise every plain ``nn.Linear`` and ``nn.Conv2d`` inside ``module`` (in place).
    The weights are divided by their largest singular value, which bounds each layer's gain and
    so, for cells built from 1-Lipschitz activations and norms, the Jacobian of f."""

    def convert(layer: nn.Module) -> nn.Module:
        w = _plain_weight(layer)
        if isinstance(layer, nn.Linear):
            new: nn.Module = SpectralNormLinear(**_linear_args(layer), n_power_iterations=n_power_iterations)
        else:
            new = SpectralNormConv2d(**_conv_args(layer), n_power_iterations=n_power_iterations)
        new = new.to(w.device, w.dtype)
        with torch.no_grad():
            new.weight_orig.copy_(w)
        new._power_iteration(30)
        _copy_bias(layer, new)
        return new

    _replace(module, convert, (nn.Linear, nn.Conv2d))
    return module


def remove_spectral_norm(module: nn.Module) -> nn.Module:
    """Back to plain layers holding the current normalised weights."""
    return _remove(module, (SpectralNormLinear, SpectralNormConv2d))


def _remove(module: nn.Module, types: tuple[type, ...]) -> nn.Module:
    def convert(layer: nn.Module) -> nn.Module:
        w = layer.weight.detach().clone()
        if isinstance(layer, nn.Linear):
            new: nn.Module = nn.Linear(**_linear_args(layer))
        else:
            new = nn.Conv2d(**_conv_args(layer))
        new = new.to(w.device, w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
        _copy_bias(layer, new)
        return new

    _replace(module, convert, types)
    return module


def begin_solve(modules: Iterable[nn.Module]) -> None:
    """Call ``begin_solve()`` on every module that has one (spectral norm, variational dropout)."""
    for m in modules:
        hook = getattr(m, "begin_solve", None)
        if hook is not None and callable(hook):
            hook()
