"""A chain of solvers: samples that one solver leaves unconverged are handed to the next."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mdeq.core.solvers.base import Map, Solver, SolverResult
from mdeq.core.solvers.registry import get_solver, register_solver


@register_solver
@dataclass
class FallbackChain(Solver):
    """Run ``solvers`` in turn (e.g. anderson -> broyden -> ode). After each, samples that did not
    converge restart from their best iterate with the next solver; every sample keeps the
    lowest-residual iterate any solver found. The whole batch is evaluated at each stage (f may
    not be separable by sample), so a later stage costs as much as a full solve; ``nfe`` counts
    all of it."""

    name = "fallback"
    solvers: tuple[Any, ...] = field(default_factory=lambda: ("anderson", "broyden", "ode"))

    def __post_init__(self) -> None:
        if isinstance(self.solvers, (str, dict, Solver)) or not isinstance(self.solvers, (tuple, list)):
            raise TypeError(
                f"FallbackChain(solvers=...) takes a sequence of solvers, e.g. ('anderson', 'broyden'); got {self.solvers!r}"
            )
        if not self.solvers:
            raise ValueError("FallbackChain needs at least one solver")
        self.solvers = tuple(get_solver(s) for s in self.solvers)
        if any(isinstance(s, FallbackChain) for s in self.solvers):
            raise ValueError("FallbackChain cannot contain another FallbackChain")

    def solve(self, f: Map, z0: Tensor, **kwargs: Any) -> SolverResult:  # type: ignore[override]
        best: SolverResult | None = None
        nfe = nsteps = 0
        for solver in self.solvers:
            start, origin = (z0, None) if best is None else (best.z, best.origin)
            res = solver.solve(f, start, origin=origin, **kwargs)
            nfe += res.nfe
            nsteps += res.nsteps
            best = res if best is None else _merge(best, res)
            if bool(best.converged.all()):
                break
        assert best is not None
        best.nfe, best.nsteps, best.trace = nfe, nsteps, None
        return best


def _merge(old: SolverResult, new: SolverResult) -> SolverResult:
    """Per sample: the converged result, else the lower residual."""
    take = (~old.converged) & (new.converged | (new.residual < old.residual))
    pick = lambda a, b: torch.where(take.view(-1, *([1] * (a.dim() - 1))), b, a)  # noqa: E731
    return SolverResult(
        z=pick(old.z, new.z),
        residual=pick(old.residual, new.residual),
        abs_residual=pick(old.abs_residual, new.abs_residual),
        rel_residual=pick(old.rel_residual, new.rel_residual),
        converged=old.converged | new.converged,
        diverged=pick(old.diverged, new.diverged) & ~(old.converged | new.converged),
        nonfinite_at_start=old.nonfinite_at_start,
        best_step=pick(old.best_step, new.best_step),
        nfe=0,
        nsteps=0,
        runaway=(_flag(old.runaway, take) | _flag(new.runaway, take)) & ~(old.converged | new.converged),
        origin=old.origin,
    )


def _flag(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if mask is None else mask
