"""The layer returns the solver's iterate z*, whose residual the record reports, and never a NaN/Inf
from a later evaluation of f (issue #28)."""

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


X = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [3.0, 0.5]])


def _calls(grad: bool) -> int:
    counting = PoisonedAfter(10**9)
    with torch.set_grad_enabled(grad):
        DEQ(counting, tol=1e-6, max_steps=80, state_shape=(2,), stability="never")(X.clone().requires_grad_(grad))
    return counting.calls


def test_inference_evaluates_f_only_inside_the_solve():
    # no-grad: the output is the measured iterate, so a poisoned last call is the solver's own
    # observation: those samples are diverged, and the best finite iterate is returned
    poisoned = PoisonedAfter(_calls(False) - 1)
    with torch.no_grad(), pytest.warns(ConvergenceWarning, match="2 sample\\(s\\) diverged"):
        z, sol = DEQ(poisoned, tol=1e-6, max_steps=80, state_shape=(2,), stability="never")(X)
    assert sol.converged.tolist() == [False, True, False] and sol.diverged.tolist() == [True, False, True]
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[1], 2 * X[1], rtol=1e-5, atol=1e-5)


def test_a_nonfinite_backward_evaluation_is_reported_not_returned_as_converged():
    calls = _calls(True)  # the solve's calls + the one that builds the backward's graph
    poisoned = PoisonedAfter(calls - 1)
    deq = DEQ(poisoned, tol=1e-6, max_steps=80, state_shape=(2,), stability="never")
    with pytest.warns(ConvergenceWarning, match="evaluated once more at the returned iterate \\(for the backward pass\\) for 2 sample"):
        z, sol = deq(X.clone().requires_grad_())
    assert sol.converged.tolist() == [False, True, False] and sol.diverged.tolist() == [True, False, True]
    assert torch.isfinite(z).all()  # the value is z*, measured finite; only its gradient would be NaN
    strict = DEQ(PoisonedAfter(calls - 1), tol=1e-6, max_steps=80, state_shape=(2,), on_divergence="raise", stability="never")
    with pytest.raises(Exception, match="evaluated once more"):
        strict(X.clone().requires_grad_())


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden", "newton_krylov", "ode"])
@pytest.mark.parametrize("backward", ["implicit", "phantom", "unrolled"])
def test_returned_value_is_the_iterate_whose_residual_is_reported(solver, backward):
    # an oscillating, expansive map (slope -1.5) that only root finders solve: one more f
    # application would land 1.5x farther from the root than the reported residual says
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(3, 2)
    deq = DEQ(lambda z, x: -1.5 * z + x, solver=solver, backward=backward, tol=1e-5, max_steps=200, on_divergence="ignore")
    z, sol = deq(x.clone().requires_grad_())
    fz = -1.5 * z.detach() + x
    recomputed = (fz - z.detach()).norm(dim=1) / fz.norm(dim=1)
    torch.testing.assert_close(recomputed, sol.residual.to(recomputed.dtype), rtol=1e-6, atol=1e-12)
    assert bool((recomputed[sol.converged] <= 1e-5).all())


def test_a_finite_solve_is_unchanged():
    x = torch.randn(4, 3)
    z, sol = DEQ(lambda z, x: 0.5 * z + x, tol=1e-6, max_steps=80, state_shape=(3,))(x)
    assert bool(sol.converged.all()) and not bool(sol.diverged.any())
    torch.testing.assert_close(z, 2 * x, rtol=1e-5, atol=1e-5)
