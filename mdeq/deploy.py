"""Deployable DEQs: a model exported as a static graph at a fixed solver budget.

A DEQ's solve normally stops when every sample is within tol: a data-dependent loop that no
graph exporter can capture faithfully (``torch.jit.trace`` would freeze one input's stopping
step; mdeq refuses it). At a *fixed budget* (:class:`~mdeq.core.budget.SolverBudget` with
``fixed=True``) the solver runs exactly ``max_steps`` iterations with no host read, so the whole
forward is one graph: ``torch.export`` captures it, and so can the ONNX exporter.

>>> program = export_program(model, torch.randn(1, 3, 32, 32))          # the layer's max_steps
>>> logits = program.module()(images)                                    # any batch size
>>> save_program(program, "model.pt2"); program = load_program("model.pt2")

The exported model always runs all ``max_steps`` iterations (an early-stopping solve may stop
sooner); the solver returns its lowest-residual iterate either way, so the two agree to the
solver's tolerance, and the exported graph equals the eager model run at the same fixed budget
(tests/test_deploy.py checks both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdeq.core.budget import solver_budget


ONNX_UNSUPPORTED_SOLVERS = frozenset({"anderson", "newton_krylov"})
"""Solvers whose steps use linear algebra ONNX has no operator for (torch.linalg.solve_ex in
Anderson, solve_triangular in GMRES). fixed_point is checked to export (tests/test_deploy.py)."""


class LogitsOnly(nn.Module):
    """``model(x)`` as a graph-friendly module: the first output when the model returns a tuple
    (a DEQ layer's ``(z, solution)``), the output itself otherwise."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out


def export_program(model: nn.Module, example: Tensor, *, max_steps: int | None = None, dynamic_batch: bool = True) -> Any:
    """``torch.export`` of ``model`` in eval mode at a fixed solver budget (``max_steps``
    iterations of every DEQ layer; None keeps each layer's own). With ``dynamic_batch`` the
    program takes any batch size (``example`` needs a batch of at least 2 for that)."""
    if not isinstance(example, Tensor) or example.dim() < 1:
        raise TypeError(f"example must be a batched input tensor, got {type(example).__name__}")
    was_training = model.training
    model.eval()
    try:
        wrapped = LogitsOnly(model)
        shapes = None
        if dynamic_batch:
            if example.shape[0] < 2:
                example = torch.cat([example, example])  # export specialises a batch of 1
            shapes = {"x": {0: torch.export.Dim("batch", min=1)}}
        with torch.no_grad(), solver_budget(max_steps=max_steps, fixed=True):
            return torch.export.export(wrapped, (example,), dynamic_shapes=shapes)
    finally:
        model.train(was_training)


def fixed_budget_outputs(model: nn.Module, x: Tensor, *, max_steps: int | None = None) -> Tensor:
    """What the exported program computes, run eagerly: ``model(x)`` in eval mode at the same fixed budget."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), solver_budget(max_steps=max_steps, fixed=True):
            return LogitsOnly(model)(x)
    finally:
        model.train(was_training)


def save_program(program: Any, path: str | Path) -> Path:
    """Write an exported program (``.pt2``; readable by all, like shipped weights)."""
    path = Path(path)
    torch.export.save(program, str(path))
    path.chmod(0o644)
    return path


def load_program(path: str | Path) -> Any:
    """Read a program written by :func:`save_program` (``torch.export.load``: a graph and its
    tensors, no pickled Python code is executed)."""
    return torch.export.load(str(path))


def export_onnx(model: nn.Module, example: Tensor, path: str | Path, *, max_steps: int | None = None) -> Path:
    """ONNX of ``model`` at a fixed solver budget, through torch's dynamo-based exporter (needs the
    ``onnx`` and ``onnxscript`` packages: ``pip install mdeq[deploy]``)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(f"ONNX export needs the onnx and onnxscript packages ({err.name} is missing): pip install 'mdeq[deploy]'") from err
    from mdeq.nn.deq import deq_layers

    blocked = sorted({d.solver.name for d in deq_layers(model) if d.solver.name in ONNX_UNSUPPORTED_SOLVERS})
    if blocked:
        raise ValueError(
            f"ONNX export: the {', '.join(blocked)} solver solves a small least-squares system each step "
            "(torch.linalg.solve), for which ONNX has no operator. Export with export_program (torch.export, .pt2) "
            "instead, or build the model with solver='fixed_point' (an ONNX-friendly solver that may need more steps)."
        )
    program = export_program(model, example, max_steps=max_steps)
    path = Path(path)
    onnx_program = torch.onnx.export(program, (example,), dynamo=True)
    onnx_program.save(str(path))
    path.chmod(0o644)
    return path
