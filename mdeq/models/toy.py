"""The classic DEQ toy regressor (the forum's y = 2x model), tempered to converge."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mdeq.core.solution import DEQSolution
from mdeq.nn.deq import DEQ


class ToyCell(nn.Module):
    """f(z, x) = scale * Linear(2, 1)(Linear(1, 2)(z + x)); ``scale`` < 1 tempers the map so a
    random initialisation contracts (scale 1 often diverges: the forum's NaN)."""

    def __init__(self, hidden: int = 2, scale: float = 0.1) -> None:
        super().__init__()
        self.inner = nn.Linear(1, hidden)
        self.outer = nn.Linear(hidden, 1)
        self.scale = scale

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.scale * self.outer(self.inner(z + x))


class DEQRegressor(nn.Module):
    """Scalar-in, scalar-out DEQ: the output is the equilibrium z* itself."""

    def __init__(self, hidden: int = 2, scale: float = 0.1, **deq_kwargs: Any) -> None:
        super().__init__()
        kwargs = {"solver": "anderson", "tol": 1e-6, "max_steps": 100, **deq_kwargs}
        self.deq = DEQ(ToyCell(hidden, scale), **kwargs)

    def forward(self, x: Tensor, return_solution: bool = False, unroll: int | None = None) -> Tensor | tuple[Tensor, DEQSolution]:  # type: ignore[override]
        z, solution = self.deq(x, unroll=unroll)
        return (z, solution) if return_solution else z


def deq_toy_regressor(**kwargs: Any) -> DEQRegressor:
    """The y = 2x toy model (f(z, x) = 0.1 * Linear(2,1)(Linear(1,2)(z + x)))."""
    return DEQRegressor(**kwargs)
