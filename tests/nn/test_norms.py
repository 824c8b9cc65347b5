"""DEQ-aware weight and spectral normalisation utilities."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import mdeq
from mdeq import DEQ, ConvResidualCell, TanhCell
from mdeq.nn import (
    SpectralNormLinear,
    WeightNormConv2d,
    WeightNormLinear,
    apply_spectral_norm,
    apply_weight_norm,
    remove_spectral_norm,
    remove_weight_norm,
)


def test_weight_norm_keeps_the_function_and_round_trips():
    torch.manual_seed(0)
    cell = ConvResidualCell(8, 8, num_groups=4, init_std=0.1)
    lin_cell = TanhCell(5, 3)
    x, z = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    before = cell(z, x)
    apply_weight_norm(cell)
    assert isinstance(cell.conv1, WeightNormConv2d) and any(n.endswith("weight_g") for n, _ in cell.named_parameters())
    torch.testing.assert_close(cell(z, x), before)
    remove_weight_norm(cell)
    assert type(cell.conv1) is nn.Conv2d
    torch.testing.assert_close(cell(z, x), before)
    apply_weight_norm(lin_cell)
    assert isinstance(lin_cell.linear_z, WeightNormLinear)


def test_spectral_norm_bounds_the_gain_and_pickles():
    torch.manual_seed(0)
    cell = TanhCell(16, 4)
    with torch.no_grad():
        cell.linear_z.weight.mul_(5.0)
    apply_spectral_norm(cell)
    assert isinstance(cell.linear_z, SpectralNormLinear)
    sigma = torch.linalg.matrix_norm(cell.linear_z.weight.detach(), ord=2)
    assert abs(float(sigma) - 1.0) < 1e-3
    for clone in (pickle.loads(pickle.dumps(cell)), copy.deepcopy(cell)):
        z, x = torch.randn(3, 16), torch.randn(3, 4)
        torch.testing.assert_close(clone(z, x), cell(z, x))
    remove_spectral_norm(cell)
    assert type(cell.linear_z) is nn.Linear and abs(float(torch.linalg.matrix_norm(cell.linear_z.weight.detach(), ord=2)) - 1.0) < 1e-3


def test_spectral_norm_makes_an_expansive_cell_converge():
    torch.manual_seed(0)
    cell = TanhCell(16, 4)
    with torch.no_grad():
        cell.linear_z.weight.mul_(8.0)
    deq = DEQ(cell, solver="fixed_point", tol=1e-5, max_steps=200, state_shape=(16,), on_divergence="ignore")
    x = torch.randn(6, 4)
    assert not mdeq.diagnose(deq, x).iteration_stable
    apply_spectral_norm(cell)  # ||W|| = 1 and tanh is 1-Lipschitz: f is non-expansive ...
    deq.f = mdeq.Tempered(cell, 0.9)  # ... and 0.9 f is a contraction
    _, sol = deq(x)
    assert sol.all_converged


def test_power_iteration_runs_once_per_solve_not_per_f_call():
    torch.manual_seed(0)
    cell = apply_spectral_norm(TanhCell(8, 3))
    calls = []
    original = cell.linear_z._power_iteration
    cell.linear_z._power_iteration = lambda n: (calls.append(n), original(n))[1]
    deq = DEQ(cell, solver="anderson", tol=1e-6, max_steps=50, state_shape=(8,)).train()
    z, sol = deq(torch.randn(4, 3))
    assert sol.nfe > 3 and len(calls) == 1
    deq.eval()
    deq(torch.randn(4, 3))
    assert len(calls) == 1  # eval: sigma is frozen
