"""Solvers against known fixed points, per-sample behaviour, divergence and safety."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mdeq import ConvResidualCell
from mdeq.core.solvers import Anderson, Broyden, FixedPoint, NewtonKrylov, get_solver, gmres, list_solvers
from tests.helpers import contraction_matrix, iterate_to_fixed_point, linear_fixed_point

SOLVERS = ["fixed_point", "anderson", "broyden", "newton_krylov", "newton", "trust_region"]


def test_registry_lists_every_solver():
    assert set(SOLVERS) <= set(list_solvers())


@pytest.mark.parametrize("name", SOLVERS)
def test_linear_map_reaches_closed_form(name):
    a = contraction_matrix(12, 0.8)
    b = torch.randn(6, 12, dtype=torch.float64)
    z_true = linear_fixed_point(a, b)
    res = get_solver(name).solve(lambda z: z @ a.T + b, torch.zeros_like(b), tol=1e-11, max_steps=400)
    assert bool(res.converged.all())
    assert not bool(res.diverged.any())
    torch.testing.assert_close(res.z, z_true, rtol=1e-9, atol=1e-9)
    assert float(res.residual.max()) <= 1e-11


@pytest.mark.parametrize("name", SOLVERS)
def test_tanh_map_reaches_reference(name):
    w = contraction_matrix(16, 0.9)
    x = torch.randn(5, 16, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)  # noqa: E731
    z_ref = iterate_to_fixed_point(f, torch.zeros_like(x))
    res = get_solver(name).solve(f, torch.zeros_like(x), tol=1e-11, max_steps=400)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.z, z_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["anderson", "broyden", "newton_krylov", "newton", "trust_region"])
def test_batch_solve_equals_per_sample_solves(name):
    """Each sample has its own coefficients and stop: batching changes nothing."""
    w = contraction_matrix(10, 0.9)
    x = torch.randn(4, 10, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [3.0], [0.5]], dtype=torch.float64)
    solver = get_solver(name)
    batch = solver.solve(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x), tol=1e-8, max_steps=100)
    for i in range(4):
        xi = x[i : i + 1]
        one = solver.solve(lambda z: torch.tanh(z @ w.T + xi), torch.zeros_like(xi), tol=1e-8, max_steps=100)
        torch.testing.assert_close(batch.z[i : i + 1], one.z, rtol=1e-10, atol=1e-12)
        assert int(batch.best_step[i]) == int(one.best_step[0])


def test_samples_stop_independently():
    """A sample that converges early is frozen while others keep iterating."""
    x = torch.tensor([[0.0], [5.0]], dtype=torch.float64)
    res = FixedPoint().solve(lambda z: 0.5 * z + x, torch.zeros_like(x), tol=1e-6, stop_mode="abs", max_steps=100, record_trace=True)
    assert int(res.best_step[0]) == 0  # z0 = 0 is already the fixed point of sample 0
    assert int(res.best_step[1]) > 10
    assert res.trace is not None and res.trace.shape == (res.nsteps, 2)


def test_expansive_map_flagged_within_a_few_steps():
    x = torch.randn(3, 4, dtype=torch.float64)
    res = FixedPoint().solve(lambda z: 2 * z + x, torch.zeros_like(x), tol=1e-6, max_steps=100)
    assert not bool(res.converged.any())
    assert bool(res.diverged.all())
    assert res.nsteps <= 10
    assert bool(torch.isfinite(res.z).all())


@pytest.mark.parametrize("name", SOLVERS)
def test_expansive_map_never_returns_unflagged_garbage(name):
    """Root finders may legitimately find the (unstable) root z = -x; nothing else may pass."""
    x = torch.randn(3, 4, dtype=torch.float64)
    res = get_solver(name).solve(lambda z: 2 * z + x, torch.zeros_like(x), tol=1e-8, max_steps=60)
    assert bool(torch.isfinite(res.z).all())
    ok = res.converged
    torch.testing.assert_close(res.z[ok], -x[ok])
    assert bool((res.converged | res.diverged | (res.residual > 1e-8)).all())


@pytest.mark.parametrize("name", SOLVERS)
def test_nan_samples_are_flagged_and_others_converge(name):
    x = torch.randn(4, 6, dtype=torch.float64)

    def f(z):
        out = 0.5 * torch.tanh(z) + x
        return torch.where(torch.arange(4)[:, None] == 2, torch.full_like(out, math.nan), out)

    res = get_solver(name).solve(f, torch.zeros_like(x), tol=1e-9, max_steps=100)
    assert res.converged.tolist() == [True, True, False, True]
    assert res.diverged.tolist() == [False, False, True, False]
    assert res.nonfinite_at_start.tolist() == [False, False, True, False]
    assert bool(torch.isfinite(res.z).all())


def test_anderson_singular_system_falls_back_without_crashing():
    x = torch.randn(3, 5, dtype=torch.float64)
    # g = f(z) - z is the same vector at every iterate: the mixing system is singular.
    res = Anderson(m=4, lam=0.0).solve(lambda z: z + 1.0, torch.zeros_like(x), tol=1e-8, max_steps=12)
    assert bool(torch.isfinite(res.z).all())
    assert not bool(res.converged.any())
    # A constant map: residuals vanish after one step, the system is exactly zero.
    res = Anderson(m=4, lam=0.0).solve(lambda z: x + 0 * z, torch.zeros_like(x), tol=1e-12, max_steps=12)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.z, x)


def test_broyden_memory_bounded_by_history_length():
    lengths = []

    class Spy(Broyden):
        def step(self, state, z, fz, f, jvp):
            out = super().step(state, z, fz, f, jvp)
            factors = self._factors(state)
            lengths.append(0 if factors is None else factors[0].shape[1])
            return out

    w = contraction_matrix(8, 0.99)
    x = torch.randn(2, 8, dtype=torch.float64)
    Spy(memory=3).solve(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x), tol=0.0, max_steps=40)
    assert len(lengths) == 39
    assert max(lengths) == 3


def test_unknown_solver_name_and_option_are_clear_errors():
    with pytest.raises(ValueError, match="unknown solver 'andersen'.*Did you mean 'anderson'"):
        get_solver("andersen")
    with pytest.raises(ValueError, match="unknown option 'mm' for solver 'anderson'.*Did you mean 'm'"):
        get_solver("anderson", mm=3)
    with pytest.raises(ValueError, match="needs a 'name' key"):
        get_solver({"m": 3})
    s = get_solver({"name": "anderson", "m": 3, "beta": 0.5})
    assert isinstance(s, Anderson) and s.m == 3 and s.beta == 0.5
    with pytest.raises(ValueError, match="beta"):
        Anderson(beta=0.0)


def test_anderson_over_relaxation_is_allowed_and_warns_only_beyond_two():
    """The implicit-layers tutorial's beta=2 is a valid Anderson setting; beta > 2 makes the mixing
    step expansive even for a constant map, and says so."""
    a = contraction_matrix(12, 0.8).abs() / 2  # a spectrum of small size, mostly non-negative
    b = torch.randn(3, 12, dtype=torch.float64)
    for beta in (1.5, 2.0):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            solver = Anderson(beta=beta)
        res = solver.solve(lambda z: z @ a.T + b, torch.zeros_like(b), tol=1e-10, max_steps=100)
        assert bool(res.converged.all())
        torch.testing.assert_close(res.z, linear_fixed_point(a, b), rtol=1e-8, atol=1e-8)
    with pytest.warns(UserWarning, match=r"beta=3 > 2.*lambda < 0.33.*1 < beta <= 2"):
        get_solver("anderson", beta=3.0)


def test_bad_solver_arguments():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="stop_mode"):
        FixedPoint().solve(lambda z: z, z, stop_mode="relative")
    with pytest.raises(ValueError, match=r"shape \(batch, dim\)"):
        FixedPoint().solve(lambda z: z, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="max_steps"):
        FixedPoint().solve(lambda z: z, z, max_steps=0)
    with pytest.raises(ValueError, match="returned shape"):
        FixedPoint().solve(lambda z: z[:, :2], z)


def test_gmres_solves_a_batched_linear_system():
    a = torch.eye(15, dtype=torch.float64) + 0.3 * torch.randn(15, 15, dtype=torch.float64)
    b = torch.randn(3, 15, dtype=torch.float64)
    x, rel, iters = gmres(lambda v: v @ a.T, b, max_iter=15, rtol=1e-12)
    torch.testing.assert_close(x @ a.T, b, rtol=1e-9, atol=1e-9)
    assert iters <= 15 and float(rel.max()) < 1e-9


def test_newton_krylov_finite_difference_jvp():
    w = contraction_matrix(8, 0.9)
    x = torch.randn(3, 8, dtype=torch.float64)
    res = NewtonKrylov(jvp="finite_diff").solve(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x), tol=1e-10, max_steps=30)
    assert bool(res.converged.all())


def conv_cell_nfe(solver: str, tol: float) -> tuple[int, float]:
    torch.manual_seed(0)
    cell = ConvResidualCell(48, 64, num_groups=8)
    x = torch.randn(4, 48, 16, 16)
    with torch.no_grad():
        res = get_solver(solver).solve(
            lambda z: cell(z.view_as(x), x).flatten(1), torch.zeros(4, 48 * 16 * 16), tol=tol, max_steps=100
        )
    assert bool(res.converged.all()), (solver, res.residual)
    return res.nfe, float(res.residual.max())


@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_anderson_and_broyden_beat_fixed_point_on_conv_cell(tol):
    plain, _ = conv_cell_nfe("fixed_point", tol)
    assert conv_cell_nfe("anderson", tol)[0] < plain
    assert conv_cell_nfe("broyden", tol)[0] < plain


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_in_place_and_differentiable_histories_agree(name):
    """No autograd: ring buffers written in place; autograd on: lists of tensors. Same iterates."""
    w = contraction_matrix(9, 0.95)
    x = torch.randn(3, 9, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)  # noqa: E731
    solver = get_solver(name, memory=4) if name == "broyden" else get_solver(name, m=3)
    with torch.no_grad():
        fast = solver.solve(f, torch.zeros_like(x), tol=0.0, max_steps=25, record_trace=True)
    with torch.enable_grad():
        slow = solver.solve(f, torch.zeros_like(x), tol=0.0, max_steps=25, record_trace=True)
    torch.testing.assert_close(fast.trace, slow.trace.detach(), rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(fast.z, slow.z.detach(), rtol=1e-9, atol=1e-14)


def test_select_rows_picks_per_sample_and_skips_uniform_masks():
    from mdeq.core.solvers.base import select_rows

    a, b = torch.ones(3, 4), torch.zeros(3, 4)
    mixed = select_rows(torch.tensor([True, False, True]), a, b)
    assert torch.equal(mixed, torch.tensor([[1.0] * 4, [0.0] * 4, [1.0] * 4]))
    assert select_rows(torch.ones(3, dtype=torch.bool), a, b) is a  # CPU: no copy when uniform
    assert select_rows(torch.zeros(3, dtype=torch.bool), a, b) is b
