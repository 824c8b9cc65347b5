"""Exact Newton's method on g(z) = f(z) - z, for small states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mdeq.core.options import Rule, check_options, real
from mdeq.core.solvers.base import Map, linear_algebra_dtype, select_rows
from mdeq.core.solvers.jacobian_products import DenseJacobianSolver, dense_jacobian
from mdeq.core.solvers.registry import register_solver


def newton_direction(jac_f: Tensor, z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
    """The Newton step d solving (J_f - I) d = -(f(z) - z) per sample by LU, and the mask of
    samples where the system was solvable (non-singular, finite step)."""
    eye = torch.eye(z.shape[1], dtype=jac_f.dtype, device=jac_f.device)
    wide = linear_algebra_dtype(z.dtype)  # float16/bfloat16 states: the LU in float32
    d, info = torch.linalg.solve_ex((jac_f - eye).to(wide), (z - fz)[..., None].to(wide))
    d = d[..., 0].to(z.dtype)
    return d, (info == 0) & torch.isfinite(d.sum(dim=1))


@register_solver
@dataclass
class Newton(DenseJacobianSolver):
    """Newton's method with the exact Jacobian: each step forms J_f at z per sample from ``dim``
    Jacobian-vector products (forward-mode AD; see ``jvp``) and solves (J_f - I) d = -(f(z) - z)
    by LU, then z <- z + ``step_size`` * d. Quadratic convergence near a root, including roots
    that plain iteration cannot reach (|J_f| > 1); one step solves an affine map exactly.

    For states of up to a few hundred dimensions (each step costs ``dim`` f-evaluations and
    ``dim**2`` numbers per sample; above ``max_dim`` it refuses with advice). Far from a root the
    full step can overshoot and run away: ``trust_region`` is the safeguarded variant. A singular
    system falls back to a plain fixed-point step for that sample.
    """

    name = "newton"
    step_size: float = 1.0

    option_rules: ClassVar[dict[str, Rule]] = {"step_size": real(0.0, 1.0, low_open=True), **DenseJacobianSolver.dense_option_rules}

    def __post_init__(self) -> None:
        check_options("Newton", self, self.option_rules)

    def step(self, state: Any, z: Tensor, fz: Tensor, f: Map, jvp: Map | None) -> Tensor:
        d, ok = newton_direction(dense_jacobian(state, f, z, fz, jvp), z, fz)
        return select_rows(ok, z + self.step_size * d, fz)
