"""Continuous DEQs: steady states of dz/dt = f(z) - z with the adaptive Runge-Kutta solver."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mdeq import DEQ, FixedPoint, ImplicitBackward, MultiScaleDEQ, ODESteadyState, TanhCell, get_solver
from tests.helpers import contraction_matrix, linear_fixed_point


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_tableau_has_fifth_order_accuracy(method):
    """One step on dz/dt = f(z) - z with f = 0 (z' = -z): local error O(h^6)."""
    solver = ODESteadyState(method=method)
    z = torch.ones(1, 1, dtype=torch.float64)
    errors = []
    for h in (0.2, 0.1, 0.05):
        state = solver.init_state(z)
        state["h"] = torch.full((1,), h, dtype=torch.float64)
        new = solver.step(state, z, torch.zeros_like(z), lambda q: torch.zeros_like(q), None)
        errors.append(abs(float(new) - math.exp(-h)))
    for big, small in zip(errors, errors[1:]):
        assert 45 < big / small < 100, errors  # 2^6 = 64 (order 5 would give 32, order 7 128)


def stable_flow_not_contraction(dim=6, seed=0):
    """A with eigenvalues near -2: iteration z <- A z + b diverges (|lambda| > 1) but the flow
    dz/dt = (A - I) z + b is stable (eigenvalues near -3)."""
    g = torch.Generator().manual_seed(seed)
    a = -2.0 * torch.eye(dim, dtype=torch.float64) + 0.3 * torch.randn(dim, dim, dtype=torch.float64, generator=g)
    assert float(torch.linalg.eigvals(a).abs().min()) > 1.0
    assert float(torch.linalg.eigvals(a - torch.eye(dim, dtype=torch.float64)).real.max()) < 0
    return a


def test_linear_stable_flow_reaches_closed_form_where_iteration_diverges():
    a = stable_flow_not_contraction()
    b = torch.randn(5, 6, dtype=torch.float64)
    f = lambda z: z @ a.T + b  # noqa: E731
    iteration = FixedPoint().solve(f, torch.zeros_like(b), tol=1e-8, max_steps=200)
    assert not iteration.converged.any() and iteration.diverged.all()
    flow = ODESteadyState().solve(f, torch.zeros_like(b), tol=1e-10, max_steps=400)
    assert flow.converged.all()
    torch.testing.assert_close(flow.z, linear_fixed_point(a, b), rtol=1e-8, atol=1e-9)


def test_negative_one_point_five_map():
    """z = -1.5 z + x: iteration factor 1.5 (flagged), flow eigenvalue -2.5 (converges to x/2.5)."""
    x = torch.randn(8, 3, dtype=torch.float64)
    f = lambda z: -1.5 * z + x  # noqa: E731
    fp = DEQ(lambda z, x: -1.5 * z + x, solver="fixed_point", tol=1e-8, max_steps=100, on_divergence="ignore")
    _, sol = fp(x)
    assert not sol.converged.any()
    ode = DEQ(lambda z, x: -1.5 * z + x, solver="ode", tol=1e-8, max_steps=200, on_divergence="raise")
    z, sol = ode(x)
    assert sol.all_converged and sol.solver == "ode"
    torch.testing.assert_close(z, x / 2.5, rtol=1e-7, atol=1e-8)
    assert sol.nfe > 6 * 3


def test_fsal_reuses_the_last_stage():
    x = torch.randn(2, 3, dtype=torch.float64)
    res = ODESteadyState().solve(lambda z: -1.5 * z + x, torch.zeros_like(x), tol=1e-8, max_steps=200)
    # 1 initial evaluation + 1 for the starting step size + 6 per step attempt
    assert res.nfe == 2 + 6 * (res.nsteps - 1)


def test_max_time_gives_up_without_converging():
    x = torch.randn(2, 3, dtype=torch.float64)
    res = ODESteadyState(max_time=0.5).solve(lambda z: -0.1 * z + x, torch.zeros_like(x), tol=1e-10, max_steps=500)
    assert not res.converged.any() and not res.diverged.any()
    assert res.nsteps < 100


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_gradients_at_the_steady_state_equal_the_discrete_solvers(backward):
    torch.manual_seed(0)
    cell = TanhCell(6, 3).double()
    with torch.no_grad():
        cell.linear_z.weight.copy_(contraction_matrix(6, 0.9))
    x = torch.randn(4, 3, dtype=torch.float64)

    def grads(solver, bw):
        cell.zero_grad()
        xi = x.clone().requires_grad_()
        z, _ = DEQ(cell, solver=solver, backward=bw, tol=1e-12, max_steps=400, state_shape=(6,), on_divergence="raise")(xi)
        (z.pow(2).sum() + z.sin().sum()).backward()
        return torch.cat([xi.grad.flatten()] + [p.grad.flatten() for p in cell.parameters()])

    reference = grads("anderson", "implicit")
    assert (grads("ode", backward) - reference).norm() / reference.norm() < 1e-6


def test_implicit_gradient_on_a_map_only_the_flow_solves():
    """The backward flow dg/dt = J^T g + grad - g is stable when the forward flow is."""
    a = stable_flow_not_contraction(4)
    weight = nn.Parameter(a.clone())
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    deq = DEQ(lambda z, x: z @ weight.T + x, solver="ode", backward=ImplicitBackward(linear_solver="iterative"), tol=1e-11, max_steps=400, on_divergence="raise")
    z, sol = deq(x)
    (gx,) = torch.autograd.grad(z.pow(2).sum(), x)
    exact_z = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - a, x.detach().T).T
    exact = 2 * torch.linalg.solve(torch.eye(4, dtype=torch.float64) - a.T, exact_z.T).T
    torch.testing.assert_close(gx, exact, rtol=1e-7, atol=1e-8)
    assert sol.backward.solver == "ode" and bool(sol.backward.converged.all())


def test_ode_solver_in_a_multiscale_deq_and_by_options():
    from tests.nn.test_multiscale import julia_doc_example

    model = julia_doc_example(tol=1e-5, max_steps=200)
    model.solver = get_solver({"name": "ode", "method": "dopri5", "rtol": 1e-4})
    zs, sol = model(torch.randn(6, 4))
    assert sol.all_converged
    with pytest.raises(ValueError, match="unknown ODE method"):
        ODESteadyState(method="euler")
    with pytest.raises(ValueError, match="unknown option 'rtoll'"):
        get_solver("ode", rtoll=1e-3)


def test_jacobian_regularization_with_the_ode_solver():
    deq = DEQ(TanhCell(6, 3, weight_scale=0.5), solver="ode", jacobian_regularization="vjp", state_shape=(6,))
    z, sol = deq(torch.randn(4, 3))
    (z.sum() + sol.jacobian_loss).backward()
    assert sol.all_converged and sol.jacobian_loss is not None
