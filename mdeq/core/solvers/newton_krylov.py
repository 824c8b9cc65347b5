"""Inexact Newton on g(z) = f(z) - z with GMRES on Jacobian-vector products."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from mdeq.core.options import MAX_HISTORY, Rule, check_options, choice, integer, real
from mdeq.core.solvers.base import Map, Solver
from mdeq.core.solvers.gmres import gmres
from mdeq.core.solvers.jacobian_products import JVP_MODES, jacobian_vector_product
from mdeq.core.solvers.registry import register_solver


@register_solver
@dataclass
class NewtonKrylov(Solver):
    """Newton's method whose linear systems (J_f - I) d = -(f(z) - z) are solved by GMRES.

    Jacobian-vector products use forward-mode AD (exact; ``jvp="forward_ad"``) or a finite
    difference (``"finite_diff"``); ``"auto"`` tries forward AD and falls back to finite
    differences if f has an operation without a forward-AD formula. Every JVP counts as one f
    evaluation. ``max_steps`` bounds Newton steps; each costs up to ``krylov_dim`` JVPs.
    """

    name = "newton_krylov"
    krylov_dim: int = 20
    krylov_tol: float = 1e-2
    step_size: float = 1.0
    jvp: str = "auto"

    option_rules: ClassVar[dict[str, Rule]] = {
        "krylov_dim": integer(1, MAX_HISTORY), "krylov_tol": real(0.0, 1.0, low_open=True, high_open=True),
        "step_size": real(0.0, 1.0, low_open=True), "jvp": choice(*JVP_MODES),
    }

    def __post_init__(self) -> None:
        check_options("NewtonKrylov", self, self.option_rules)

    def init_state(self, z0: Tensor) -> Any:
        return {"jvp": self.jvp}

    def step(self, state: Any, z: Tensor, fz: Tensor, f: Map, jvp: Map | None) -> Tensor:
        g = fz - z

        def jacobian_of_g(v: Tensor) -> Tensor:
            jv = jvp(v) if jvp is not None else jacobian_vector_product(state, f, z, fz, v)
            return jv - v

        d, _, _ = gmres(jacobian_of_g, -g, max_iter=self.krylov_dim, rtol=self.krylov_tol)
        return z + self.step_size * d
