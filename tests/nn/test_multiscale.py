"""MultiScaleDEQ: construction, the DeepEquilibriumNetworks.jl example, gradients, skip variants."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mdeq import DEQ, MultiScaleDEQ, MultiScaleSkipDEQ
from mdeq.nn import MultiScaleMap


class InjectedDense(nn.Module):
    """Scale 0's main layer: tanh(A z + B x) (DEQ.jl's Parallel(+, Dense, Dense) with tanh)."""

    def __init__(self, dim):
        super().__init__()
        self.a, self.b = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, z, x):
        return torch.tanh(self.a(z) + self.b(x))


def dense(i, o):
    return nn.Sequential(nn.Linear(i, o), nn.Tanh())


def julia_doc_example(**kw):
    sizes = [4, 3, 2, 1]
    main = (InjectedDense(4),) + tuple(dense(k, k) for k in sizes[1:])
    mapping = [[None if i == j else dense(sizes[i], sizes[j]) for j in range(4)] for i in range(4)]
    return MultiScaleDEQ(main, mapping, None, "anderson", ((4,), (3,), (2,), (1,)), **kw)


def test_deq_jl_documentation_example():
    model = julia_doc_example(tol=1e-5, max_steps=100)
    zs, sol = model(torch.randn(12, 4))
    assert tuple(z.shape for z in zs) == ((12, 4), (12, 3), (12, 2), (12, 1))
    assert sol.all_converged
    assert isinstance(model, DEQ)
    fz = model.f(zs, torch.randn(12, 4))
    assert len(fz) == 4


def test_one_step_follows_the_definition():
    """new z_j = post_fuse_j(sum_i mapping[i][j](main_i(z_i)))."""
    torch.manual_seed(0)
    main = (InjectedDense(3), dense(2, 2))
    m01, m10 = nn.Linear(3, 2), nn.Linear(2, 3)
    post = (nn.Tanh(), None)
    cell = MultiScaleMap(main, [[None, m01], [m10, None]], post)
    z, x = (torch.randn(5, 3), torch.randn(5, 2)), torch.randn(5, 3)
    y0, y1 = main[0](z[0], x), main[1](z[1])
    out = cell(z, x)
    torch.testing.assert_close(out[0], torch.tanh(y0 + m10(y1)))
    torch.testing.assert_close(out[1], m01(y0) + y1)


def test_off_diagonal_none_means_no_connection():
    main = (InjectedDense(3), dense(2, 2))
    m01 = nn.Linear(3, 2)
    cell = MultiScaleMap(main, [[None, m01], [None, None]])
    z, x = (torch.randn(5, 3), torch.randn(5, 2)), torch.randn(5, 3)
    torch.testing.assert_close(cell(z, x)[0], main[0](z[0], x))


def test_construction_errors_are_clear():
    main = (InjectedDense(3), dense(2, 2))
    with pytest.raises(ValueError, match=r"n x n matrix for n = 2 main layers"):
        MultiScaleDEQ(main, [[None, None, None], [None, None, None]], scales=((3,), (2,)))
    with pytest.raises(ValueError, match=r"n x n matrix for n = 2"):
        MultiScaleDEQ(main, [[None, None]], scales=((3,), (2,)))
    with pytest.raises(ValueError, match="scales lists 3 shapes but there are 2 main layers"):
        MultiScaleDEQ(main, [[None, None], [None, None]], scales=((3,), (2,), (1,)))
    with pytest.raises(ValueError, match="post_fuse_layers needs one entry per scale"):
        MultiScaleDEQ(main, [[None, None], [None, None]], post_fuse_layers=(None,), scales=((3,), (2,)))
    with pytest.raises(TypeError, match=r"mapping_layers\[0\]\[1\] must be an nn.Module"):
        MultiScaleDEQ(main, [[None, "conv"], [None, None]], scales=((3,), (2,)))
    with pytest.raises(TypeError, match=r"f\(z, x\)"):
        MultiScaleDEQ((dense(3, 3), dense(2, 2)), [[None, None], [None, None]], scales=((3,), (2,)))
    with pytest.raises(ValueError, match="scales must be a tuple of per-sample shapes"):
        MultiScaleDEQ(main, [[None, None], [None, None]], scales=(3, 2))
    with pytest.raises(TypeError, match="takes scales"):
        MultiScaleDEQ(main, [[None, None], [None, None]], state_shape=((3,), (2,)))


def test_wrong_state_shape_is_named():
    model = julia_doc_example()
    bad = (torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"expected \(\(B, 4\), \(B, 3\), \(B, 2\), \(B, 1\)\)"):
        model(torch.randn(2, 4), z0=bad)


class SmoothConvScale0(nn.Module):
    """Contractive in z (scaled conv, tanh); GroupNorm on the injection."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.inj, self.norm = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.GroupNorm(2, c)

    def forward(self, z, x):
        return torch.tanh(0.3 * self.conv(z) + self.norm(self.inj(x)))


class SmoothConv(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, z):
        return torch.tanh(0.3 * self.conv(z))


class Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, y):
        return 0.3 * F.interpolate(self.conv(y), scale_factor=2, mode="nearest")


def two_scale_conv(**kw):
    torch.manual_seed(3)
    c = 4
    main = (SmoothConvScale0(c), SmoothConv(c))
    down = nn.Sequential(nn.Conv2d(c, c, 3, stride=2, padding=1), nn.Tanh(), nn.GroupNorm(2, c))
    mapping = [[None, down], [Up(c), None]]
    return MultiScaleDEQ(main, mapping, None, "anderson", ((c, 4, 4), (c, 2, 2)), tol=1e-12, max_steps=200, on_divergence="raise", **kw)


def test_gradcheck_two_scale_conv():
    model = two_scale_conv().double()
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def fn(x, *ps):
        zs, _ = functional_call(model, dict(zip(names, ps)), (x,))
        return torch.cat([z.flatten(1) for z in zs], dim=1)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_implicit_equals_unrolled_for_multiscale_state():
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    grads = []
    for solver, backward in (("anderson", "implicit"), ("fixed_point", "unrolled")):
        model = two_scale_conv(backward=backward).double()
        model.solver = __import__("mdeq").get_solver(solver)
        zs, _ = model(x)
        (zs[0].pow(2).sum() + zs[1].sin().sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).norm() / grads[1].norm() < 1e-6


def test_multiscale_skip_deq_and_skip_reg():
    sizes = [4, 3, 2, 1]
    main = (InjectedDense(4),) + tuple(dense(k, k) for k in sizes[1:])
    mapping = [[None if i == j else dense(sizes[i], sizes[j]) for j in range(4)] for i in range(4)]
    init_layers = [nn.Linear(4, k) for k in sizes]
    model = MultiScaleSkipDEQ(main, mapping, None, "anderson", tuple((k,) for k in sizes), init_layers=init_layers, tol=1e-5)
    x = torch.randn(6, 4)
    zs, sol = model(x)
    assert len(sol.z0) == 4 and sol.skip_loss is not None
    sol.skip_loss.backward()
    assert all(layer.weight.grad is not None for layer in init_layers)
    reg = MultiScaleSkipDEQ(main, mapping, None, "anderson", tuple((k,) for k in sizes), tol=1e-5)
    zs, sol = reg(x)
    torch.testing.assert_close(sol.z0[2], reg.f(tuple(torch.zeros(6, k) for k in sizes), x)[2])
    with pytest.raises(ValueError, match="init_layers needs one module per scale"):
        MultiScaleSkipDEQ(main, mapping, None, "anderson", tuple((k,) for k in sizes), init_layers=init_layers[:2])


def test_every_solver_and_jacobian_regularization_on_tuple_state():
    for solver in ("fixed_point", "anderson", "broyden", "newton_krylov"):
        model = julia_doc_example(tol=1e-5, max_steps=200, jacobian_regularization="vjp")
        model.solver = __import__("mdeq").get_solver(solver)
        zs, sol = model(torch.randn(5, 4))
        assert sol.all_converged, solver
        (sum(z.sum() for z in zs) + sol.jacobian_loss).backward()


def test_multiscale_deq_pickles():
    model = julia_doc_example(tol=1e-5).eval()
    x = torch.randn(3, 4)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        clone.eval()
        for a, b in zip(model(x)[0], clone(x)[0]):
            torch.testing.assert_close(a, b)


def test_unrolled_pretraining_mode():
    model = julia_doc_example(tol=1e-5)
    zs, sol = model(torch.randn(4, 4), unroll=6)
    assert sol.solver == "unrolled(6)" and sol.nfe == 7  # 6 applications of f, one more measures the last iterate
    # convergence is judged against the layer's own tol (it ran exactly 6 steps, tol or not)
    assert sol.tol == 1e-5 and torch.equal(sol.converged, (sol.residual <= 1e-5) & ~sol.diverged)
    _, long = model(torch.randn(4, 4), unroll=80)
    assert long.nfe == 81 and bool(long.converged.all()), long.residual
    assert not bool(model(torch.randn(4, 4), unroll=1)[1].converged.any())
    sum(z.sum() for z in zs).backward()
    assert model.f.main_layers[0].a.weight.grad is not None
    with pytest.raises(ValueError, match="unroll must be a positive number"):
        model(torch.randn(4, 4), unroll=0)
