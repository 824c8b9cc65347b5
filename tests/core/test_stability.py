"""The stability of an equilibrium (issue #28): root finders also converge to fixed points that
repel plain iteration; training through them goes to a wrong branch, so the layer says so once."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from mdeq import DEQ
from mdeq.core.errors import ConvergenceError
from mdeq.core.stability import StabilityWarning, equilibrium_stability
from mdeq.models.toy import DEQRegressor


def _linear(a: torch.Tensor, x: torch.Tensor):
    return lambda z: z @ a.T + x


@pytest.mark.parametrize("dim", [1, 3, 12])
def test_spectral_radius_is_exact_for_small_states(dim):
    g = torch.Generator().manual_seed(dim)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    x = torch.randn(4, dim, generator=g, dtype=torch.float64)
    z = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - a, x.T).T  # the (any) fixed point
    stab = equilibrium_stability(_linear(a, x), z)
    ev = torch.linalg.eigvals(a)
    assert stab.exact
    torch.testing.assert_close(stab.spectral_radius, ev.abs().max().expand(4).double(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(stab.rightmost_real, ev.real.max().expand(4).double(), rtol=1e-8, atol=1e-10)


def test_large_states_get_an_arnoldi_estimate_of_the_dominant_eigenvalue():
    dim = 200
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([1.3], dtype=torch.float64), 0.5 * torch.rand(dim - 1, generator=g, dtype=torch.float64)])
    a = q @ torch.diag(spectrum) @ q.T
    x = torch.randn(3, dim, generator=g, dtype=torch.float64)
    stab = equilibrium_stability(_linear(a, x), torch.zeros_like(x), k=20)
    assert not stab.exact
    torch.testing.assert_close(stab.spectral_radius, torch.full((3,), 1.3, dtype=torch.float64), rtol=1e-3, atol=0)
    assert bool(stab.repelling.all())


def forum_toy(slope: float) -> DEQRegressor:
    """The forum's y = 2x model, f(z, x) = a (z + x) + c, initialised with slope a."""
    torch.manual_seed(0)
    model = DEQRegressor(scale=1.0)
    with torch.no_grad():
        model.deq.f.inner.weight.fill_(1.0)
        model.deq.f.outer.weight.fill_(slope / 2)
    return model


def _train(model: nn.Module, steps: int) -> list[warnings.WarningMessage]:
    x = torch.arange(1.0, 11.0)[:, None]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            ((model(x) - 2 * x) ** 2).mean().backward()
            opt.step()
    return [w for w in caught if issubclass(w.category, StabilityWarning)]


def test_forum_toy_with_a_slope_above_one_is_warned_once_before_training_goes_wrong():
    model = forum_toy(1.5)
    caught = _train(model, 40)
    assert len(caught) == 1, [str(w.message) for w in caught]
    msg = str(caught[0].message)
    assert "repelling equilibrium" in msg and "df/dz at z* has spectral radius 1.5" in msg and "real part 1.5 >= 1" in msg
    assert "Tempered(f, scale=0.1)" in msg and "Jacobian regularization" in msg
    assert model.deq.last_stability is not None and float(model.deq.last_stability.spectral_radius.max()) >= 1.0
    # the fix the warning names first works: tempered, the same init trains to the right line
    tempered = forum_toy(1.5)
    with torch.no_grad():
        tempered.deq.f.outer.weight.mul_(0.1)
        tempered.deq.f.outer.bias.mul_(0.1)
    assert _train(tempered, 300) == []
    tempered.eval()
    with torch.no_grad():
        assert abs(float(tempered(torch.tensor([[-5.0]]))) + 10.0) < 1.0


def test_contractive_equilibria_and_evaluation_are_not_checked_or_warned():
    model = forum_toy(0.5)
    assert _train(model, 5) == []
    assert float(model.deq.last_stability.spectral_radius.max()) == pytest.approx(0.5)
    repelling = forum_toy(1.5).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StabilityWarning)
        z, sol = repelling.deq(torch.ones(3, 1))  # eval mode: no check by default
    assert sol.stability is None


def test_an_oscillating_equilibrium_that_the_flow_reaches_is_recorded_not_warned():
    # z = -1.5 z + x: iteration oscillates away (spectral radius 1.5) but the flow is stable
    # (real part -1.5): the ode solver's home ground, not a wrong branch
    deq = DEQ(lambda z, x: -1.5 * z + x, solver="ode", tol=1e-5, max_steps=200, stability="always")
    with warnings.catch_warnings():
        warnings.simplefilter("error", StabilityWarning)
        _, sol = deq(torch.randn(3, 2, requires_grad=True))
    assert bool(sol.converged.all())
    assert not bool(sol.stability.repelling.any()) and not bool(sol.stability.iteration_stable.any())
    torch.testing.assert_close(sol.stability.spectral_radius, torch.full((3,), 1.5, dtype=torch.float64))


def test_always_puts_the_spectrum_on_the_record_and_never_skips_it():
    x = torch.ones(3, 1)
    model = forum_toy(1.5).eval()
    model.deq.stability = "always"
    with pytest.warns(StabilityWarning):
        _, sol = model.deq(x)
    assert sol.stability.spectral_radius.shape == (3,) and bool(sol.stability.repelling.all())
    with warnings.catch_warnings():
        warnings.simplefilter("error", StabilityWarning)
        _, sol = model.deq(x)  # warned once per layer
    assert sol.stability is not None
    never = forum_toy(1.5).train()
    never.deq.stability = "never"
    assert _train(never, 3) == [] and never.deq.last_stability is None


def test_stability_follows_the_divergence_policy():
    model = forum_toy(1.5)
    model.deq.on_divergence = "raise"
    with pytest.raises(ConvergenceError, match="repelling equilibrium"):
        model(torch.ones(2, 1))
    quiet = forum_toy(1.5)
    quiet.deq.on_divergence = "ignore"
    assert _train(quiet, 2) == []


def test_the_check_does_not_move_batch_norm_statistics():
    torch.manual_seed(0)
    cell = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh())

    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = cell

        def forward(self, z, x):
            return 0.2 * self.net(z) + x

    deq = DEQ(Cell(), tol=1e-5, max_steps=50, stability="never").train()
    x = torch.randn(6, 4)
    start = [b.clone() for b in deq.buffers()]
    deq(x)
    plain = [b.clone() for b in deq.buffers()]
    with torch.no_grad():
        for b, r in zip(deq.buffers(), start):
            b.copy_(r)
    deq.stability = "always"
    _, sol = deq(x)
    assert sol.stability is not None and not bool(sol.stability.repelling.any())
    for b, r in zip(deq.buffers(), plain):
        torch.testing.assert_close(b, r)  # the same statistics as a forward without the check


def test_a_layer_with_the_check_pickles_and_copies():
    model = forum_toy(1.5)
    _train(model, 1)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.deq.stability_warned and clone.deq.stability_forwards == 1
