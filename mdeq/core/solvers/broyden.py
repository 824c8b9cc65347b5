"""Limited-memory ("good") Broyden's method on g(z) = f(z) - z."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mdeq.core.solvers.base import Map, Solver, batched_dot
from mdeq.core.solvers.registry import register_solver


@register_solver
@dataclass
class Broyden(Solver):
    """Quasi-Newton root finding with a low-rank inverse-Jacobian estimate.

    The inverse Jacobian of g(z) = f(z) - z starts at -I (so the first step is a fixed-point
    step) and receives one rank-one "good Broyden" update per step. Only the last ``memory``
    updates are kept, so memory is bounded by ``memory`` and not by ``max_steps``. Updates with a
    vanishing or non-finite denominator are skipped per sample, and a sample whose residual grows
    by more than ``restart_factor`` in one step restarts from B = -I (Broyden's estimate has gone
    bad; without restarts limited-memory Broyden can diverge on maps that iteration solves).
    """

    name = "broyden"
    memory: int = 20
    step_size: float = 1.0
    restart_factor: float = 2.0

    def __post_init__(self) -> None:
        if not self.restart_factor > 1.0:
            raise ValueError(f"Broyden restart_factor must be > 1, got {self.restart_factor}")
        if self.memory < 1:
            raise ValueError(f"Broyden memory must be >= 1, got {self.memory}")
        if not 0.0 < self.step_size <= 1.0:
            raise ValueError(f"Broyden step_size must be in (0, 1], got {self.step_size}")

    def init_state(self, z0: Tensor) -> Any:
        return {"u": [], "v": [], "z": None, "g": None}

    @staticmethod
    def _matvec(us: list[Tensor], vs: list[Tensor], x: Tensor) -> Tensor:
        """B x with B = -I + sum_i u_i v_i^T."""
        if not us:
            return -x
        U, V = torch.stack(us, dim=1), torch.stack(vs, dim=1)
        return -x + torch.einsum("bl,bld->bd", torch.einsum("bld,bd->bl", V, x), U)

    @staticmethod
    def _rmatvec(us: list[Tensor], vs: list[Tensor], x: Tensor) -> Tensor:
        """x^T B."""
        if not us:
            return -x
        U, V = torch.stack(us, dim=1), torch.stack(vs, dim=1)
        return -x + torch.einsum("bl,bld->bd", torch.einsum("bld,bd->bl", U, x), V)

    def step(self, state: Any, z: Tensor, fz: Tensor, f: Map, jvp: Map | None) -> Tensor:
        g = fz - z
        us, vs = state["u"], state["v"]
        if state["z"] is not None:
            dz = z - state["z"]
            dg = g - state["g"]
            b_dg = self._matvec(us, vs, dg)
            v = self._rmatvec(us, vs, dz)
            denom = batched_dot(v, dg)
            size = torch.linalg.vector_norm(v, dim=1) * torch.linalg.vector_norm(dg, dim=1)
            ok = torch.isfinite(denom) & (denom.abs() > 1e3 * torch.finfo(z.dtype).eps * size) & (size > 0)
            safe = torch.where(ok, denom, torch.ones_like(denom))
            u = torch.where(ok[:, None], (dz - b_dg) / safe[:, None], torch.zeros_like(dz))
            v = torch.where(ok[:, None], v, torch.zeros_like(v))
            us.append(u)
            vs.append(v)
            if len(us) > self.memory:
                del us[0], vs[0]
            gnorm = torch.linalg.vector_norm(g, dim=1)
            grew = gnorm > self.restart_factor * torch.linalg.vector_norm(state["g"], dim=1)
            keep = (~grew)[:, None]
            us[:] = [torch.where(keep, t, torch.zeros_like(t)) for t in us]
            vs[:] = [torch.where(keep, t, torch.zeros_like(t)) for t in vs]
        state["z"], state["g"] = z, g
        return z - self.step_size * self._matvec(us, vs, g)
