"""A residual a hair above tol (within NEAR_MISS_FACTOR * tol) is recorded as not converged but
not warned about under on_divergence="warn"; a clear miss warns; "raise" stays strict; and the
warning names the caller's file, not the library's."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mdeq import DEQ, ConvergenceError, ConvergenceWarning
from mdeq.core.errors import NEAR_MISS_FACTOR


class Linear(nn.Module):
    """f(z, x) = a z + x: the fixed-point iteration's relative residual falls by about a per step."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, z, x):
        return self.a * z + x


def _residual_after(steps: int, a: float) -> float:
    deq = DEQ(Linear(a), solver="fixed_point", tol=1e-12, max_steps=steps, on_divergence="ignore")
    _, sol = deq(torch.ones(1, 4, dtype=torch.float64))
    return float(sol.residual[0])


def test_near_miss_is_recorded_but_not_warned_and_a_clear_miss_warns():
    a, steps = 0.5, 10
    r = _residual_after(steps, a)
    x = torch.ones(3, 4, dtype=torch.float64)
    near = DEQ(Linear(a), solver="fixed_point", tol=r / (0.5 * (1 + NEAR_MISS_FACTOR)), max_steps=steps)  # r is 1.5 tol
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        _, sol = near(x)
    assert not bool(sol.converged.any()), "the record stays honest"
    far = DEQ(Linear(a), solver="fixed_point", tol=r / (2 * NEAR_MISS_FACTOR), max_steps=steps)  # r is 4 tol
    with pytest.warns(ConvergenceWarning, match="did not converge for 3/3") as caught:
        far(x)
    assert caught[0].filename == __file__, "the warning names the caller"
    strict = DEQ(Linear(a), solver="fixed_point", tol=r / (0.5 * (1 + NEAR_MISS_FACTOR)), max_steps=steps, on_divergence="raise")
    with pytest.raises(ConvergenceError):
        strict(x)
