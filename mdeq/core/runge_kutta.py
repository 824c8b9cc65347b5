"""The one explicit Runge-Kutta core of mdeq: tableaus, a step, its error estimate and a starting
step size for dz/dt = f(z) - z.

Both continuous modes run on it: the ``ode`` solver (:mod:`mdeq.core.solvers.ode`, integrating to
the steady state with a step size per sample) and neural-ODE mode (:mod:`mdeq.core.neural_ode`,
integrating over a fixed span with one step size per batch, and its adjoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

Map = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method: ``rows[i]`` are the coefficients of stage i + 2, ``b`` the
    solution weights, ``btilde`` the error weights (b minus the embedded lower-order weights;
    None for a method without an error estimate). ``fsal``: the last stage point is the solution
    (first same as last), so its f-evaluation starts the next step."""

    rows: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    btilde: tuple[float, ...] | None
    fsal: bool
    order: int

    @property
    def adaptive(self) -> bool:
        return self.btilde is not None

    @property
    def weighted_stages(self) -> int:
        """Stages whose derivative enters the solution (FSAL's last stage has weight 0)."""
        return len(self.rows) if self.fsal else len(self.b)


_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_TSIT5_B = (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774, 0.0)

TABLEAUS: dict[str, Tableau] = {
    "dopri5": Tableau(
        rows=(
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            _DOPRI5_B[:6],
        ),
        b=_DOPRI5_B,
        btilde=(
            35 / 384 - 5179 / 57600,
            0.0,
            500 / 1113 - 7571 / 16695,
            125 / 192 - 393 / 640,
            -2187 / 6784 + 92097 / 339200,
            11 / 84 - 187 / 2100,
            -1 / 40,
        ),
        fsal=True,
        order=5,
    ),
    "tsit5": Tableau(
        rows=(
            (0.161,),
            (-0.008480655492356989, 0.335480655492357),
            (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
            (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
            (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383),
            _TSIT5_B[:6],
        ),
        b=_TSIT5_B,
        btilde=(
            -0.001780011052226,
            -0.000816434459657,
            0.007880878010262,
            -0.144711007173263,
            0.582357165452555,
            -0.458082105929187,
            1 / 66,
        ),
        fsal=True,
        order=5,
    ),
    "rk4": Tableau(rows=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b=(1 / 6, 1 / 3, 1 / 3, 1 / 6), btilde=None, fsal=False, order=4),
}
"""The methods by name: Dormand-Prince 5(4), Tsitouras 5(4) (adaptive, FSAL) and classic RK4 (fixed step)."""

ADAPTIVE_METHODS = tuple(name for name, t in TABLEAUS.items() if t.adaptive)


def combine(coeffs: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    """sum_i coeffs[i] * ks[i], skipping zero coefficients."""
    out: Tensor | None = None
    for c, k in zip(coeffs, ks):
        if c != 0.0:
            out = c * k if out is None else out + c * k
    assert out is not None, "a Runge-Kutta combination needs a nonzero coefficient"
    return out


def _column(h: float | Tensor) -> float | Tensor:
    """A step size usable against (batch, dim) states: a scalar, or a per-sample (batch,) tensor."""
    return h[:, None] if isinstance(h, Tensor) and h.dim() == 1 else h


def rk_step(tableau: Tableau, f: Map, z: Tensor, fz: Tensor, h: float | Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One explicit step of dz/dt = f(z) - z from ``z`` (with ``fz = f(z)``) of size ``h`` (a
    number, or one per sample). Returns ``(z_new, f(z_new), stages)``, ``stages`` the derivatives
    k_i (for :func:`error_estimate` and adjoints). Costs ``len(tableau.rows)`` f-evaluations plus
    one for a method without FSAL."""
    hc = _column(h)
    k = [fz - z]
    f_last = fz
    zi = z
    for row in tableau.rows:
        zi = z + hc * combine(row, k)
        f_last = f(zi)
        k.append(f_last - zi)
    if tableau.fsal:
        return zi, f_last, k  # the last stage point is the solution, its f-evaluation is f(z_new)
    z_new = z + hc * combine(tableau.b, k)
    return z_new, f(z_new), k


def error_estimate(tableau: Tableau, k: Sequence[Tensor], h: float | Tensor) -> Tensor:
    """The local error estimate h * sum(btilde_i k_i) of an adaptive step."""
    if tableau.btilde is None:
        raise ValueError("this Runge-Kutta method has no embedded error estimate")
    return _column(h) * combine(tableau.btilde, k)


def scaled_rms(x: Tensor, rtol: float, atol: float, *zs: Tensor, per_sample: bool = True) -> Tensor:
    """RMS of ``x / (atol + rtol * max|z|)`` over each sample's entries (``per_sample``) or over the
    whole batch: the error norm whose value 1 is the tolerance."""
    mag = zs[0].abs()
    for z in zs[1:]:
        mag = torch.maximum(mag, z.abs())
    ratio = (x / (atol + rtol * mag)).pow(2)
    return ratio.mean(dim=1).sqrt() if per_sample else ratio.mean().sqrt()


def initial_step(f: Map, z: Tensor, k1: Tensor, rtol: float, atol: float, per_sample: bool = True) -> Tensor:
    """Hairer, Norsett & Wanner's starting step size for dz/dt = f(z) - z at ``z`` (with
    ``k1 = f(z) - z``): one extra f-evaluation. One size per sample, or one for the batch.
    (Differentiable like any other step of a solver whose iterations are backpropagated.)"""
    d0, d1 = scaled_rms(z, rtol, atol, z, per_sample=per_sample), scaled_rms(k1, rtol, atol, z, per_sample=per_sample)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-30))
    z1 = z + _column(h0) * k1
    k2 = f(z1) - z1
    d2 = scaled_rms(k2 - k1, rtol, atol, z, per_sample=per_sample) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3), (0.01 / big.clamp_min(1e-30)) ** 0.2)
    return torch.minimum(100 * h0, h1)


__all__ = ["ADAPTIVE_METHODS", "TABLEAUS", "Tableau", "combine", "error_estimate", "initial_step", "rk_step", "scaled_rms"]
