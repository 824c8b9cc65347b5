"""Exact Newton and the trust-region method against closed forms, on maps where plain Newton
overshoots, and in the DEQ layer (implicit gradients, return-only-z)."""

from __future__ import annotations

import pytest
import torch

from mdeq import DEQ
from mdeq.core.solvers import Newton, TrustRegion, get_solver

DOTTIE = 0.7390851332151607  # the fixed point of cos


def expansive_affine(dim: int, batch: int, gain: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(dim)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return gain * q, torch.randn(batch, dim, generator=g, dtype=torch.float64)


def test_newton_solves_an_affine_map_in_one_step_even_where_iteration_diverges():
    a, b = expansive_affine(7, 3)  # every eigenvalue of df/dz has size 1.5: fixed-point iteration diverges
    z_true = torch.linalg.solve(torch.eye(7, dtype=torch.float64) - a, b.T).T
    res = Newton().solve(lambda z: z @ a.T + b, torch.zeros_like(b), tol=1e-12, max_steps=10)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.z, z_true, rtol=1e-10, atol=1e-10)
    assert res.nsteps == 2 and res.nfe == 1 + 7 + 1  # f(z0), 7 Jacobian columns, f(z1)
    plain = get_solver("fixed_point").solve(lambda z: z @ a.T + b, torch.zeros_like(b), tol=1e-12, max_steps=10)
    assert not bool(plain.converged.any())


def test_trust_region_solves_the_expansive_affine_map():
    a, b = expansive_affine(7, 3)
    z_true = torch.linalg.solve(torch.eye(7, dtype=torch.float64) - a, b.T).T
    res = TrustRegion().solve(lambda z: z @ a.T + b, torch.zeros_like(b), tol=1e-12, max_steps=30)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.z, z_true, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["newton", "trust_region"])
def test_quadratic_convergence_to_the_fixed_point_of_cos(name):
    res = get_solver(name).solve(torch.cos, torch.zeros(1, 1, dtype=torch.float64), tol=1e-15, max_steps=20, record_trace=True)
    assert bool(res.converged.all())
    assert abs(float(res.z) - DOTTIE) < 1e-15
    trace = [float(r) for r in res.trace[:, 0]]
    assert len(trace) <= 7  # iteration needs about 90 steps for 1e-15
    for before, after in zip(trace, trace[1:]):
        if 1e-12 < after and before < 0.1:  # in the quadratic regime: r_k+1 <= C r_k^2
            assert after <= 2.0 * before**2, trace


def test_trust_region_converges_where_newton_overshoots():
    # g(z) = -atan(z - c): from 3 or more units away the Newton step overshoots ever further
    c = torch.tensor([[3.0, -4.0, 5.0], [0.5, 6.0, -2.0]], dtype=torch.float64)
    f = lambda z: z - torch.atan(z - c)  # noqa: E731
    newton = Newton().solve(f, torch.zeros_like(c), tol=1e-10, max_steps=40)
    assert not bool(newton.converged.any())  # reported, never passed off as an equilibrium
    assert bool(newton.runaway.all())
    assert bool(torch.isfinite(newton.z).all())
    trust = TrustRegion().solve(f, torch.zeros_like(c), tol=1e-10, max_steps=40)
    assert bool(trust.converged.all())
    torch.testing.assert_close(trust.z, c, rtol=0, atol=1e-9)


def test_trust_region_finds_cube_roots_from_a_singular_start():
    # f(z) = z - (z^3 - x): the root is x^(1/3); at z0 = 0 the Jacobian of g is singular
    x = torch.tensor([[0.5], [2.0], [8.0], [27.0], [1000.0]], dtype=torch.float64)
    res = TrustRegion().solve(lambda z: z - (z**3 - x), torch.zeros_like(x), tol=1e-12, max_steps=60)
    assert bool(res.converged.all()), res.residual
    torch.testing.assert_close(res.z, x ** (1 / 3), rtol=1e-11, atol=0)
    newton = Newton().solve(lambda z: z - (z**3 - x), torch.zeros_like(x), tol=1e-12, max_steps=60)
    assert not bool(newton.converged.all())  # the full first step lands far out; flagged, not hidden
    ok = newton.converged
    torch.testing.assert_close(newton.z[ok], (x ** (1 / 3))[ok])


def test_rejected_trust_region_steps_reuse_the_jacobian():
    x = torch.tensor([[1000.0]], dtype=torch.float64)
    calls = []

    def f(z):
        calls.append(1)
        return z - (z**3 - x)

    res = TrustRegion(initial_radius=100.0).solve(f, torch.zeros_like(x), tol=1e-12, max_steps=80)
    assert bool(res.converged.all())
    assert len(calls) == res.nfe
    assert res.nfe < 2 * res.nsteps  # 1 + (1 Jacobian column + 1 trial) per moving step, 1 per rejected one


@pytest.mark.parametrize("name", ["newton", "trust_region"])
def test_finite_difference_jacobian(name):
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)  # noqa: E731
    exact = get_solver(name).solve(f, torch.zeros_like(x), tol=1e-12, max_steps=30)
    approx = get_solver(name, jvp="finite_diff").solve(f, torch.zeros_like(x), tol=1e-10, max_steps=30)
    assert bool(exact.converged.all()) and bool(approx.converged.all())
    torch.testing.assert_close(approx.z, exact.z, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", ["newton", "trust_region"])
def test_large_states_are_refused_with_advice(name):
    with pytest.raises(ValueError, match=r"5 x 5 Jacobian.*max_dim=4.*newton_krylov"):
        get_solver(name, max_dim=4).solve(torch.tanh, torch.zeros(2, 5))


@pytest.mark.parametrize("name", ["newton", "trust_region"])
def test_options_are_checked(name):
    with pytest.raises(ValueError, match="jvp"):
        get_solver(name, jvp="forward")
    with pytest.raises(ValueError, match="max_dim"):
        get_solver(name, max_dim=0)


@pytest.mark.parametrize("name", ["newton", "trust_region"])
def test_deq_gradients_match_finite_differences(name):
    torch.manual_seed(0)
    weight, records = [None], []
    deq = DEQ(lambda z, x: torch.tanh(z @ weight[0].T + x), solver=name, tol=1e-12, max_steps=30, on_divergence="raise")

    def output(x, w):
        weight[0] = w
        z, sol = deq(x)
        records.append(sol)
        return z

    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(5, 5, dtype=torch.float64) * 0.4).requires_grad_()
    assert torch.autograd.gradcheck(output, (x, w))
    assert all(r.solver == name and bool(r.converged.all()) for r in records)
