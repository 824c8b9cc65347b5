"""A trust-region (dogleg) method on g(z) = f(z) - z with the exact Jacobian, for small states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mdeq.core.options import Rule, check_options, real
from mdeq.core.solvers.base import RESIDUAL_DTYPE, Map, batched_dot, host_reads_are_free, select_rows
from mdeq.core.solvers.jacobian_products import DenseJacobianSolver, dense_jacobian
from mdeq.core.solvers.newton import newton_direction
from mdeq.core.solvers.registry import register_solver

SHRINK_BELOW = 0.25
"""A step whose actual reduction of ||g||^2 is below this fraction of the predicted one shrinks the radius."""
GROW_ABOVE = 0.75
"""A step at the radius whose actual reduction is above this fraction of the predicted one doubles it."""


def _norm(v: Tensor) -> Tensor:
    return torch.linalg.vector_norm(v, dim=1)


def dogleg(gn: Tensor, gn_ok: Tensor, jac_g: Tensor, g: Tensor, radius: Tensor) -> Tensor:
    """Powell's dogleg step per sample inside ``radius`` for the model ||g + J p||^2: the Newton
    step ``gn`` when it fits; else along the path from the Cauchy point (the model's minimum in
    the steepest-descent direction -J^T g) towards it, cut at the radius. Where J^T g vanishes
    (a stationary point of ||g||^2 that is no root) the direction is g itself (a fixed-point step)."""
    tiny = torch.finfo(g.dtype).tiny
    s = (jac_g.transpose(1, 2) @ g[..., None])[..., 0]  # gradient of ||g||^2 / 2
    js = (jac_g @ s[..., None])[..., 0]
    s_sq, js_sq = batched_dot(s, s), batched_dot(js, js)
    flat = ~(js_sq > 0) | ~torch.isfinite(js_sq)
    cauchy = -(s_sq / js_sq.clamp_min(tiny))[:, None] * s
    cauchy = select_rows(flat, g, cauchy)
    c_norm = _norm(cauchy)
    # beyond the radius already at the Cauchy point (or no usable Newton step): the scaled-down Cauchy step
    cut = cauchy * (radius / c_norm.clamp_min(tiny)).clamp_max(1.0)[:, None]
    # between: p = c + tau (n - c) with ||p|| = radius, tau in [0, 1]
    dn = gn - cauchy
    a = batched_dot(dn, dn).clamp_min(tiny)
    b = 2.0 * batched_dot(cauchy, dn)
    c = c_norm.square() - radius.square()
    tau = ((-b + (b.square() - 4.0 * a * c).clamp_min(0.0).sqrt()) / (2.0 * a)).clamp(0.0, 1.0)
    between = cauchy + tau[:, None] * dn
    newton_fits = gn_ok & (_norm(gn) <= radius)
    use_between = gn_ok & ~newton_fits & (c_norm < radius)
    return select_rows(newton_fits, gn, select_rows(use_between, between, cut))


@register_solver
@dataclass
class TrustRegion(DenseJacobianSolver):
    """Newton's method safeguarded by a trust region: each step forms the exact Jacobian (as
    ``newton``), takes Powell's dogleg step inside a per-sample radius, and accepts it only if
    ||f(z) - z||^2 falls by at least ``eta`` times what the linear model predicted; the radius
    shrinks after poor steps and doubles after good steps at its edge. Converges where the plain
    Newton step overshoots (e.g. g(z) = -atan(z - c) from far away) and is Newton near the root.

    The first radius is ``initial_radius`` times max(||z0||, ||f(z0)||) (1 where both are 0), so it
    scales with the problem. Each step costs ``dim + 1`` f-evaluations (a rejected step leaves z
    unchanged; on the CPU its Jacobian is reused when no sample moved). For states up to
    ``max_dim`` dimensions.
    """

    name = "trust_region"
    initial_radius: float = 1.0
    eta: float = 1e-4

    option_rules: ClassVar[dict[str, Rule]] = {
        "initial_radius": real(0.0, low_open=True), "eta": real(0.0, SHRINK_BELOW, high_open=True),
        **DenseJacobianSolver.dense_option_rules,
    }

    def __post_init__(self) -> None:
        check_options("TrustRegion", self, self.option_rules)

    def _jacobian(self, state: Any, f: Map, z: Tensor, fz: Tensor, jvp: Map | None) -> Tensor:
        """J_f at z; reused when the last step moved no sample (read only where reads are free)."""
        moved = state.get("moved")
        if "jac" in state and moved is not None and host_reads_are_free(moved) and not bool(moved.any()):
            return state["jac"]
        state["jac"] = dense_jacobian(state, f, z, fz, jvp)
        return state["jac"]

    def step(self, state: Any, z: Tensor, fz: Tensor, f: Map, jvp: Map | None) -> Tensor:
        # The radius, the dogleg and the reduction ratio are squares of norms: kept in float64, so
        # float32 states at the scale 1e-23 (squares underflow) or 1e25 are handled as any other.
        wide = RESIDUAL_DTYPE
        z64, fz64 = z.to(wide), fz.to(wide)
        g = fz64 - z64
        if "radius" not in state:
            scale = torch.maximum(_norm(z64), _norm(fz64))
            state["radius"] = self.initial_radius * torch.where(scale > 0, scale, torch.ones_like(scale))
        radius = state["radius"]
        jac_f = self._jacobian(state, f, z, fz, jvp).to(wide)
        gn, gn_ok = newton_direction(jac_f, z64, fz64)
        jac_g = jac_f - torch.eye(z.shape[1], dtype=wide, device=z.device)
        p = dogleg(gn, gn_ok, jac_g, g, radius)
        z_new = z + p.to(z.dtype)
        f_new = f(z_new)
        g_new = f_new.to(wide) - z_new.to(wide)
        g_sq = batched_dot(g, g)
        model = g + (jac_g @ p[..., None])[..., 0]
        predicted = g_sq - batched_dot(model, model)
        actual = g_sq - batched_dot(g_new, g_new)
        finite = torch.isfinite(actual) & torch.isfinite(f_new.sum(dim=1))
        # a model that predicts no decrease (J singular along p) leaves the verdict to the actual change
        ratio = torch.where(predicted > 0, actual / predicted.clamp_min(torch.finfo(wide).tiny), (actual > 0).to(wide))
        accept = finite & (actual > 0) & (ratio > self.eta)
        p_norm = _norm(p)
        shrink = ~finite | (ratio < SHRINK_BELOW)
        grow = finite & (ratio > GROW_ABOVE) & (p_norm >= 0.99 * radius)
        state["radius"] = torch.where(shrink, SHRINK_BELOW * p_norm, torch.where(grow, 2.0 * radius, radius))
        state["moved"] = accept
        state["fz"] = select_rows(accept, f_new, fz)
        return select_rows(accept, z_new, z)

    def proposal_fz(self, state: Any) -> Tensor | None:
        return state.get("fz")
