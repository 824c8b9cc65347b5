"""Gradients through the equilibrium: finite differences, unrolled backprop, phantom, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mdeq import (
    DEQ,
    ConvergenceError,
    ConvResidualCell,
    HigherOrderGradientError,
    ImplicitBackward,
    PhantomBackward,
    TanhCell,
)
from tests.helpers import contraction_matrix


def tanh_cell(dim=6, in_dim=3, scale=0.9):
    cell = TanhCell(dim, in_dim).double()
    with torch.no_grad():
        cell.linear_z.weight.copy_(contraction_matrix(dim, scale))
    return cell


def deq_as_function(deq: DEQ, x: torch.Tensor):
    """(x, *params) -> output, for gradcheck over the input and every parameter."""
    names = [n for n, _ in deq.named_parameters()]

    def fn(x, *params):
        z, _ = functional_call(deq, dict(zip(names, params)), (x,))
        return z

    return fn, tuple(p.detach().clone().requires_grad_() for p in deq.parameters())


def test_gradcheck_tanh_cell():
    deq = DEQ(tanh_cell(), solver="anderson", tol=1e-13, max_steps=300, state_shape=(6,), on_divergence="raise")
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    fn, params = deq_as_function(deq, x)
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


class SmoothConvCell(nn.Module):
    """Conv + GroupNorm residual cell with tanh: like ConvResidualCell but without ReLU kinks,
    which finite differences cannot resolve."""

    def __init__(self, channels=4, inner=4, groups=2):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, inner)
        self.norm2 = nn.GroupNorm(groups, channels)
        with torch.no_grad():
            self.conv1.weight.mul_(0.5)
            self.conv2.weight.mul_(0.5)

    def forward(self, z, x):
        y = torch.tanh(self.norm1(self.conv1(z)))
        return self.norm2(torch.tanh(0.5 * z + x + self.conv2(y)))


def _gradcheck_conv(solver: str, fast_mode: bool) -> bool:
    torch.manual_seed(1)
    deq = DEQ(SmoothConvCell().double(), solver=solver, tol=1e-12, max_steps=200, on_divergence="raise")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    fn, params = deq_as_function(deq, x)
    return torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast_mode)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_gradcheck_conv_groupnorm_cell(solver):
    """Random projections u^T J v of the full Jacobian against finite differences."""
    assert _gradcheck_conv(solver, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_gradcheck_conv_groupnorm_cell_full_jacobian(solver):
    assert _gradcheck_conv(solver, fast_mode=False)


def _grads(deq: DEQ, x: torch.Tensor):
    deq.zero_grad()
    x = x.detach().clone().requires_grad_()
    z, sol = deq(x)
    loss = (z**2).sum() + z.sin().sum()
    loss.backward()
    return torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in deq.parameters()]), sol


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden", "newton_krylov"])
def test_implicit_equals_unrolled(solver):
    cell = tanh_cell(scale=0.8)
    x = torch.randn(4, 3, dtype=torch.float64)
    common = dict(solver=solver, tol=1e-13, max_steps=300, state_shape=(6,), on_divergence="raise")
    g_impl, sol = _grads(DEQ(cell, backward=ImplicitBackward(linear_solver="iterative"), **common), x)
    g_unr, _ = _grads(DEQ(cell, backward="unrolled", **common), x)
    rel = (g_impl - g_unr).norm() / g_unr.norm()
    assert rel < 1e-6, rel
    assert sol.backward is not None and sol.backward.mode == "implicit"
    assert bool(sol.backward.converged.all()) and sol.backward.nfe > 0


def test_implicit_backward_solver_is_configurable():
    cell = tanh_cell(scale=0.8)
    x = torch.randn(4, 3, dtype=torch.float64)
    ref, _ = _grads(DEQ(cell, tol=1e-13, max_steps=300, state_shape=(6,)), x)
    bw = ImplicitBackward(solver="broyden", tol=1e-13, max_steps=100)
    g, sol = _grads(DEQ(cell, backward=bw, tol=1e-13, max_steps=300, state_shape=(6,)), x)
    assert sol.backward.solver == "broyden"
    torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-10)


def test_phantom_gradient_approaches_implicit_with_many_steps():
    cell = tanh_cell(scale=0.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    common = dict(tol=1e-13, max_steps=300, state_shape=(6,))
    g_impl, _ = _grads(DEQ(cell, **common), x)
    g_many, sol = _grads(DEQ(cell, backward=PhantomBackward(steps=60), **common), x)
    g_one, _ = _grads(DEQ(cell, backward="phantom", **common), x)
    assert sol.backward.mode == "phantom" and sol.backward.nfe == 60
    assert (g_many - g_impl).norm() / g_impl.norm() < 1e-8
    assert (g_one - g_impl).norm() / g_impl.norm() > 1e-3  # 1-step (Jacobian-free) is inexact


def test_higher_order_gradient_is_a_clear_error():
    deq = DEQ(tanh_cell(), tol=1e-10, state_shape=(6,))
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    z, _ = deq(x)
    with pytest.raises(HigherOrderGradientError, match="higher-order"):
        torch.autograd.grad(z.sum(), x, create_graph=True)


def test_unrolled_supports_second_derivatives():
    deq = DEQ(tanh_cell(scale=0.5), backward="unrolled", tol=1e-12, max_steps=100, state_shape=(6,))
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    z, _ = deq(x)
    (g,) = torch.autograd.grad(z.pow(2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(h).all()


def test_backward_non_convergence_raises_when_asked():
    bw = ImplicitBackward(max_steps=2, tol=1e-14, linear_solver="iterative")
    deq = DEQ(tanh_cell(scale=0.95), backward=bw, tol=1e-12, max_steps=300, state_shape=(6,), on_divergence="raise")
    z, _ = deq(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ConvergenceError, match="backward solve did not converge"):
        z.sum().backward()


def test_gradient_reaches_input_and_all_parameters():
    cell = ConvResidualCell(channels=8, inner_channels=8, num_groups=4)
    deq = DEQ(cell, solver="anderson", tol=1e-4, max_steps=40)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    z, _ = deq(x)
    z.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in deq.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_no_graph_is_built_under_no_grad():
    deq = DEQ(tanh_cell(), tol=1e-8, state_shape=(6,))
    with torch.no_grad():
        z, sol = deq(torch.randn(2, 3, dtype=torch.float64))
    assert not z.requires_grad and sol.jacobian_loss is None


class _Twice(nn.Module):
    """Uses the DEQ output in two places: the backward hook must see the summed gradient once."""

    def __init__(self, deq):
        super().__init__()
        self.deq = deq

    def forward(self, x):
        z, sol = self.deq(x)
        return z.sum() + (2 * z).pow(2).sum(), sol


def test_output_used_twice_gets_one_backward_solve():
    m = _Twice(DEQ(tanh_cell(), tol=1e-12, max_steps=200, state_shape=(6,)))
    m_unr = _Twice(DEQ(m.deq.f, backward="unrolled", tol=1e-12, max_steps=200, state_shape=(6,)))
    x = torch.randn(3, 3, dtype=torch.float64)
    loss, sol = m(x)
    loss.backward()
    g = torch.cat([p.grad.flatten() for p in m.parameters()])
    m.zero_grad()
    loss, _ = m_unr(x)
    loss.backward()
    g_ref = torch.cat([p.grad.flatten() for p in m_unr.parameters()])
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9)


def test_implicit_equals_unrolled_on_relu_conv_cell():
    """The tutorial's ReLU conv cell: no finite differences needed, so kinks do not matter."""
    torch.manual_seed(2)
    cell = ConvResidualCell(channels=8, inner_channels=8, num_groups=4, init_std=0.05).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    common = dict(tol=1e-12, max_steps=400, on_divergence="raise")
    g_impl, _ = _grads(DEQ(cell, solver="anderson", backward="implicit", **common), x)
    # Reference: backprop through plain iteration (backprop through Anderson's mixing solves is
    # ill-conditioned once its residual history is nearly collinear, see UnrolledBackward).
    g_unr, _ = _grads(DEQ(cell, solver="fixed_point", backward="unrolled", **common), x)
    assert (g_impl - g_unr).norm() / g_unr.norm() < 1e-6


@pytest.mark.parametrize("linear", ["iterative", "gmres", "dense"])
def test_backward_linear_solvers_agree(linear):
    cell = tanh_cell(scale=0.8)
    x = torch.randn(4, 3, dtype=torch.float64)
    common = dict(tol=1e-12, max_steps=300, state_shape=(6,), on_divergence="raise")
    ref, _ = _grads(DEQ(cell, backward="unrolled", solver="fixed_point", **common), x)
    g, sol = _grads(DEQ(cell, backward=ImplicitBackward(linear_solver=linear), **common), x)
    assert (g - ref).norm() / ref.norm() < 1e-8
    assert sol.backward.solver == {"iterative": "anderson", "gmres": "gmres", "dense": "dense"}[linear]
    assert bool(sol.backward.converged.all())


def test_auto_backward_is_dense_for_small_states_and_iterative_for_large():
    small = DEQ(tanh_cell(), tol=1e-10, state_shape=(6,))
    z, sol = small(torch.randn(2, 3, dtype=torch.float64))
    z.sum().backward()
    assert sol.backward.solver == "dense"
    big = DEQ(TanhCell(80, 3, weight_scale=0.5).double(), tol=1e-8, state_shape=(80,))
    z, sol = big(torch.randn(2, 3, dtype=torch.float64))
    z.sum().backward()
    assert sol.backward.solver == "anderson"
    with pytest.raises(ValueError, match="linear_solver must be one of"):
        ImplicitBackward(linear_solver="lu")


def test_dense_and_gmres_backward_where_the_fixed_point_form_diverges():
    """At a repelling equilibrium (found by a root finder), g = J^T g + v diverges by iteration,
    but (I - J^T) g = v is a perfectly good linear system."""
    from tests.core.test_ode import stable_flow_not_contraction

    a = stable_flow_not_contraction(5)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    exact_z = torch.linalg.solve(torch.eye(5, dtype=torch.float64) - a, x.detach().T).T
    exact = 2 * torch.linalg.solve(torch.eye(5, dtype=torch.float64) - a.T, exact_z.T).T
    for linear in ("dense", "gmres"):
        deq = DEQ(lambda z, x: z @ a.T + x, solver="newton_krylov", backward=ImplicitBackward(linear_solver=linear, tol=1e-12), tol=1e-12, max_steps=100, on_divergence="raise")
        z, _ = deq(x)
        (gx,) = torch.autograd.grad(z.pow(2).sum(), x)
        torch.testing.assert_close(gx, exact, rtol=1e-8, atol=1e-9)
