"""f evaluated once more at the returned iterate (the layer's output) can give NaN/Inf although the
solve stayed finite: those samples must not come back as a converged Inf (issue #28)."""

from __future__ import annotations

import pytest
import torch

from mdeq import DEQ
from mdeq.core.errors import ConvergenceWarning


class PoisonedAfter:
    """f(z, x) = 0.5 z + x, but from call ``n + 1`` on, rows where x > 0 become Inf."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = 0.5 * z + x
        if self.calls > self.n:
            out = torch.where(x > 0, out * float("inf"), out)
        return out


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_nonfinite_output_is_reported_not_returned_as_converged(grad):
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [3.0, 0.5]])
    counting = PoisonedAfter(10**9)
    with torch.set_grad_enabled(grad):
        DEQ(counting, tol=1e-6, max_steps=80, state_shape=(2,))(x.clone().requires_grad_(grad))
    calls = counting.calls  # the solve's calls + the final one
    poisoned = PoisonedAfter(calls - 1)  # only the final evaluation at the returned iterate is Inf
    deq = DEQ(poisoned, tol=1e-6, max_steps=80, state_shape=(2,))
    with torch.set_grad_enabled(grad), pytest.warns(ConvergenceWarning, match="evaluated once more at the returned iterate for 2 sample"):
        z, sol = deq(x.clone().requires_grad_(grad))
    assert sol.converged.tolist() == [False, True, False] and sol.diverged.tolist() == [True, False, True]
    assert torch.isfinite(z[1]).all() and not torch.isfinite(z[0]).all()
    strict = DEQ(PoisonedAfter(calls - 1), tol=1e-6, max_steps=80, state_shape=(2,), on_divergence="raise")
    with torch.set_grad_enabled(grad), pytest.raises(Exception, match="evaluated once more"):
        strict(x.clone().requires_grad_(grad))


def test_a_finite_solve_is_unchanged():
    x = torch.randn(4, 3)
    z, sol = DEQ(lambda z, x: 0.5 * z + x, tol=1e-6, max_steps=80, state_shape=(3,))(x)
    assert bool(sol.converged.all()) and not bool(sol.diverged.any())
    torch.testing.assert_close(z, 2 * x, rtol=1e-5, atol=1e-5)
