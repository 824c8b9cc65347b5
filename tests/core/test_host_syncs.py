"""The solver loop never waits for the device: on accelerators no iteration reads a tensor value
on the host (each such read is a synchronisation on CUDA).

The reads are counted on CPU with a dispatch mode that sees every op that hands a value to the
host (``.item()``, ``bool(t)``, linear-algebra error checks). "Accelerator semantics" switches off
the CPU-only shortcuts that read flags (they are free on CPU) and replaces the stop check by its
CUDA behaviour when the answer is not back yet (it is an asynchronous copy there, tested on GPU
by benchmarks/gpu_path.py). The number of reads must then not grow with the number of steps.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mdeq.core.solvers import base
from mdeq.nn.cells import ConvResidualCell
from mdeq.nn.deq import DEQ

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten._linalg_check_errors.default, aten.equal.default}


class HostReads(TorchDispatchMode):
    """Counts ops that copy a tensor value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in HOST_READS:
            self.count += 1
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def accelerator_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "host_reads_are_free", lambda t: False)
    monkeypatch.setattr(base._StopCheck, "all_stopped", lambda self, active: False)


def _reads_for_solve(solver: str, steps: int) -> int:
    torch.manual_seed(0)
    z0 = torch.zeros(4, 32)
    W = torch.randn(32, 32) * 0.3 / 32**0.5
    x = torch.randn(4, 32)
    with HostReads() as mode:
        base_solver = {"fixed_point": "FixedPoint", "anderson": "Anderson", "broyden": "Broyden"}[solver]
        import mdeq.core.solvers as solvers

        getattr(solvers, base_solver)().solve(lambda z: torch.tanh(z @ W + x), z0, tol=0.0, max_steps=steps)
    return mode.count


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_solver_iterations_read_nothing_on_the_host_on_accelerators(accelerator_semantics: None, solver: str) -> None:
    assert _reads_for_solve(solver, 5) == _reads_for_solve(solver, 40) == 0


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_the_counter_sees_the_cpu_shortcuts(solver: str) -> None:
    # Without accelerator semantics the CPU path reads flags every iteration (free there): the
    # count grows with the steps, which shows the counter would catch a read in the loop.
    assert _reads_for_solve(solver, 40) > _reads_for_solve(solver, 5) + 30


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_a_deq_training_step_reads_the_host_a_fixed_number_of_times(accelerator_semantics: None, solver: str) -> None:
    """Forward solve + implicit backward solve + parameter gradients: the reads (input check,
    one convergence verdict per solve) are per call, not per iteration."""

    def reads(steps: int) -> int:
        torch.manual_seed(0)
        deq = DEQ(ConvResidualCell(8, 16, num_groups=4), solver=solver, tol=0.0, max_steps=steps, on_divergence="ignore",
                  backward={"name": "implicit", "linear_solver": "iterative"})
        x = torch.randn(2, 8, 6, 6)
        with HostReads() as mode:
            z, _ = deq(x)
            z.square().sum().backward()
        return mode.count

    assert reads(4) == reads(20) <= 4


@pytest.mark.parametrize("solver", ["FixedPoint", "Anderson", "Broyden"])
def test_without_early_stop_the_loop_has_no_host_read_even_for_the_stop_check(monkeypatch: pytest.MonkeyPatch, solver: str) -> None:
    import mdeq.core.solvers as solvers

    monkeypatch.setattr(base, "host_reads_are_free", lambda t: False)  # the real stop check stays
    torch.manual_seed(0)
    W = torch.randn(32, 32) * 0.3 / 32**0.5
    x = torch.randn(4, 32)
    f = lambda z: torch.tanh(z @ W + x)  # noqa: E731
    s = getattr(solvers, solver)()
    with HostReads() as mode:
        fixed = s.solve(f, torch.zeros(4, 32), tol=1e-6, max_steps=60, early_stop=False)
    assert mode.count == 0 and fixed.nsteps == 60
    early = s.solve(f, torch.zeros(4, 32), tol=1e-6, max_steps=60)
    assert early.nsteps < 60 and bool(early.converged.all()) and bool(fixed.converged.all())
    # Converged samples are frozen: running on changes nothing.
    torch.testing.assert_close(fixed.z, early.z, rtol=0, atol=0)
    torch.testing.assert_close(fixed.residual, early.residual, rtol=0, atol=0)


def test_a_deq_inference_forward_without_early_stop_reads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    kw = dict(solver="anderson", tol=1e-3, max_steps=40, check_input=False, on_divergence="ignore")
    deq = DEQ(ConvResidualCell(8, 16, num_groups=4), **kw).eval()
    fixed = DEQ(ConvResidualCell(8, 16, num_groups=4), early_stop=False, **kw).eval()
    fixed.load_state_dict(deq.state_dict())
    x = torch.randn(3, 8, 6, 6)
    with torch.no_grad():
        z_early, sol_early = deq(x)
        monkeypatch.setattr(base, "host_reads_are_free", lambda t: False)
        with HostReads() as mode:
            z_fixed, sol_fixed = fixed(x)
    assert mode.count == 0, mode.ops
    assert sol_early.nsteps < 40 == sol_fixed.nsteps and bool(sol_fixed.converged.all())
    torch.testing.assert_close(z_fixed, z_early, rtol=0, atol=0)  # converged samples stay frozen


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_a_fixed_budget_training_step_reads_nothing_even_in_the_implicit_backward(monkeypatch: pytest.MonkeyPatch, solver: str) -> None:
    """The GPU training recipe's step (SolverBudget(fixed=True)): the forward solve and the implicit
    backward's linear solve both run max_steps iterations without a stop check; the real CUDA stop
    check stays in place, so a stop check in the backward would be counted."""
    from mdeq.core.budget import solver_budget

    monkeypatch.setattr(base, "host_reads_are_free", lambda t: False)  # the real stop check stays

    def reads(fixed: bool) -> tuple[int, int | None]:
        torch.manual_seed(0)
        deq = DEQ(ConvResidualCell(8, 16, num_groups=4), solver=solver, tol=1e-3, max_steps=12,
                  backward={"name": "implicit", "linear_solver": "iterative"})
        x = torch.randn(2, 8, 6, 6, requires_grad=True)
        with HostReads() as mode, solver_budget(fixed=fixed, quiet=True):
            z, sol = deq(x)
            z.square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        return mode.count, sol.backward.nsteps

    fixed_reads, backward_steps = reads(True)
    assert fixed_reads == 0 and backward_steps == 12
    assert reads(False)[0] > 0  # the counter sees the early-stopping backward's stop checks
