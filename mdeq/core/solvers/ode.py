"""Continuous DEQs: integrate dz/dt = f(z) - z to its steady state with an adaptive
Runge-Kutta pair, stopping each sample as soon as its residual ||dz/dt|| meets the tolerance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mdeq.core.options import Rule, check_options, real
from mdeq.core.solvers.base import Map, Solver, row_norms
from mdeq.core.solvers.registry import register_solver

# Butcher tableaus of two explicit 5(4) pairs with the "first same as last" property:
# (a rows for stages 2..7, 5th-order weights b (= last a row), error weights btilde = b - bhat).
_TABLEAUS: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...], tuple[float, ...]]] = {
    "dopri5": (
        (
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
        ),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        (
            35 / 384 - 5179 / 57600,
            0.0,
            500 / 1113 - 7571 / 16695,
            125 / 192 - 393 / 640,
            -2187 / 6784 + 92097 / 339200,
            11 / 84 - 187 / 2100,
            -1 / 40,
        ),
    ),
    "tsit5": (
        (
            (0.161,),
            (-0.008480655492356989, 0.335480655492357),
            (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
            (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
            (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383),
            (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774),
        ),
        (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774, 0.0),
        (
            -0.001780011052226,
            -0.000816434459657,
            0.007880878010262,
            -0.144711007173263,
            0.582357165452555,
            -0.458082105929187,
            1 / 66,
        ),
    ),
}


@register_solver
@dataclass
class ODESteadyState(Solver):
    """Adaptive explicit Runge-Kutta integration of dz/dt = f(z) - z until steady state.

    Converges on maps where discrete iteration oscillates or diverges: a stable equilibrium of
    the flow (eigenvalues of df/dz - I with negative real part) need not be a contraction.
    Each sample has its own step size and time. ``rtol``/``atol`` control the local
    integration error; termination is the DEQ's residual test on ||f(z) - z|| = ||dz/dt||.
    ``max_time`` ends a sample's integration (not converged). ``max_steps`` counts step attempts
    (accepted or rejected); every attempt costs 6 f-evaluations (the 7th stage is reused).

    Steady-state step control: near equilibrium the local error is tiny, so error control alone
    grows the step to the edge of the method's stability region, where a step barely damps the
    residual and the solve stalls. The residual ratio rho = ||dz/dt(new)|| / ||dz/dt(old)|| (free
    with FSAL) therefore also steers the step: rho is U-shaped in the step size (near 1 for tiny
    steps and again at the stability edge), so when a larger step gave a worse rho than the
    previous one, the step goes back below the previous size; when the residual grows (rho > 1)
    the step shrinks, and beyond ``reject_ratio`` (clear blow-up) it is rejected.
    """

    name = "ode"
    method: str = "tsit5"
    rtol: float = 1e-3
    atol: float = 1e-6
    max_time: float = math.inf
    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    h0: float | None = None
    reject_ratio: float = 2.0

    option_rules: ClassVar[dict[str, Rule]] = {
        "rtol": real(0.0), "atol": real(0.0), "max_time": real(0.0, low_open=True, allow_inf=True),
        "safety": real(0.0, 1.0, low_open=True), "min_factor": real(0.0, 1.0, low_open=True, high_open=True),
        "max_factor": real(1.0, low_open=True), "reject_ratio": real(1.0, low_open=True),
        "h0": real(0.0, low_open=True, optional=True),
    }

    def __post_init__(self) -> None:
        if self.method not in _TABLEAUS:
            raise ValueError(f"unknown ODE method {self.method!r}; choose from {sorted(_TABLEAUS)}")
        check_options("ODESteadyState", self, self.option_rules)
        if self.rtol <= 0 and self.atol <= 0:
            raise ValueError("ODESteadyState needs rtol > 0 or atol > 0")
        if not 0 < self.min_factor < 1 < self.max_factor:
            raise ValueError("ODESteadyState needs 0 < min_factor < 1 < max_factor")

    def init_state(self, z0: Tensor) -> Any:
        b = z0.shape[0]
        return {
            "h": None if self.h0 is None else z0.new_full((b,), self.h0),
            "t": z0.new_zeros(b),
            "fz_next": None,
            "prev_h": z0.new_zeros(b),
            "prev_rho": z0.new_full((b,), math.inf),
        }

    def _scale(self, *zs: Tensor) -> Tensor:
        mag = zs[0].abs()
        for z in zs[1:]:
            mag = torch.maximum(mag, z.abs())
        return self.atol + self.rtol * mag

    @staticmethod
    def _rms(x: Tensor) -> Tensor:
        return x.pow(2).mean(dim=1).sqrt()

    def _initial_step(self, z: Tensor, k1: Tensor, f: Map) -> Tensor:
        """Hairer, Norsett & Wanner's starting step (one extra f evaluation)."""
        scale = self._scale(z)
        d0, d1 = self._rms(z / scale), self._rms(k1 / scale)
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-30))
        z1 = z + h0[:, None] * k1
        k2 = f(z1) - z1
        d2 = self._rms((k2 - k1) / scale) / h0
        big = torch.maximum(d1, d2)
        h1 = torch.where(big <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3), (0.01 / big.clamp_min(1e-30)) ** 0.2)
        return torch.minimum(100 * h0, h1)

    def step(self, state: Any, z: Tensor, fz: Tensor, f: Map, jvp: Map | None) -> Tensor:
        a_rows, b, btilde = _TABLEAUS[self.method]
        k = [fz - z]
        if state["h"] is None:
            state["h"] = self._initial_step(z, k[0], f)
        h = state["h"]
        remaining = self.max_time - state["t"]
        h = torch.minimum(h, remaining.clamp_min(0)) if math.isfinite(self.max_time) else h
        hc = h[:, None]
        fz_last = fz
        for row in a_rows:
            zi = z + hc * sum(a * ki for a, ki in zip(row, k) if a != 0.0)
            fz_last = f(zi)
            k.append(fz_last - zi)
        z_new = zi  # the last stage point is the 5th-order solution (FSAL)
        err = hc * sum(e * ki for e, ki in zip(btilde, k) if e != 0.0)
        err_norm = self._rms(err / self._scale(z, z_new))
        rho = (row_norms(k[-1]) / row_norms(k[0]).clamp_min(torch.finfo(torch.float64).tiny)).to(z.dtype)  # scale-safe
        finite = torch.isfinite(err_norm) & torch.isfinite(z_new).all(dim=1) & torch.isfinite(rho)
        accept = finite & (err_norm <= 1.0) & (rho <= self.reject_ratio)
        factor = (self.safety * err_norm.clamp_min(1e-10) ** -0.2).clamp(self.min_factor, self.max_factor)
        past_optimum = accept & (h > state["prev_h"]) & (rho > state["prev_rho"])
        back = 0.9 * state["prev_h"] / h.clamp_min(torch.finfo(h.dtype).tiny)
        factor = torch.where(past_optimum, torch.minimum(factor, back), factor)
        shrink = (accept & (rho > 1.0)) | ~accept  # residual grew, or the step was rejected
        factor = torch.where(shrink, torch.minimum(factor, torch.full_like(factor, 0.5)), factor)
        factor = torch.where(finite, factor, torch.full_like(factor, self.min_factor))
        state["prev_h"] = torch.where(accept, h, state["prev_h"])
        state["prev_rho"] = torch.where(accept, rho, state["prev_rho"])
        state["t"] = state["t"] + torch.where(accept, h, torch.zeros_like(h))
        state["h"] = h * factor
        state["fz_next"] = torch.where(accept[:, None], fz_last, fz)
        return torch.where(accept[:, None], z_new, z)

    def proposal_fz(self, state: Any) -> Tensor | None:
        return state["fz_next"]

    def exhausted(self, state: Any) -> Tensor | None:
        if not math.isfinite(self.max_time):
            return None
        return state["t"] >= self.max_time
