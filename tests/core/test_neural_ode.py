"""Neural-ODE mode: z(T) of dz/dt = f(z, x) - z, against closed forms, torchdiffeq, and between
the adjoint and backprop gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mdeq import DEQ, ConvergenceError, MultiScaleDEQ, MultiScaleNeuralODE, NeuralODE

DT = torch.float64


class LinearCell(nn.Module):
    """f(z, x) = W z + x, so dz/dt = (W - I) z + x has a closed-form solution."""

    def __init__(self, dim: int, scale: float = 0.9, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, dim, generator=g, dtype=DT)
        self.lin = nn.Linear(dim, dim, bias=False, dtype=DT)
        with torch.no_grad():
            self.lin.weight.copy_(scale * w / torch.linalg.matrix_norm(w, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.lin(z) + x


class TanhCell(nn.Module):
    def __init__(self, dim: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(dim, dim, dtype=DT)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


def closed_form(cell: LinearCell, z0: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    a = cell.lin.weight.detach() - torch.eye(z0.shape[1], dtype=DT)
    e = torch.linalg.matrix_exp(a * t)
    zp = -torch.linalg.solve(a, x.T).T  # the steady state (W - I) z + x = 0
    return (z0 - zp) @ e.T + zp


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_linear_system_matches_closed_form(method: str) -> None:
    torch.manual_seed(0)
    cell = LinearCell(6)
    x, z0 = torch.randn(3, 6, dtype=DT), torch.randn(3, 6, dtype=DT)
    deq = DEQ(cell, mode=NeuralODE(t_span=(0.0, 2.0), method=method, rtol=1e-10, atol=1e-12))
    z, sol = deq(x, z0=z0)
    torch.testing.assert_close(z, closed_form(cell, z0, x, 2.0), rtol=1e-8, atol=1e-8)
    assert sol.solver.startswith("neural_ode") and sol.nfe > 0


def test_the_record_means_what_it_means_in_equilibrium_mode() -> None:
    """residual is that of the returned z(T) as an equilibrium, and converged says whether it is
    one within tol: not after a short span, yes after a long one (the flow is stable)."""
    torch.manual_seed(0)
    cell = LinearCell(6, scale=0.5)
    x, z0 = torch.randn(3, 6, dtype=DT), torch.randn(3, 6, dtype=DT)
    for span, expected in ((0.5, False), (60.0, True)):
        deq = DEQ(cell, tol=1e-6, mode=NeuralODE(t_span=(0.0, span), rtol=1e-10, atol=1e-12))
        z, sol = deq(x, z0=z0)
        with torch.no_grad():
            fz = cell(z, x)
        rel = torch.linalg.vector_norm(fz - z, dim=1) / torch.linalg.vector_norm(fz, dim=1)
        torch.testing.assert_close(sol.residual, rel.double(), rtol=1e-6, atol=1e-14)
        torch.testing.assert_close(sol.abs_residual, torch.linalg.vector_norm(fz - z, dim=1).double(), rtol=1e-6, atol=1e-14)
        assert sol.converged.tolist() == [expected] * 3, (span, sol.residual)
        assert not bool(sol.diverged.any()) and sol.tol == 1e-6 and sol.stop_mode == "rel"
        assert sol.nsteps >= 1 and sol.nfe > sol.nsteps


def test_rk4_fixed_step_converges_at_fourth_order() -> None:
    cell = LinearCell(4)
    x, z0 = torch.randn(2, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
    exact = closed_form(cell, z0, x, 1.0)
    errs = []
    for h in (0.2, 0.1):
        z, _ = DEQ(cell, mode=NeuralODE(t_span=(0.0, 1.0), method="rk4", step_size=h))(x, z0=z0)
        errs.append(float((z.detach() - exact).abs().max()))
    assert 12 < errs[0] / errs[1] < 20  # 2^4 = 16


def test_matches_torchdiffeq_odeint() -> None:
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(1)
    cell = TanhCell(5)
    x, z0 = torch.randn(4, 5, dtype=DT), torch.zeros(4, 5, dtype=DT)
    ours, _ = DEQ(cell, mode=NeuralODE(t_span=(0.0, 3.0), rtol=1e-9, atol=1e-11))(x, z0=z0)
    ref = torchdiffeq.odeint(lambda t, z: cell(z, x) - z, z0, torch.tensor([0.0, 3.0], dtype=DT), rtol=1e-9, atol=1e-11)[-1]
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-8)


def _grads(cell: nn.Module, mode: NeuralODE, x: torch.Tensor, z0: torch.Tensor) -> list[torch.Tensor]:
    cell.zero_grad()
    x, z0 = x.clone().requires_grad_(), z0.clone().requires_grad_()
    z, _ = DEQ(cell, mode=mode)(x, z0=z0)
    (z * torch.linspace(-1, 1, z.shape[1], dtype=DT)).pow(2).sum().backward()
    return [x.grad, z0.grad] + [p.grad.clone() for p in cell.parameters()]


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_adjoint_matches_backprop_on_a_nonlinear_cell(method: str) -> None:
    torch.manual_seed(2)
    cell = TanhCell(5)
    x, z0 = torch.randn(3, 5, dtype=DT), 0.1 * torch.randn(3, 5, dtype=DT)
    opts = dict(t_span=(0.0, 2.0), method=method, rtol=1e-10, atol=1e-12)
    adj = _grads(cell, NeuralODE(gradient="adjoint", **opts), x, z0)
    bp = _grads(cell, NeuralODE(gradient="backprop", **opts), x, z0)
    for a, b in zip(adj, bp):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_adjoint_matches_closed_form_gradient() -> None:
    cell = LinearCell(4)
    x, z0 = torch.randn(2, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
    g = torch.randn(2, 4, dtype=DT)
    z0r = z0.clone().requires_grad_()
    z, _ = DEQ(cell, mode=NeuralODE(t_span=(0.0, 1.5), rtol=1e-10, atol=1e-12))(x, z0=z0r)
    (z * g).sum().backward()
    a = cell.lin.weight.detach() - torch.eye(4, dtype=DT)
    torch.testing.assert_close(z0r.grad, g @ torch.linalg.matrix_exp(a * 1.5), rtol=1e-7, atol=1e-9)


def test_backprop_gradcheck_fixed_step() -> None:
    cell = TanhCell(3)
    deq = DEQ(cell, mode=NeuralODE(t_span=(0.0, 1.0), method="rk4", step_size=0.25, gradient="backprop"))
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: deq(x)[0], (x,))


def test_multiscale_neural_ode_matches_generic_mode() -> None:
    torch.manual_seed(3)
    main = [nn.Linear(4, 4, dtype=DT), nn.Linear(2, 2, dtype=DT)]

    class Inject(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.m(z) + x)

    mapping = [[None, nn.Linear(4, 2, dtype=DT)], [nn.Linear(2, 4, dtype=DT), None]]
    layers = [Inject(main[0]), nn.Sequential(main[1], nn.Tanh())]
    x = torch.randn(3, 4, dtype=DT)
    ode = NeuralODE(t_span=(0.0, 1.0), rtol=1e-9, atol=1e-11)
    a = MultiScaleNeuralODE(layers, mapping, scales=((4,), (2,)), mode=ode)
    b = MultiScaleDEQ(layers, mapping, scales=((4,), (2,)), mode=ode)
    za, sol = a(x)
    zb, _ = b(x)
    assert [t.shape for t in za] == [(3, 4), (3, 2)]
    for u, v in zip(za, zb):
        torch.testing.assert_close(u, v)
    sum(t.sum() for t in za).backward()
    assert all(p.grad is not None for p in a.parameters())
    assert "neural_ode" in sol.solver
    c = MultiScaleNeuralODE(layers, mapping, scales=((4,), (2,)), t_span=(0.0, 1.0))
    assert c.neural_ode is not None and c.neural_ode.t_span == (0.0, 1.0)


def test_neural_ode_errors_are_clear() -> None:
    cell = TanhCell(3)
    with pytest.raises(ValueError, match="needs t_span"):
        DEQ(cell, mode="neural_ode")
    with pytest.raises(ValueError, match="mode must be"):
        DEQ(cell, mode="neural-ode")
    with pytest.raises(ValueError, match="T > t0"):
        DEQ(cell, mode="neural_ode", t_span=(1.0, 0.0))
    with pytest.raises(ValueError, match="only applies"):
        DEQ(cell, t_span=(0.0, 1.0))
    with pytest.raises(ValueError, match="Jacobian regularization"):
        DEQ(cell, mode="neural_ode", t_span=(0.0, 1.0), jacobian_regularization="vjp")
    with pytest.raises(ValueError, match="nn.Module"):
        DEQ(lambda z, x: torch.tanh(z + x), mode="neural_ode", t_span=(0.0, 1.0))
    with pytest.raises(ValueError, match="unknown neural-ODE method"):
        NeuralODE(method="euler")
    with pytest.raises(ValueError, match="step_size"):
        NeuralODE(method="rk4")
    with pytest.raises(TypeError):
        NeuralODE(rtoll=1e-3)  # type: ignore[call-arg]
    # a plain callable is fine with backprop gradients
    DEQ(lambda z, x: torch.tanh(z + x), mode=NeuralODE(t_span=(0.0, 1.0), gradient="backprop"))


def test_blow_up_raises_instead_of_returning_nan() -> None:
    class Exploding(nn.Module):
        def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return z * z * 1e3 + x

    deq = DEQ(Exploding(), mode=NeuralODE(t_span=(0.0, 50.0), max_steps=200))
    with pytest.raises(ConvergenceError, match="neural-ODE"):
        deq(torch.ones(2, 3, dtype=DT))


def test_neural_ode_layer_pickles_and_deep_copies() -> None:
    import copy
    import pickle

    deq = DEQ(TanhCell(3), mode="neural_ode", t_span=(0.0, 1.0))
    x = torch.randn(2, 3, dtype=DT)
    for clone in (copy.deepcopy(deq), pickle.loads(pickle.dumps(deq))):
        torch.testing.assert_close(clone(x)[0], deq(x)[0])
