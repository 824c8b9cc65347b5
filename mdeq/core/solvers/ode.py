"""Continuous DEQs: integrate dz/dt = f(z) - z to its steady state with an adaptive
Runge-Kutta pair (:mod:`mdeq.core.runge_kutta`), stopping each sample as soon as its residual
||dz/dt|| meets the tolerance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mdeq.core.options import Rule, check_options, real
from mdeq.core.runge_kutta import ADAPTIVE_METHODS, TABLEAUS, error_estimate, initial_step, rk_step, scaled_rms
from mdeq.core.solvers.base import Map, Solver, row_norms
from mdeq.core.solvers.registry import register_solver

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
        if self.method not in ADAPTIVE_METHODS:
            raise ValueError(f"unknown ODE method {self.method!r}; choose from {sorted(ADAPTIVE_METHODS)} (adaptive Runge-Kutta pairs)")
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

    def step(self, state: Any, z: Tensor, fz: Tensor, f: Map, jvp: Map | None) -> Tensor:
        tableau = TABLEAUS[self.method]
        if state["h"] is None:
            state["h"] = initial_step(f, z, fz - z, self.rtol, self.atol)
        h = state["h"]
        remaining = self.max_time - state["t"]
        h = torch.minimum(h, remaining.clamp_min(0)) if math.isfinite(self.max_time) else h
        z_new, fz_last, k = rk_step(tableau, f, z, fz, h)
        err_norm = scaled_rms(error_estimate(tableau, k, h), self.rtol, self.atol, z, z_new)
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
