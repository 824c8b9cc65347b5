"""Residual-vs-iteration figures (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _band(ax: Any, trace: Tensor, label: str | None = None, evals_per_step: float | None = None) -> None:
    t = trace.detach().float().cpu().clamp_min(1e-12)
    steps = torch.arange(1, t.shape[0] + 1) * (evals_per_step or 1.0)
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9]), dim=1)
    line = ax.plot(steps, q[1], label=f"{label} (median)" if label else "median")[0]
    ax.fill_between(steps, q[0], q[2], alpha=0.2, color=line.get_color(), label=None if label else "10-90% of samples")


def residual_figure(forward: Tensor, backward: Tensor | None, title: str = "") -> Any:
    """Median and 10-90% band of the per-sample relative residual per iteration (log scale)."""
    plt = _pyplot()
    panels = [("forward", forward)] + ([("backward", backward)] if backward is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (name, trace) in zip(axes[0], panels):
        _band(ax, trace)
        _style(ax, f"{name} solve")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def solver_comparison_figure(
    forward: Mapping[str, Tensor],
    backward: Mapping[str, Tensor],
    title: str = "",
    nfe: Mapping[str, Mapping[str, int]] | None = None,
    tol: float | None = None,
) -> Any:
    """One line (median, with a 10-90% band) per solver, forward and backward panels. With ``nfe``
    (``{"forward": {solver: f-evaluations}, "backward": {...}}``) the x axis is the cost in
    f-evaluations (each solve's total spread evenly over its iterations: solvers that call f
    several times per iteration, Newton-Krylov or the ODE solver, are drawn at their true cost);
    ``tol`` draws the stopping tolerance."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    for ax, (name, traces) in zip(axes[0], (("forward", forward), ("backward", backward))):
        costs = (nfe or {}).get(name, {})
        for solver, trace in traces.items():
            per_step = costs[solver] / trace.shape[0] if costs.get(solver) and trace.shape[0] else None
            _band(ax, trace, solver, per_step)
        if tol is not None:
            ax.axhline(tol, color="k", linestyle="--", linewidth=1, label=f"tol {tol:g}")
        _style(ax, f"{name} solve", xlabel="f-evaluations" if nfe else "iteration")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _style(ax: Any, title: str, xlabel: str = "iteration") -> None:
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("relative residual")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def log_figure(fig: Any, loggers: Iterable[Any], step: int, key: str = "residual_trace", fallback_path: str | Path | None = None) -> str:
    """Log ``fig`` to the first W&B or TensorBoard logger among ``loggers`` (Lightning loggers);
    without one, save it as a PNG at ``fallback_path``. Returns where it went."""
    for logger in loggers:
        name = type(logger).__name__
        if "Wandb" in name:
            import wandb

            logger.experiment.log({key: wandb.Image(fig), "trainer/global_step": step})
            return "wandb"
        if "TensorBoard" in name:
            logger.experiment.add_figure(key, fig, global_step=step)
            return "tensorboard"
    if fallback_path is None:
        return "nowhere"
    path = Path(fallback_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return str(path)
