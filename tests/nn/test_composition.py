"""A DEQ layer as a plain function of x: the implicit-layers tutorial's literal gradcheck, a layer
inside nn.Sequential, copies after a forward, and the one-argument-network wrapper."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import mdeq
from mdeq import DEQ, ConvResidualCell, InputInjection, TanhCell


def test_tutorial_gradcheck_literally():
    # the tutorial's acceptance test: torch.autograd.gradcheck(deq, x), with a layer returning z only
    torch.manual_seed(0)
    deq = DEQ(ConvResidualCell(2, 4, num_groups=1), solver="anderson", tol=1e-10, max_steps=500, return_solution=False).double()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(deq, x, eps=1e-6, atol=1e-5)
    assert bool(deq.last_solution.converged.all())


def test_sequential_stem_deq_head_trains_and_keeps_the_record():
    torch.manual_seed(0)
    deq = DEQ(TanhCell(16, weight_scale=0.5), solver="anderson", tol=1e-6, max_steps=60, return_solution=False)
    model = nn.Sequential(nn.Linear(8, 16), deq, nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    assert any(p is deq.f.linear_z.weight for p in model.parameters())
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    sol = deq.last_solution
    assert sol is not None and bool(sol.converged.all()) and sol.backward is not None
    # the same layer gives the same z as its (z, solution) form
    z_only = model[1](model[0](x))
    z_pair, _ = model[1].solve(model[0](x))
    torch.testing.assert_close(z_only, z_pair)


def test_copies_and_pickles_after_a_forward_carry_no_stale_record():
    deq = DEQ(TanhCell(4), return_solution=False)
    deq(torch.randn(3, 4, requires_grad=True)).sum().backward()  # the record now holds a graph
    twin = copy.deepcopy(deq)  # (EMA copies; a non-leaf tensor would refuse to be deep-copied)
    assert twin.last_solution is None and deq.last_solution is not None
    again = pickle.loads(pickle.dumps(deq))
    assert again.last_solution is None and again.return_solution is False
    buf = io.BytesIO()
    torch.save(deq.state_dict(), buf)
    torch.testing.assert_close(twin(torch.ones(1, 4)), deq(torch.ones(1, 4)))


def test_return_solution_is_checked():
    with pytest.raises(TypeError, match="return_solution"):
        DEQ(TanhCell(4), return_solution="no")


def test_default_still_returns_the_pair():
    z, sol = DEQ(TanhCell(4))(torch.randn(2, 4))
    assert z.shape == (2, 4) and sol.converged.shape == (2,)


def test_one_argument_network_error_suggests_a_wrapper_that_keeps_its_parameters():
    g = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with pytest.raises(TypeError, match=r"InputInjection\(Sequential\(\.\.\.\)\).*hide g's parameters"):
        DEQ(g)
    deq = DEQ(InputInjection(g))
    assert {id(p) for p in deq.parameters()} == {id(p) for p in g.parameters()}
    x = torch.randn(3, 4) * 0.1
    z, sol = deq(x)
    assert bool(sol.converged.all())
    torch.testing.assert_close(z, g(z + x), atol=1e-3, rtol=1e-3)
    with pytest.raises(TypeError, match="wraps an nn.Module"):
        InputInjection(torch.tanh)
    assert mdeq.InputInjection is InputInjection
