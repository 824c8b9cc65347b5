"""Is the equilibrium a solver found one that iteration (and training) can hold on to?

Root finders (Anderson, Broyden, Newton-Krylov) also converge to fixed points that repel:
where df/dz at z* has an eigenvalue with real part >= 1, neither plain iteration z <- f(z) nor
the flow dz/dt = f(z) - z is attracted to z* (both run away from it), and gradients through such
a point train the model toward a wrong branch while every solve reports "converged". (Where
only the spectral radius is >= 1, e.g. an eigenvalue of -1.5, iteration oscillates away but the
flow is stable: the ``ode`` solver's home ground, reported on the record but not warned about.) :func:`equilibrium_stability` estimates the spectrum at z* from Jacobian-vector
products (batched Arnoldi: exact for states of at most ``k`` dimensions, the extremal eigenvalues
first otherwise); :func:`repelling_message` says what that means and what to change, in the
order the doctor (:func:`mdeq.diagnose`) ranks the fixes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mdeq.core.jacobian import jacobian_eigenvalues

Map = Callable[[Tensor], Tensor]


class StabilityWarning(UserWarning):
    """A DEQ converged to a repelling equilibrium (an eigenvalue of df/dz with real part >= 1)."""


@dataclass
class Stability:
    """The spectrum of df/dz at an equilibrium, per checked sample."""

    spectral_radius: Tensor
    """max |eigenvalue| of df/dz at z* (iteration is locally stable below 1), float64; NaN
    where f was not finite around z*."""
    rightmost_real: Tensor
    """max real part of the eigenvalues (the flow dz/dt = f(z) - z is locally stable below 1)."""
    samples: Tensor
    """Indices of the batch samples checked."""
    exact: bool
    """True when the Krylov space spans the whole state (the eigenvalues are exact)."""
    eigenvalues: Tensor
    """The Ritz values (complex, (checked samples, k))."""

    @property
    def repelling(self) -> Tensor:
        """Per checked sample: the equilibrium repels both plain iteration and the flow
        dz/dt = f(z) - z (an eigenvalue with real part >= 1)."""
        return self.rightmost_real >= 1.0

    @property
    def iteration_stable(self) -> Tensor:
        """Per checked sample: plain iteration is attracted locally (spectral radius < 1)."""
        return self.spectral_radius < 1.0

    @property
    def any_repelling(self) -> bool:
        """True when some checked sample sits at a repelling equilibrium (reads a device value)."""
        return bool(self.repelling.any())


def equilibrium_stability(f: Map, z_star: Tensor, *, k: int = 20, max_samples: int | None = None, seed: int = 0) -> Stability:
    """Spectrum of df/dz at the flat equilibrium ``z_star`` (batch, dim) from ``min(k, dim)``
    batched Jacobian-vector products (forward-mode AD, or finite differences where f has no
    forward rule). ``max_samples`` checks only the first samples of the batch (to bound cost)."""
    z = z_star.detach()
    b = z.shape[0]
    n = b if max_samples is None else min(b, max_samples)
    samples = torch.arange(n, device=z.device)
    zs = z[:n]
    if n == 0 or zs.shape[1] == 0:
        empty = torch.zeros(n, dtype=torch.float64, device=z.device)
        return Stability(empty, empty, samples, True, torch.zeros(n, 0, dtype=torch.complex128, device=z.device))
    if n < b:
        # f may not be separable by sample (batch norm): evaluate it on the whole batch and keep
        # the perturbation on the checked rows only
        def f_rows(v: Tensor) -> Tensor:
            return f(torch.cat([v, z[n:]], dim=0))[:n]
    else:
        f_rows = f
    ev = jacobian_eigenvalues(f_rows, zs, k=k, seed=seed).to(torch.complex128)
    # f non-finite near z* says nothing about stability (and is reported by the solve): NaN
    finite = torch.isfinite(ev.abs()).all(dim=1)
    nan = torch.full((n,), math.nan, dtype=torch.float64, device=z.device)
    rho = torch.where(finite, ev.abs().amax(dim=1), nan)
    right = torch.where(finite, ev.real.amax(dim=1), nan)
    return Stability(rho, right, samples, k >= zs.shape[1], ev)


def temper_scale(spectral_radius: float) -> float:
    """A power of ten that brings the spectral radius under 0.5 (the doctor's first fix)."""
    if not math.isfinite(spectral_radius) or spectral_radius <= 0:
        return 0.01
    return 10.0 ** math.floor(math.log10(0.5 / spectral_radius))


def best_damping(eigenvalues: Tensor) -> tuple[float, float]:
    """Damping d minimising the worst |d + (1 - d) lambda| over the eigenvalues: the local rate of
    damped iteration z <- d z + (1 - d) f(z). Returns (d, rate); d = 0 means no damping helps."""
    ev = eigenvalues[torch.isfinite(eigenvalues.abs())]
    if ev.numel() == 0:
        return 0.0, math.inf
    best = (0.0, float(ev.abs().max()))
    for d in [i / 20 for i in range(1, 20)]:
        rate = float((d + (1 - d) * ev).abs().max())
        if rate < best[1]:
            best = (d, rate)
    return best


def repelling_message(stability: Stability, *, solver: str, what: str = "DEQ") -> str:
    """The warning for a repelling equilibrium: the cause, then the fixes ranked as the doctor
    ranks them (temper f, Jacobian regularization, weight normalisation; damping and the ODE
    solver cannot help where an eigenvalue has real part >= 1). Reads device values: call it once,
    when needed."""
    rep = stability.repelling.detach().cpu()
    rho = stability.spectral_radius.detach().cpu()[rep]
    worst = float(rho.max()) if rho.numel() else math.nan
    right = float(stability.rightmost_real.detach().cpu()[rep].max()) if rho.numel() else math.nan
    scale = temper_scale(worst)
    fixes = [f"(1) temper f: Tempered(f, scale={scale:g}) (f * {scale:g}) brings the spectral radius to ~{worst * scale:.2g}; training recovers the output scale"]
    fixes.append(f"({len(fixes) + 1}) Jacobian regularization (jacobian_regularization='vjp', weighted in the loss) keeps the spectral radius below 1 as training proceeds")
    fixes.append(f"({len(fixes) + 1}) weight/spectral normalisation or a smaller initialisation of f")
    exact = "" if stability.exact else " (Arnoldi estimate)"
    return (
        f"{what}: the {solver} solver converged to a repelling equilibrium for {int(rep.sum())}/{rep.numel()} checked "
        f"sample(s): df/dz at z* has spectral radius {worst:.3g} and an eigenvalue with real part {right:.3g} >= 1{exact}. "
        "The residual is within tol, but neither plain iteration z <- f(z) nor the flow dz/dt = f(z) - z is attracted "
        "to this point, and gradients through it train the model toward a wrong branch (e.g. y = 2x learned as the "
        "wrong line). Fixes, most effective first: "
        + "; ".join(fixes)
        + ". mdeq.diagnose(model, batch) (or `mdeq doctor`) checks them on your batch."
    )


__all__ = ["Stability", "StabilityWarning", "best_damping", "equilibrium_stability", "repelling_message", "temper_scale"]
