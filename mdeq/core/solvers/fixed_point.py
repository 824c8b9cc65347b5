"""Plain (optionally damped) fixed-point iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mdeq.core.solvers.base import Map, Solver
from mdeq.core.solvers.registry import register_solver


@register_solver
@dataclass
class FixedPoint(Solver):
    """z <- damping * z + (1 - damping) * f(z). ``damping=0`` is plain iteration."""

    name = "fixed_point"
    damping: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.damping < 1.0:
            raise ValueError(f"FixedPoint damping must be in [0, 1), got {self.damping}")

    def step(self, state: Any, z: Tensor, fz: Tensor, f: Map, jvp: Map | None) -> Tensor:
        if self.damping == 0.0:
            return fz
        return self.damping * z + (1.0 - self.damping) * fz
