"""The DEQ / SkipDEQ layer: API, tuple states, skip variants, divergence policy, bad input."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from mdeq import (
    DEQ,
    Anderson,
    ConvergenceError,
    ConvergenceWarning,
    ConvResidualCell,
    DEQSolution,
    SkipDEQ,
    TanhCell,
)


def small_deq(**kw):
    return DEQ(TanhCell(6, 3, weight_scale=0.5), state_shape=(6,), **kw)


def test_forward_returns_equilibrium_and_solution():
    deq = small_deq(tol=1e-6)
    x = torch.randn(4, 3)
    z, sol = deq(x)
    assert isinstance(sol, DEQSolution)
    assert z.shape == (4, 6) and sol.z_star is z
    assert sol.residual.shape == (4,) and sol.converged.dtype == torch.bool
    assert sol.all_converged and sol.nfe >= sol.nsteps >= 1
    assert float(sol.residual.max()) <= 1e-6
    assert sol.solver == "anderson"
    torch.testing.assert_close(z, deq.f(z, x), atol=1e-5, rtol=1e-5)
    stats = sol.stats()
    assert stats["converged_fraction"] == 1.0 and stats["nfe"] == sol.nfe
    assert "converged" in sol.summary()


def test_trace_records_every_iteration():
    _, sol = small_deq(record_trace=True, solver="fixed_point", tol=1e-8)(torch.randn(2, 3))
    assert sol.trace.shape == (sol.nsteps, 2)
    assert float(sol.trace[-1].max()) <= 1e-8 < float(sol.trace[0].max())


class TwoScaleCell(nn.Module):
    """A tuple state: a (4,) vector and a (2, 3) matrix coupled both ways."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 4)
        self.x = nn.Linear(3, 4)
        with torch.no_grad():
            self.a.weight.mul_(0.3)
            self.b.weight.mul_(0.3)

    def forward(self, z, x):
        v, m = z
        v_new = torch.tanh(self.b(m.flatten(1)) + self.x(x))
        m_new = torch.tanh(self.a(v)).view(-1, 2, 3) + 0.5 * m
        return v_new, m_new


def solve_tuple_state(backward):
    torch.manual_seed(0)
    cell = TwoScaleCell().double()
    deq = DEQ(cell, backward=backward, state_shape=((4,), (2, 3)), tol=1e-12, max_steps=200)
    x = torch.randn(5, 3, dtype=torch.float64)
    (v, m), sol = deq(x)
    assert v.shape == (5, 4) and m.shape == (5, 2, 3) and sol.all_converged
    fv, fm = cell((v, m), x)
    torch.testing.assert_close(fv, v)
    torch.testing.assert_close(fm, m)
    (v.sum() + m.pow(2).sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in cell.parameters()])
    assert torch.isfinite(grads).all()
    return grads


def test_tuple_state_implicit_matches_unrolled():
    g1 = solve_tuple_state("implicit")
    g2 = solve_tuple_state("unrolled")
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)


def test_default_state_is_shaped_like_x():
    deq = DEQ(ConvResidualCell(8, 8, num_groups=4), tol=1e-3)
    z, sol = deq(torch.randn(2, 8, 5, 5))
    assert z.shape == (2, 8, 5, 5) and sol.all_converged


def test_warm_start_from_z0():
    deq = small_deq(tol=1e-5)
    x = torch.randn(3, 3)
    z, sol = deq(x)
    z2, sol2 = deq(x, z0=z.detach())
    assert sol2.nfe < sol.nfe


def test_skip_deq_trains_its_init_net():
    init_net = nn.Linear(3, 6)
    deq = SkipDEQ(TanhCell(6, 3, weight_scale=0.5), init_net, state_shape=(6,))
    assert isinstance(deq, DEQ) and deq.learned_init
    z, sol = deq(torch.randn(4, 3))
    assert sol.skip_loss is not None and sol.skip_loss.requires_grad
    sol.skip_loss.backward()
    assert init_net.weight.grad is not None and init_net.weight.grad.abs().sum() > 0


def test_skip_reg_uses_f_of_zero():
    cell = TanhCell(6, 3, weight_scale=0.5)
    deq = SkipDEQ(cell, None, state_shape=(6,))
    x = torch.randn(4, 3)
    _, sol = deq(x)
    torch.testing.assert_close(sol.z0, cell(torch.zeros(4, 6), x))
    sol.skip_loss.backward()
    assert cell.linear_x.weight.grad is not None


def test_skip_loss_pushes_init_toward_equilibrium():
    torch.manual_seed(0)
    init_net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 6))
    deq = SkipDEQ(TanhCell(6, 3, weight_scale=0.5), init_net, state_shape=(6,), tol=1e-6)
    opt = torch.optim.Adam(init_net.parameters(), lr=1e-2)
    x = torch.randn(64, 3)
    first = None
    for _ in range(150):
        _, sol = deq(x)
        opt.zero_grad()
        sol.skip_loss.backward()
        opt.step()
        first = first if first is not None else (float(sol.skip_loss.detach()), sol.nfe)
    assert float(sol.skip_loss.detach()) < 0.1 * first[0]
    assert sol.nfe < first[1]


# ---- non-convergence policy -----------------------------------------------------------------
class Expansive(nn.Module):
    def forward(self, z, x):
        return 2 * z + x


def test_expansive_map_warns_by_default():
    deq = DEQ(Expansive(), solver="fixed_point", max_steps=30)
    with pytest.warns(ConvergenceWarning, match=r"did not converge for 3/3 samples.*diverged.*What to try"):
        z, sol = deq(torch.randn(3, 4))
    assert not sol.converged.any() and sol.diverged.all() and sol.nsteps <= 10
    assert torch.isfinite(z).all()


def test_expansive_map_raises_when_asked():
    deq = DEQ(Expansive(), solver="fixed_point", max_steps=30, on_divergence="raise")
    with pytest.raises(ConvergenceError) as info:
        deq(torch.randn(3, 4))
    msg = str(info.value)
    for needle in ("solver=fixed_point", "steps", "residual", "diverged", "scale f down", "Jacobian regularization"):
        assert needle in msg, needle
    assert info.value.solution is not None


def test_ignore_policy_is_silent_but_recorded():
    deq = DEQ(Expansive(), solver="fixed_point", max_steps=30, on_divergence="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, sol = deq(torch.randn(3, 4))
    assert not sol.converged.any()


def test_nan_from_f_is_never_silent():
    class NaNCell(nn.Module):
        def forward(self, z, x):
            return z * float("nan") + x

    with pytest.raises(ConvergenceError, match="NaN/Inf at its very first evaluation"):
        DEQ(NaNCell(), on_divergence="raise")(torch.randn(2, 3))


def test_budget_exhausted_message_suggests_more_steps():
    deq = DEQ(TanhCell(6, 3, weight_scale=0.9), solver="fixed_point", state_shape=(6,), tol=1e-12, max_steps=8, record_trace=True)
    with pytest.warns(ConvergenceWarning, match="ran out of steps.*more steps"):
        deq(torch.randn(2, 3))


# ---- bad input --------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    deq = small_deq()
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="floating point"):
        deq(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="x has dtype torch.float64 but f's parameters have dtype torch.float32"):
        deq(x.double())
    with pytest.raises(TypeError, match="x has dtype torch.float32 but the initial state z0 has dtype torch.float64"):
        deq(x, z0=torch.zeros(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z0 has the wrong shape: expected \(B, 6\), got tensor of shape \(4, 5\)"):
        deq(x, z0=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="x has batch size 4 but the initial state z0 has batch size 3"):
        deq(x, z0=torch.zeros(3, 6))
    with pytest.raises(ValueError, match="x is on cpu but the initial state z0 is on meta"):
        deq(x, z0=torch.zeros(4, 6, device="meta"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        deq(torch.full((4, 3), float("nan")))


def test_wrong_output_shape_of_f_is_named():
    class Shrinks(nn.Module):
        def forward(self, z, x):
            return z[:, :2] + x[:, :2]

    with pytest.raises(ValueError, match=r"output of f\(z, x\) has the wrong shape: expected \(B, 3\)"):
        DEQ(Shrinks())(torch.randn(2, 3))


def test_bad_construction_gives_clear_errors():
    cell = TanhCell(6, 3)
    with pytest.raises(TypeError, match=r"f must be callable as f\(z, x\)"):
        DEQ(nn.Linear(3, 3))
    with pytest.raises(TypeError, match=r"f must be callable as f\(z, x\)"):
        DEQ(lambda z, x, p, t: z)
    with pytest.raises(ValueError, match="unknown solver 'broyde'.*'broyden'"):
        DEQ(cell, solver="broyde")
    with pytest.raises(ValueError, match="unknown backward mode 'implicitt'.*'implicit'"):
        DEQ(cell, backward="implicitt")
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_step'"):
        DEQ(cell, max_step=10)
    with pytest.raises(ValueError, match="on_divergence"):
        DEQ(cell, on_divergence="warning")
    with pytest.raises(ValueError, match="stop_mode"):
        DEQ(cell, stop_mode="relative")
    with pytest.raises(ValueError, match="init must be one of"):
        DEQ(cell, init="ones")
    with pytest.raises(ValueError, match="unknown option 'memroy' for solver 'broyden'"):
        DEQ(cell, solver={"name": "broyden", "memroy": 5})


def test_batch_of_one_and_empty_batch():
    deq = small_deq(tol=1e-6)
    z, sol = deq(torch.randn(1, 3))
    assert z.shape == (1, 6) and sol.all_converged
    z, sol = deq(torch.randn(0, 3))
    assert z.shape == (0, 6) and sol.residual.shape == (0,)


# ---- pickling and copying (ddp_spawn, EMA) ------------------------------------------------------
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_deq_can_be_pickled_and_copied(how):
    deq = DEQ(TanhCell(6, 3, weight_scale=0.5), solver=Anderson(m=4), backward="implicit", jacobian_regularization="vjp", state_shape=(6,))
    clone = pickle.loads(pickle.dumps(deq)) if how == "pickle" else copy.deepcopy(deq)
    x = torch.randn(3, 3)
    deq.eval()
    clone.eval()
    torch.testing.assert_close(deq(x)[0], clone(x)[0])
    assert clone.solver == Anderson(m=4)


def test_state_dict_round_trip():
    a, b = small_deq(), small_deq()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3)
    torch.testing.assert_close(a(x)[0], b(x)[0])


# ---- the classic toy: y = 2x ------------------------------------------------------------------
class ToyCell(nn.Module):
    """f(z, x) = scale * Linear(2,1)(Linear(1,2)(z + x)): the forum's model, tempered by scale."""

    def __init__(self, scale: float = 0.1):
        super().__init__()
        self.inner = nn.Linear(1, 2)
        self.outer = nn.Linear(2, 1)
        self.scale = scale

    def forward(self, z, x):
        return self.scale * self.outer(self.inner(z + x))


def test_toy_deq_learns_y_equals_2x():
    torch.manual_seed(0)
    deq = DEQ(ToyCell(0.1), solver="anderson", tol=1e-6, max_steps=100, on_divergence="raise").double()
    x = torch.arange(1.0, 11.0, dtype=torch.float64)[:, None]
    y = 2 * x
    opt = torch.optim.Adam(deq.parameters(), lr=0.02)
    for _ in range(1000):
        z, _ = deq(x)
        loss = (z - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    deq.eval()
    with torch.no_grad():
        pred, sol = deq(torch.tensor([[-5.0]], dtype=torch.float64))
    assert sol.all_converged
    assert abs(float(pred) + 10.0) < 0.1, float(pred)


def test_repeated_warnings_are_thinned_and_point_at_the_caller():
    deq = DEQ(Expansive(), solver="fixed_point", max_steps=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(8):
            deq(torch.randn(2, 3))
    msgs = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(msgs) == 4  # occurrences 1, 2, 4, 8
    assert "#8" in str(msgs[-1].message)
    assert all(w.filename == __file__ for w in msgs)


@pytest.mark.parametrize("backend", ["vjp", "jvp", "finite_diff"])
def test_an_empty_batch_gives_zero_auxiliary_losses_not_nan(backend):
    """Issue #28's sweep: batch size 0 gave NaN skip and Jacobian losses (a mean over nothing)."""
    from mdeq import SkipDEQ, TanhCell

    deq = SkipDEQ(TanhCell(4, 4), nn.Linear(4, 4), state_shape=(4,), jacobian_regularization=backend).train()
    z, sol = deq(torch.randn(0, 4))
    assert z.shape == (0, 4) and sol.skip_loss.item() == 0.0 and sol.jacobian_loss.item() == 0.0
    (sol.skip_loss + sol.jacobian_loss).backward()  # still differentiable
    full_z, full = deq(torch.randn(3, 4))
    assert full.skip_loss.item() > 0 and full.jacobian_loss.item() > 0
