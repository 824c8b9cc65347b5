"""torch.compile: a compiled cell inside the DEQ, and the whole inference forward as one graph."""

from __future__ import annotations

import pytest
import torch

from mdeq.nn.cells import ConvResidualCell
from mdeq.nn.deq import DEQ
from tests.nn.test_mixed_precision import _conv_deq, _loss_and_grads


@pytest.mark.slow
def test_a_torch_compiled_cell_gives_the_eager_equilibrium_and_gradients() -> None:
    """torch.compile of f (what benchmarks/gpu_path.py times on GPU): the implicit backward calls
    the compiled graph's backward repeatedly (retain_graph), which must match eager exactly enough."""
    eager = _conv_deq(tol=1e-6)  # tight solves: the comparison is not blurred by where each stops
    compiled = _conv_deq(tol=1e-6)
    compiled.f = torch.compile(compiled.f)
    torch.manual_seed(1)
    x = torch.randn(4, 8, 8, 8)
    z_e, _, g_e = _loss_and_grads(eager, x, bf16=False)
    z_c, _, g_c = _loss_and_grads(compiled, x, bf16=False)
    torch.testing.assert_close(z_c, z_e, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_e, g_c):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_the_whole_inference_forward_compiles_as_one_graph(solver: str) -> None:
    """With early_stop=False, check_input=False and on_divergence="ignore" the forward has no host
    read: fullgraph=True would raise on any graph break. The compiled result equals eager."""
    torch.manual_seed(0)
    deq = DEQ(ConvResidualCell(8, 16, num_groups=4), solver=solver, tol=1e-3, max_steps=12, early_stop=False,
              check_input=False, on_divergence="ignore").eval()
    x = torch.randn(4, 8, 8, 8)
    with torch.no_grad():
        eager, sol = deq(x)
        compiled = torch.compile(lambda inp: deq(inp)[0], fullgraph=True)(x)
    assert sol.nsteps == 12
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")  # torch's own notice for the call under test
def test_torch_jit_trace_is_refused_with_the_route_that_works() -> None:
    """A trace would freeze one run's data-dependent solve (a fixed-budget trace was seen off by
    9e-3 on another input): refuse loudly instead of returning wrong outputs."""
    from torch import nn

    class ZOnly(nn.Module):
        def __init__(self, deq: DEQ) -> None:
            super().__init__()
            self.deq = deq

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.deq(x)[0]

    torch.manual_seed(0)
    for kw in ({}, dict(early_stop=False, check_input=False, on_divergence="ignore")):
        model = ZOnly(DEQ(ConvResidualCell(8, 16, num_groups=4), tol=1e-3, max_steps=12, **kw)).eval()
        with torch.no_grad(), pytest.raises(RuntimeError, match=r"torch.jit.trace cannot record a DEQ faithfully.*fullgraph=True"):
            torch.jit.trace(model, torch.randn(2, 8, 8, 8))
