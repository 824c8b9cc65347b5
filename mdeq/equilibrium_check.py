"""Does a trained DEQ have an equilibrium, or only a truncated iterate that happens to classify?

A DEQ trained with too few solver steps and no Jacobian regularization can learn to classify from
an iterate that is nowhere near a fixed point: its accuracy then *falls* when the solver is given
more steps and a tighter tolerance. :func:`equilibrium_check` measures test accuracy, converged
fraction and residual at growing solver budgets, and :func:`equilibrium_verdict` says whether the
equilibrium holds. Model cards record it; ``mdeq test --model NAME --equilibrium-check``
prints it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from mdeq.core.budget import SolverBudget
from mdeq.evaluation import Metrics, evaluate
from mdeq.nn.deq import deq_layers

BUDGET_SCALES: tuple[tuple[int, float], ...] = ((1, 1.0), (2, 0.5), (5, 0.1))
"""(max_steps multiplier, tol multiplier) of each budget, relative to the model's own settings."""

MAX_ACCURACY_DROP = 0.01
"""The largest accuracy loss (fraction) from the model's own budget to the largest one that still
counts as a held equilibrium."""


def default_budgets(model: nn.Module, max_steps: int | None = None, tol: float | None = None) -> list[tuple[int, float]]:
    """The budgets of :data:`BUDGET_SCALES` around ``max_steps`` and ``tol`` (by default the first
    DEQ layer's own)."""
    layers = deq_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no DEQ layer to check")
    steps = max_steps if max_steps is not None else layers[0].max_steps
    tol = tol if tol is not None else layers[0].tol
    return [(int(steps * a), float(tol * b)) for a, b in BUDGET_SCALES]


def equilibrium_verdict(rows: Sequence[dict[str, Any]], max_drop: float = MAX_ACCURACY_DROP) -> dict[str, Any]:
    """Compare the first budget (the model's own) with the largest: the equilibrium holds when
    accuracy drops by at most ``max_drop`` and the mean residual falls. Returns ``holds``,
    ``accuracy_change`` and a one-line ``summary`` that says what to change when it does not hold."""
    if len(rows) < 2:
        raise ValueError("an equilibrium check needs at least two budgets")
    first, last = rows[0], rows[-1]
    change = last["accuracy"] - first["accuracy"]
    residual_falls = last["residual_mean"] < first["residual_mean"]
    holds = change >= -max_drop and residual_falls
    budget = f"{last['max_steps']} steps, tol {last['tol']:g}"
    if holds:
        summary = f"equilibrium holds: at {budget} accuracy changes by {change:+.2%} and the mean residual falls {first['residual_mean']:.3g} -> {last['residual_mean']:.3g}"
    elif not residual_falls:
        summary = (
            f"no equilibrium: the mean residual does not fall with more steps ({first['residual_mean']:.3g} -> {last['residual_mean']:.3g} at {budget}); "
            "the layer diverges or oscillates: run `mdeq doctor` on it"
        )
    else:
        summary = (
            f"equilibrium lost: accuracy falls by {-change:.2%} at {budget}, so the weights rely on the truncated iterate, not on z*; "
            "train with Jacobian regularization (jacobian_weight, or ConvergenceGuard budget_actions: [warn, increase_jacobian])"
        )
    return {"holds": bool(holds), "accuracy_change": float(change), "summary": summary}


def equilibrium_check(
    model: nn.Module,
    data: Any,
    root: str | Path | None = None,
    limit: int | None = None,
    budgets: Sequence[tuple[int, float]] | None = None,
    batch_size: int = 256,
    first_metrics: Metrics | None = None,
) -> dict[str, Any]:
    """:func:`~mdeq.evaluation.evaluate` of ``model`` on ``data`` (a task's test split, its first
    ``limit`` images when given) at each ``(max_steps, tol)`` budget, by default
    :func:`default_budgets`; the budgets go with the calls, the model keeps its own settings.
    ``first_metrics``: the evaluation at the first budget on the same images, when the caller
    already has it (it is not measured again).
    Returns ``{"first_n", "rows", "holds", "accuracy_change", "summary"}``."""
    budgets = list(budgets) if budgets is not None else default_budgets(model)
    rows = []
    num = 0
    for i, (steps, tol) in enumerate(budgets):
        if i == 0 and first_metrics is not None:
            m = first_metrics
        else:
            m = evaluate(model, data, SolverBudget(max_steps=int(steps), tol=float(tol)), root=root, limit=limit, batch_size=batch_size)
        num = m.num_samples
        rows.append(
            {
                "max_steps": int(steps),
                "tol": float(tol),
                "accuracy": m.accuracy,
                "converged_fraction": m.converged_fraction,
                "residual_mean": m.residual_mean,
                "mean_forward_nfe": m.nfe,
            }
        )
    return {"first_n": num, "rows": rows, **equilibrium_verdict(rows)}


def format_check(check: dict[str, Any]) -> str:
    """The check as a small text table plus its verdict."""
    lines = [f"equilibrium check on {check['first_n']} test images", "max_steps  tol       accuracy  converged  residual_mean  f-evals"]
    for r in check["rows"]:
        lines.append(f"{r['max_steps']:>9d}  {r['tol']:<8.3g}  {r['accuracy']:>8.2%}  {r['converged_fraction']:>9.1%}  {r['residual_mean']:>13.4g}  {r['mean_forward_nfe']:>7.1f}")
    lines.append(check["summary"])
    return "\n".join(lines)
