"""Plain (optionally damped) fixed-point iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from mdeq.core.options import Rule, check_options, real
from mdeq.core.solvers.base import Map, Solver
from mdeq.core.solvers.registry import register_solver


@register_solver
@dataclass
class FixedPoint(Solver):
    """z <- damping * z + (1 - damping) * f(z). ``damping=0`` is plain iteration."""

    name = "fixed_point"
    damping: float = 0.0

    option_rules: ClassVar[dict[str, Rule]] = {"damping": real(0.0, 1.0, high_open=True)}

    def __post_init__(self) -> None:
        check_options("FixedPoint", self, self.option_rules)

    def step(self, state: Any, z: Tensor, fz: Tensor, f: Map, jvp: Map | None) -> Tensor:
        if self.damping == 0.0:
            return fz
        return self.damping * z + (1.0 - self.damping) * fz
