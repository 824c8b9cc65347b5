"""The one call every model ends in: solve z = f(z), then wire gradients and diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mdeq.core.backward import Backward, BackwardContext
from mdeq.core.errors import (
    WarningThrottle,
    autocast_dtype,
    check_policy,
    near_misses_only,
    nonconvergence_message,
    report_nonconvergence,
    within_expected_rate,
)
from mdeq.core.jacobian import JacobianRegularization
from mdeq.core.solution import BackwardRecord
from mdeq.core.solvers import Solver, SolverResult

Map = Callable[[Tensor], Tensor]


@dataclass
class EquilibriumResult:
    """Flat result of :func:`solve_equilibrium` (models unpack it into a ``DEQSolution``)."""

    output: Tensor
    forward: SolverResult
    jacobian_loss: Tensor | None
    backward_record: BackwardRecord


def solve_equilibrium(
    f: Map,
    z0: Tensor,
    *,
    solver: Solver,
    backward: Backward,
    tol: float,
    max_steps: int,
    stop_mode: str = "rel",
    divergence_factor: float = 1e2,
    record_trace: bool = False,
    jacobian_regularization: JacobianRegularization | None = None,
    on_divergence: str = "warn",
    describe: str = "forward",
    throttle: WarningThrottle | None = None,
    early_stop: bool = True,
    expected_converged: float | None = None,
) -> EquilibriumResult:
    """Find z* = f(z*) from the flat initial guess ``z0`` (batch, dim) and return z*.

    The output is the solver's returned iterate itself, the one whose residual the record
    reports (``forward.residual``), not one more application of f (which, for an expansive map
    solved by a root finder, would be farther from the equilibrium than reported). The solve
    runs without autograd (except for the unrolled backward). Gradients of the returned output
    follow ``backward``. When ``jacobian_regularization`` is given and autograd
    is on, its estimate at z* is returned, differentiable. Samples that do not converge are
    reported according to ``on_divergence`` ("warn", "raise" or "ignore"); ``throttle`` thins
    out repeated warnings. ``expected_converged`` (a pretrained model's converged fraction at this
    budget, from its card) spares a warning for batches that converge as often as expected.
    """
    check_policy(on_divergence)
    grad_on = torch.is_grad_enabled()
    solve_kwargs = dict(
        tol=tol, max_steps=max_steps, stop_mode=stop_mode, divergence_factor=divergence_factor, record_trace=record_trace,
        early_stop=early_stop,
    )
    if backward.differentiates_solver and grad_on:
        forward = solver.solve(f, z0, **solve_kwargs)  # type: ignore[arg-type]
    else:
        with torch.no_grad():
            forward = solver.solve(f, z0.detach(), **solve_kwargs)  # type: ignore[arg-type]

    def check() -> None:  # once per solve, after the output exists (one host read)
        if on_divergence != "ignore" and not bool(forward.converged.all()):
            if on_divergence == "warn" and (near_misses_only(forward, tol) or within_expected_rate(forward, expected_converged)):
                return
            msg = nonconvergence_message(
                forward,
                what=describe,
                solver=solver.name,
                tol=tol,
                stop_mode=stop_mode,
                max_steps=max_steps,
                low_precision=autocast_dtype(z0.device),
                expected_converged=expected_converged,
            )
            report_nonconvergence(msg, on_divergence, kind=describe, throttle=throttle, solution=forward)

    record = BackwardRecord()
    jacobian_loss = None
    if not grad_on:  # the iterate's f(z) was finite when the solver measured it: no f call here
        check()
        return EquilibriumResult(forward.z, forward, None, record)

    ctx = BackwardContext(
        solver=solver,
        tol=tol,
        max_steps=max_steps,
        stop_mode=stop_mode,
        divergence_factor=divergence_factor,
        record_trace=record_trace,
        on_divergence=on_divergence,
        record=record,
        throttle=throttle,
        early_stop=early_stop,
    )
    need_jacobian = jacobian_regularization is not None
    output, z_leaf, fz_leaf = backward.attach(f, forward.z, ctx, need_jacobian)
    if fz_leaf is not None:  # f evaluated again for the backward (e.g. a stateful f): still finite?
        flag_nonfinite_output(forward, fz_leaf)
    check()
    if jacobian_regularization is not None:
        if z_leaf is None or fz_leaf is None:
            z_leaf = forward.z.detach().requires_grad_()
            fz_leaf = f(z_leaf)
        jacobian_loss = jacobian_regularization(f, z_leaf, fz_leaf)
    return EquilibriumResult(output, forward, jacobian_loss, record)


def flag_nonfinite_output(forward: SolverResult, fz: Tensor) -> None:
    """f evaluated once more at the returned iterate (for the backward's graph) can still give
    NaN/Inf although the solve measured it finite (an f that is not a pure function); such
    samples are not converged, but diverged (``nonfinite_output``): their gradients would be
    NaN. No host read here: the flags stay on the device until the one check of the solve."""
    bad = ~torch.isfinite(fz.detach()).all(dim=1)
    forward.nonfinite_output = bad
    forward.converged = forward.converged & ~bad
    forward.diverged = forward.diverged | bad
