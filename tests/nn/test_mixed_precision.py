"""Mixed precision: DEQs under ``torch.autocast`` run f in low precision, the solver in full."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import zoo
from mdeq import ConvergenceWarning
from mdeq.nn.cells import ConvResidualCell
from mdeq.nn.deq import DEQ


def _conv_deq(seed: int = 0, tol: float = 1e-2) -> DEQ:
    torch.manual_seed(seed)
    return DEQ(ConvResidualCell(8, 16, num_groups=4), solver="anderson", tol=tol, max_steps=100)


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        z, sol = model(x)
    # A fixed random readout: z^2 would be nearly constant after the cell's final GroupNorm.
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    loss = (z.float() * w).sum()
    loss.backward()
    return z.detach(), sol.converged, [p.grad.clone() for p in model.parameters()]


def test_autocast_keeps_the_solver_state_in_full_precision_and_matches_float32() -> None:
    deq = _conv_deq()
    torch.manual_seed(1)
    x = torch.randn(4, 8, 8, 8)
    z32, conv32, g32 = _loss_and_grads(deq, x, bf16=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x * 1.0  # a plain op keeps float32; a conv would give bfloat16: use the cast autocast does
        zb, solb = deq(xb.to(torch.bfloat16))
    assert zb.dtype == torch.float32, "the equilibrium is returned in the parameters' precision"
    assert bool(solb.converged.all()) and bool(conv32.all())
    assert float(solb.residual.max()) <= 1e-2
    rel = float((zb.detach() - z32).norm() / z32.norm())
    assert rel < 3e-2, f"bf16 equilibrium differs from float32 by {rel:.3g}"
    _, _, gb = _loss_and_grads(deq, x.to(torch.bfloat16), bf16=True)
    for a, b in zip(g32, gb):
        cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert float(cos) > 0.98, f"gradient direction under autocast differs (cosine {float(cos):.4f})"


def test_autocast_whole_models_train_a_step() -> None:
    torch.manual_seed(0)
    for name, shape in (("conv_deq_small", (4, 3, 32, 32)), ("mdeq_digits", (4, 1, 8, 8))):
        model = zoo.create(name).train()
        x = torch.randn(shape)
        y = torch.randint(0, 10, (shape[0],))
        # mdeq_digits' tol (1e-3) is below bfloat16's precision floor: a solve that misses it must say
        # so and name the fix, and nothing else may warn
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, sol = model(x, return_solution=True)
                loss = F.cross_entropy(logits.float(), y)
            loss.backward()
        for w in caught:
            assert issubclass(w.category, ConvergenceWarning) and "autocast in bfloat16" in str(w.message) and "loosen tol" in str(w.message), str(w.message)
        z = sol.z_star if isinstance(sol.z_star, torch.Tensor) else sol.z_star[0]
        assert z.dtype == torch.float32, name
        assert torch.isfinite(loss)
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.requires_grad), name


def test_a_low_precision_z0_is_accepted_under_autocast_and_promoted() -> None:
    deq = _conv_deq()
    x = torch.randn(2, 8, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, sol = deq(x, z0=torch.zeros(2, 8, 8, 8, dtype=torch.bfloat16))
    assert z.dtype == torch.float32 and sol.z0.dtype == torch.float32


def test_mismatched_dtypes_without_autocast_are_still_an_error() -> None:
    deq = _conv_deq()
    with pytest.raises(TypeError, match="autocast"):
        deq(torch.randn(2, 8, 8, 8, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float16 is not autocast's dtype here
        with pytest.raises(TypeError, match="dtype"):
            deq(torch.randn(2, 8, 8, 8, dtype=torch.float16))


def test_a_tolerance_below_the_low_precision_floor_is_explained() -> None:
    torch.manual_seed(0)
    deq = DEQ(ConvResidualCell(8, 16, num_groups=4), solver="anderson", tol=1e-5, max_steps=15)
    x = torch.randn(2, 8, 8, 8)
    with pytest.warns(Warning) as record, torch.autocast("cpu", dtype=torch.bfloat16):
        deq(x.to(torch.bfloat16))
    messages = [str(w.message) for w in record]
    assert any("autocast in bfloat16" in m and "loosen tol" in m for m in messages), messages
    with pytest.warns(Warning) as record:  # the same tolerance in float32: no precision hint
        DEQ(ConvResidualCell(8, 16, num_groups=4), solver="anderson", tol=1e-9, max_steps=3)(x)
    assert not any("autocast" in str(w.message) for w in record)



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point", "newton_krylov"])
@pytest.mark.parametrize("linear_solver", ["dense", "gmres"])
def test_pure_half_precision_models_solve_and_differentiate(dtype, solver, linear_solver):
    """A model wholly in float16/bfloat16 (no autocast) failed inside torch's LU ("lu_cpu" not
    implemented for 'Half') with no hint (issue #28): the small dense systems are solved in float32."""
    from mdeq import DEQ, TanhCell

    torch.manual_seed(0)
    cell = TanhCell(4, 4, weight_scale=0.5)
    x = torch.randn(3, 4)
    reference, _ = DEQ(cell, solver=solver, state_shape=(4,), tol=1e-6, max_steps=60)(x)
    half = DEQ(cell.to(dtype), solver=solver, backward={"name": "implicit", "linear_solver": linear_solver}, state_shape=(4,), tol=2e-2, max_steps=60)
    xh = x.to(dtype).requires_grad_()
    z, sol = half(xh)
    z.float().sum().backward()
    assert z.dtype == dtype and bool(sol.converged.all())
    torch.testing.assert_close(z.float(), reference, rtol=0, atol=0.1)
    assert xh.grad is not None and bool(torch.isfinite(xh.grad).all())
