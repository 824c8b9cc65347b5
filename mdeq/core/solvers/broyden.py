"""Limited-memory ("good") Broyden's method on g(z) = f(z) - z."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mdeq.core.options import MAX_HISTORY, Rule, check_options, integer, real
from mdeq.core.solvers import base
from mdeq.core.solvers.base import Map, Solver, batched_dot, select_rows
from mdeq.core.solvers.registry import register_solver


@register_solver
@dataclass
class Broyden(Solver):
    """Quasi-Newton root finding with a low-rank inverse-Jacobian estimate.

    The inverse Jacobian of g(z) = f(z) - z starts at -I (so the first step is a fixed-point
    step) and receives one rank-one "good Broyden" update per step. Only the last ``memory``
    updates are kept, so memory is bounded by ``memory`` and not by ``max_steps`` (the buffers
    grow as updates arrive, so a short solve never allocates all ``memory`` slots; a memory that
    is too short costs iterations at tight tolerances: on mdeq_tiny at 1e-5, memory 20 needs 75
    f-evaluations, 64 needs 49). Updates with a
    vanishing or non-finite denominator are skipped per sample, and a sample whose residual grows
    by more than ``restart_factor`` in one step restarts from B = -I (Broyden's estimate has gone
    bad; without restarts limited-memory Broyden can diverge on maps that iteration solves).
    """

    name = "broyden"
    memory: int = 64
    step_size: float = 1.0
    restart_factor: float = 2.0

    option_rules: ClassVar[dict[str, Rule]] = {
        "memory": integer(1, MAX_HISTORY), "step_size": real(0.0, 1.0, low_open=True), "restart_factor": real(1.0, low_open=True),
    }

    def __post_init__(self) -> None:
        check_options("Broyden", self, self.option_rules)

    def init_state(self, z0: Tensor) -> Any:
        # Without autograd the low-rank factors live in ring buffers written in place (only the
        # first min(k, memory) slots are read); under autograd they are lists of tensors.
        # "Bg" keeps B g of the previous step, so each step needs one product with B and one
        # with B^T over the history instead of three.
        if torch.is_grad_enabled():
            return {"u": [], "v": [], "z": None, "g": None, "Bg": None, "k": 0}
        b, d = z0.shape
        cap = min(self.memory, 8)
        return {"U": z0.new_empty(b, cap, d), "V": z0.new_empty(b, cap, d), "z": None, "g": None, "Bg": None, "k": 0}

    @staticmethod
    def _factors(state: Any) -> tuple[Tensor, Tensor] | None:
        if "U" in state:
            n = min(state["k"], state["U"].shape[1])
            return (state["U"][:, :n], state["V"][:, :n]) if n else None
        return (torch.stack(state["u"], dim=1), torch.stack(state["v"], dim=1)) if state["u"] else None

    @staticmethod
    def _matvec(uv: tuple[Tensor, Tensor] | None, x: Tensor, transpose: bool = False) -> Tensor:
        """B x with B = -I + sum_i u_i v_i^T, or x^T B with ``transpose``."""
        if uv is None:
            return -x
        left, right = uv if not transpose else uv[::-1]
        return -x + torch.einsum("bl,bld->bd", torch.einsum("bld,bd->bl", right, x), left)

    def _push(self, state: Any, u: Tensor, v: Tensor, keep: Tensor) -> None:
        """Add the update (u, v); zero the history of samples that restart (keep=False)."""
        if "U" in state:
            U, V = state["U"], state["V"]
            slot = state["k"] % self.memory
            if slot >= U.shape[1]:  # grow the buffers (doubling, up to memory) before the first wrap
                cap = min(self.memory, 2 * U.shape[1])
                for key in ("U", "V"):
                    old = state[key]
                    state[key] = old.new_empty(old.shape[0], cap, old.shape[2])
                    state[key][:, : old.shape[1]].copy_(old)
                U, V = state["U"], state["V"]
            U[:, slot].copy_(u)
            V[:, slot].copy_(v)
            if not base.host_reads_are_free(keep) or not bool(keep.all()):  # CPU: skip when nobody restarts
                n = min(state["k"] + 1, self.memory)
                U[:, :n].mul_(keep[:, None, None])
                V[:, :n].mul_(keep[:, None, None])
        else:
            us, vs = state["u"], state["v"]
            us.append(u)
            vs.append(v)
            if len(us) > self.memory:
                del us[0], vs[0]
            us[:] = [torch.where(keep[:, None], t, torch.zeros_like(t)) for t in us]
            vs[:] = [torch.where(keep[:, None], t, torch.zeros_like(t)) for t in vs]
        state["k"] += 1

    def step(self, state: Any, z: Tensor, fz: Tensor, f: Map, jvp: Map | None) -> Tensor:
        g = fz - z
        uv = self._factors(state)
        bg = self._matvec(uv, g)  # B g with the current estimate
        if state["z"] is not None:
            dz = z - state["z"]
            dg = g - state["g"]
            b_dg = bg - state["Bg"]  # B dg; B g_prev was computed with this very B last step
            v = self._matvec(uv, dz, transpose=True)
            denom = batched_dot(v, dg)
            size = torch.linalg.vector_norm(v, dim=1) * torch.linalg.vector_norm(dg, dim=1)
            ok = torch.isfinite(denom) & (denom.abs() > 1e3 * torch.finfo(z.dtype).eps * size) & (size > 0)
            safe = torch.where(ok, denom, torch.ones_like(denom))
            u = (dz - b_dg) / safe[:, None]
            u = select_rows(ok, u, u.new_zeros(()).expand_as(u))  # a zero view: nothing filled
            v = select_rows(ok, v, v.new_zeros(()).expand_as(v))
            gnorm = torch.linalg.vector_norm(g, dim=1)
            keep = ~(gnorm > self.restart_factor * torch.linalg.vector_norm(state["g"], dim=1))
            self._push(state, u, v, keep)
            # The updated estimate times g: B' g = B g + u (v . g), or -g where B restarted at -I.
            bg = select_rows(keep, bg + u * batched_dot(v, g)[:, None], -g)
        state["z"], state["g"], state["Bg"] = z, g, bg
        return z - self.step_size * bg
