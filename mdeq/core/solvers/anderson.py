"""Anderson acceleration (type II), batched with per-sample mixing coefficients."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mdeq.core.options import MAX_HISTORY, Rule, check_options, integer, real
from mdeq.core.solvers.base import Map, Solver, linear_algebra_dtype, select_rows
from mdeq.core.solvers.registry import register_solver


SAFE_OVER_RELAXATION = 2.0
"""The largest ``beta`` for which the plain mixing step contracts every eigencomponent with
eigenvalue in [0, 1) (see :class:`Anderson`); larger values warn."""


@register_solver
@dataclass
class Anderson(Solver):
    """Anderson acceleration with memory ``m``, mixing ``beta`` and relative ridge ``lam``.

    Each step solves, per sample, min ||sum_i a_i g_i|| subject to sum_i a_i = 1 over the last
    ``m`` residuals g_i = f(z_i) - z_i, then mixes z <- beta * sum a_i f(z_i) + (1 - beta) *
    sum a_i z_i. The small system is regularised by ``lam`` times its mean diagonal; where it is
    still singular or gives non-finite weights the sample falls back to a plain step.

    ``beta`` > 1 over-relaxes (the implicit-layers tutorial uses 2): it speeds up maps whose
    Jacobian has a non-negative spectrum, since the plain mixing step multiplies an eigencomponent
    by 1 - beta (1 - lambda), below 1 in size for every lambda in [0, 1) while beta <= 2. Above 2
    that factor exceeds 1 even for lambda = 0 (f constant in z), so such a beta warns.
    """

    name = "anderson"
    m: int = 5
    beta: float = 1.0
    lam: float = 1e-4

    option_rules: ClassVar[dict[str, Rule]] = {
        "m": integer(1, MAX_HISTORY), "beta": real(0.0, low_open=True), "lam": real(0.0),
    }

    def __post_init__(self) -> None:
        check_options("Anderson", self, self.option_rules)
        if self.beta > SAFE_OVER_RELAXATION:
            warnings.warn(
                f"Anderson beta={self.beta:g} > {SAFE_OVER_RELAXATION:g}: the over-relaxed mixing step multiplies each "
                f"eigencomponent of the error by 1 - beta (1 - lambda), which exceeds 1 in size for every eigenvalue "
                f"lambda < {1 - SAFE_OVER_RELAXATION / self.beta:.2g} of df/dz (even lambda = 0): the solve relies on the "
                "Anderson extrapolation alone and may diverge. 1 < beta <= 2 over-relaxes safely for maps with a "
                "non-negative spectrum; beta < 1 damps oscillating ones.",
                UserWarning,
                stacklevel=3,
            )

    def init_state(self, z0: Tensor) -> Any:
        # Without autograd the history lives in preallocated ring buffers written in place; under
        # autograd (unrolled backward) it is a list of tensors, so every step stays differentiable.
        if torch.is_grad_enabled():
            return {"x": [], "f": [], "k": 0}
        b, d = z0.shape
        return {  # only the first min(k, m) slots are ever read, so no need to zero them
            "X": z0.new_empty(b, self.m, d),
            "F": z0.new_empty(b, self.m, d),
            "G": z0.new_empty(b, self.m, d),
            "GG": z0.new_zeros(b, self.m, self.m),
            "k": 0,
        }

    @staticmethod
    def _residual_scale(state: Any, z: Tensor, fz: Tensor) -> Tensor:
        """Per-sample factor 1/max|f(z0) - z0| the residuals are stored with (b, 1): the mixing
        weights do not depend on it, but the Gram matrix of raw residuals at the scale 1e-23
        (or 1e23) would underflow (overflow) in float32."""
        if "scale" not in state:
            peak = (fz - z).detach().abs().amax(dim=1, keepdim=True)
            info = torch.finfo(z.dtype)
            scale = peak.reciprocal().clamp_max(info.max)
            state["scale"] = torch.where((peak > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
        return state["scale"]

    def _history(self, state: Any, z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append (z, f(z)); return X, F (b, n, d) and the Gram matrix G G^T (b, n, n) of the
        scaled residuals G = (F - X) * scale."""
        scale = self._residual_scale(state, z, fz)
        k = state["k"]
        state["k"] = k + 1
        n = min(k + 1, self.m)
        if "x" in state:
            xs, fs = state["x"], state["f"]
            xs.append(z)
            fs.append(fz)
            if len(xs) > self.m:
                del xs[0], fs[0]
            X, F = torch.stack(xs, dim=1), torch.stack(fs, dim=1)
            G = (F - X) * scale[:, :, None]
            return X, F, G @ G.transpose(1, 2)
        X, F, G, GG = state["X"], state["F"], state["G"], state["GG"]
        slot = k % self.m
        X[:, slot].copy_(z)
        F[:, slot].copy_(fz)
        G[:, slot].copy_(fz).sub_(z).mul_(scale)  # in place, no temporary (sub(out=<view>) does not compile)
        row = (G[:, :n] @ G[:, slot, :, None])[..., 0]  # only the new row/column of G G^T changes
        GG[:, slot, :n] = row
        GG[:, :n, slot] = row
        return X[:, :n], F[:, :n], GG[:, :n, :n]

    def step(self, state: Any, z: Tensor, fz: Tensor, f: Map, jvp: Map | None) -> Tensor:
        X, F, GG = self._history(state, z, fz)
        n = X.shape[1]
        plain = fz if self.beta == 1.0 else self.beta * fz + (1.0 - self.beta) * z
        if n == 1:
            return plain
        scale = GG.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(GG.dtype).tiny)
        eye = torch.eye(n, dtype=GG.dtype, device=GG.device)
        A = GG + (self.lam * scale + torch.finfo(GG.dtype).tiny)[:, None, None] * eye
        ones = torch.ones(GG.shape[0], n, 1, dtype=GG.dtype, device=GG.device)
        wide = linear_algebra_dtype(GG.dtype)  # float16/bfloat16 states: the m x m solve in float32
        w, info = torch.linalg.solve_ex(A.to(wide), ones.to(wide))
        w = w[..., 0]
        total = w.sum(dim=1, keepdim=True)
        alpha = w / total
        ok = (info == 0) & torch.isfinite(alpha).all(dim=1) & (total[:, 0].abs() > 0)
        coeff = alpha[:, None, :].to(F.dtype)  # (b, 1, n): weighted sums over the history as batched products
        mixed = torch.bmm(coeff, F)[:, 0]
        if self.beta != 1.0:
            mixed = self.beta * mixed + (1.0 - self.beta) * torch.bmm(coeff, X)[:, 0]
        return select_rows(ok, mixed, plain)
