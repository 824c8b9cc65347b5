"""Deployable DEQs: torch.export of a pretrained classifier at a fixed solver budget equals the
eager model at that budget (any batch size), survives save/load, keeps the shipped accuracy, and
the fixed budget is a per-call setting that leaves the layers untouched."""

from __future__ import annotations

import pytest
import torch

import zoo
from mdeq import DEQ, SolverBudget, solver_budget
from mdeq.deploy import export_program, fixed_budget_outputs, load_program, save_program


@pytest.mark.parametrize("name", ["mdeq_digits", "conv_deq_small_cifar10", pytest.param("deq_mlp_mnist", marks=pytest.mark.slow)])
def test_exported_program_equals_eager_at_the_fixed_budget(name, tmp_path):
    torch.manual_seed(0)
    model = zoo.create(name, pretrained=True)
    shape = zoo.entry(name).input_shape
    steps = 6  # any fixed budget; a short one keeps the export quick (the shipped budget: next test)
    program = export_program(model, torch.randn(2, *shape), max_steps=steps)
    path = save_program(program, tmp_path / f"{name}.pt2")
    assert path.stat().st_mode & 0o777 == 0o644
    loaded = load_program(path).module()
    for batch in (1, 7):
        x = torch.randn(batch, *shape)
        torch.testing.assert_close(loaded(x), fixed_budget_outputs(model, x, max_steps=steps), rtol=0, atol=1e-4)


def test_exported_digits_model_keeps_its_shipped_accuracy():
    from mdeq.data.tasks import get_task

    model = zoo.create("mdeq_digits", pretrained=True)
    program = export_program(model, torch.randn(2, 1, 8, 8)).module()
    ds = get_task("digits").test_set()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    with torch.no_grad():
        early = model(x)
    exported = program(x)
    acc = float((exported.argmax(-1) == y).float().mean())
    assert acc == pytest.approx(zoo.card("mdeq_digits").metrics.test_accuracy, abs=0.003)
    torch.testing.assert_close(exported.softmax(-1), early.softmax(-1), rtol=0, atol=1e-2)  # early stop vs all steps: within tol


def test_fixed_budget_runs_exactly_max_steps_without_host_reads_and_leaves_the_layer_alone():
    from mdeq import TanhCell

    torch.manual_seed(0)
    deq = DEQ(TanhCell(4), solver="anderson", tol=1e-2, max_steps=40)
    x = torch.randn(3, 4)
    _, early = deq(x)
    assert early.nsteps < 40
    with solver_budget(max_steps=25, fixed=True):
        _, fixed = deq(x)
    assert fixed.nsteps == 25
    _, per_call = deq(x, budget=SolverBudget(max_steps=12, fixed=True))
    assert per_call.nsteps == 12
    assert deq.early_stop and deq.check_input and deq.on_divergence == "warn" and deq.max_steps == 40
    with pytest.raises(TypeError, match="fixed must be True, False or None"):
        SolverBudget(fixed="yes")
    nan = torch.full((1, 4), float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        deq(nan)
    with solver_budget(fixed=True):  # no host read: the input is not checked, but the record says it
        _, sol = deq(nan)
    assert not bool(sol.converged.any())


def test_onnx_export_of_a_fixed_point_deq_matches_eager(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from mdeq.deploy import export_onnx
    from mdeq.nn.cells import ConvResidualCell

    torch.manual_seed(0)
    model = DEQ(ConvResidualCell(4, 8, num_groups=2), solver="fixed_point", tol=1e-4, max_steps=6)
    path = export_onnx(model, torch.randn(2, 4, 8, 8), tmp_path / "deq.onnx")
    session = ort.InferenceSession(str(path))
    for batch in (1, 3):
        x = torch.randn(batch, 4, 8, 8)
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), fixed_budget_outputs(model, x), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="anderson solver .* no operator"):
        export_onnx(zoo.create("mdeq_digits", pretrained=True), torch.randn(2, 1, 8, 8), tmp_path / "x.onnx")
