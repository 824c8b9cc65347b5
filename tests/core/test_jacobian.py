"""The Hutchinson Jacobian estimate against the exact ||J||_F^2 / dim."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mdeq import DEQ, JacobianRegularization, TanhCell
from mdeq.core.jacobian import get_jacobian_regularization, jacobian_frobenius


class LinearCell(nn.Module):
    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, z, x):
        return z @ self.a.T + x


@pytest.mark.parametrize("backend", ["vjp", "jvp", "finite_diff"])
def test_estimate_matches_exact_frobenius_norm(backend):
    dim, batch, probes = 10, 256, 16
    a = torch.randn(dim, dim, dtype=torch.float64) * 0.3
    cell = LinearCell(a)
    x = torch.randn(batch, dim, dtype=torch.float64)
    z = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
    f = lambda q: cell(q, x)  # noqa: E731
    est = jacobian_frobenius(f, z, f(z), backend=backend, n_probes=probes)
    value = float(est.detach())
    exact = float(a.pow(2).sum()) / dim
    # For Gaussian probes Var(eps^T M eps) = 2 ||M||_F^2 with M = A^T A (or A A^T).
    sigma = math.sqrt(2.0) * float(torch.linalg.matrix_norm(a.T @ a)) / dim / math.sqrt(batch * probes)
    assert abs(value - exact) < 5 * sigma, (value, exact, sigma)
    est.backward()
    grad = cell.a.grad
    assert grad is not None and torch.isfinite(grad).all()
    # d/dA ||A||_F^2 / dim = 2 A / dim: the stochastic gradient points that way.
    cos = torch.nn.functional.cosine_similarity(grad.flatten(), a.flatten(), dim=0)
    assert cos > 0.9


def test_deq_reports_jacobian_loss_in_training_only():
    cell = TanhCell(6, 3, weight_scale=0.5)
    deq = DEQ(cell, jacobian_regularization=JacobianRegularization(n_probes=2), state_shape=(6,))
    x = torch.randn(4, 3)
    _, sol = deq(x)
    assert sol.jacobian_loss is not None and sol.jacobian_loss.requires_grad
    sol.jacobian_loss.backward()
    assert cell.linear_z.weight.grad is not None
    deq.eval()
    _, sol = deq(x)
    assert sol.jacobian_loss is None


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unrolled"])
def test_jacobian_loss_with_every_backward(backward):
    deq = DEQ(TanhCell(6, 3, weight_scale=0.5), backward=backward, jacobian_regularization="vjp", state_shape=(6,))
    z, sol = deq(torch.randn(4, 3))
    (z.sum() + sol.jacobian_loss).backward()
    assert float(sol.jacobian_loss.detach()) > 0


def test_jacobian_spec_parsing():
    assert get_jacobian_regularization(None) is None
    assert get_jacobian_regularization(True).backend == "vjp"
    assert get_jacobian_regularization("jvp").backend == "jvp"
    assert get_jacobian_regularization({"backend": "finite_diff", "n_probes": 3}).n_probes == 3
    with pytest.raises(ValueError, match="backend must be one of"):
        get_jacobian_regularization("jacobian")
    with pytest.raises(ValueError, match="bad jacobian_regularization options"):
        get_jacobian_regularization({"probes": 3})
