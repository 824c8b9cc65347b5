"""Property-based tests (hypothesis, derandomized): random contractive maps are solved by every
solver with matching implicit gradients; random expansive maps never pass as converged."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdeq import DEQ
from mdeq.core.solvers import get_solver

SOLVERS = ["fixed_point", "anderson", "broyden", "newton_krylov", "ode", "newton", "trust_region"]
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


def random_matrix(seed: int, dim: int, norm: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return (a * (norm / torch.linalg.matrix_norm(a, ord=2))).to(dtype)


def independent_residual(f, z: torch.Tensor) -> torch.Tensor:
    fz = f(z)
    return (fz - z).norm(dim=1) / fz.norm(dim=1).clamp_min(1e-30)


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    dim=st.integers(1, 12),
    batch=st.integers(1, 6),
    norm=st.floats(0.1, 0.9),
    double=st.booleans(),
    solver=st.sampled_from(SOLVERS),
)
def test_every_solver_solves_random_contractions(seed, dim, batch, norm, double, solver):
    dtype = torch.float64 if double else torch.float32
    tol = 1e-9 if double else 1e-4
    w = random_matrix(seed, dim, norm, dtype)
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    f = lambda z: torch.tanh(z @ w.T + x)  # noqa: E731  (Lipschitz constant <= norm < 1)
    res = get_solver(solver).solve(f, torch.zeros_like(x), tol=tol, max_steps=500)
    assert bool(res.converged.all()), (solver, res.residual)
    assert torch.isfinite(res.z).all()
    assert float(independent_residual(f, res.z).max()) <= tol * 1.01


@SETTINGS
@given(seed=st.integers(0, 10_000), dim=st.integers(1, 8), batch=st.integers(1, 4), norm=st.floats(0.1, 0.8), solver=st.sampled_from(["anderson", "broyden", "ode", "newton", "trust_region"]))
def test_implicit_gradients_match_unrolled_on_random_contractions(seed, dim, batch, norm, solver):
    w = random_matrix(seed, dim, norm, torch.float64).requires_grad_()
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64, requires_grad=True)
    grads = []
    for s, bw in ((solver, "implicit"), ("fixed_point", "unrolled")):
        deq = DEQ(lambda z, x: torch.tanh(z @ w.T + x), solver=s, backward=bw, tol=1e-12, max_steps=400, on_divergence="raise")
        z, _ = deq(x)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad((z**2).sum() + z.sum(), (w, x))]))
    assert (grads[0] - grads[1]).norm() <= 1e-6 * grads[1].norm() + 1e-12


@SETTINGS
@given(seed=st.integers(0, 10_000), dim=st.integers(1, 8), batch=st.integers(1, 4), gain=st.floats(1.5, 4.0), solver=st.sampled_from(SOLVERS))
def test_random_expansive_maps_never_pass_as_converged(seed, dim, batch, gain, solver):
    # an expansive orthogonal map times gain: plain iteration can only diverge
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    a = gain * q
    b = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    f = lambda z: z @ a.T + b  # noqa: E731
    tol = 1e-8
    res = get_solver(solver).solve(f, torch.zeros_like(b), tol=tol, max_steps=200)
    assert torch.isfinite(res.z).all()
    if solver == "fixed_point":
        assert not res.converged.any()
    # root finders may find the (repelling) root; anything reported converged must truly be one
    ok = res.converged
    if ok.any():
        assert float(independent_residual(f, res.z[ok]).max()) <= tol * 1.01
    assert bool((res.converged | (res.residual > tol)).all())
