"""The solution record returned with every equilibrium."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mdeq.core.packing import State

if TYPE_CHECKING:  # (equilibrium imports this module)
    from mdeq.core.equilibrium import EquilibriumResult
    from mdeq.core.packing import StatePacker


@dataclass
class BackwardStats:
    """Statistics of the backward pass, filled in when backward runs."""

    mode: str
    solver: str | None = None
    nfe: int = 0
    nsteps: int = 0
    residual: Tensor | None = None
    converged: Tensor | None = None
    trace: Tensor | None = None


@dataclass
class BackwardRecord:
    """Holder the backward pass writes into (kept apart from the solution to avoid cycles)."""

    stats: BackwardStats | None = None


@dataclass
class DEQSolution:
    """Everything known about one equilibrium solve (cf. DeepEquilibriumNetworks.jl).

    Tensors have a leading batch dimension; ``z_star`` and ``z0`` have the state's structure
    (a tensor, or a tuple of per-scale tensors).
    """

    z_star: State
    """The equilibrium z*: the solver's returned iterate, the one whose residual is reported
    (not one more application of f), carrying gradients as chosen by the backward mode."""
    z0: State
    """The initial guess."""
    residual: Tensor
    """Relative residual ||f(z*) - z*|| / ||f(z*)|| per sample of the returned ``z_star``."""
    abs_residual: Tensor
    """Absolute residual ||f(z) - z|| per sample."""
    nfe: int
    """Number of (batched) f evaluations of the forward solve."""
    nsteps: int
    """Solver iterations run."""
    converged: Tensor
    """Per-sample bool: residual within tolerance."""
    diverged: Tensor
    """Per-sample bool: stopped early on NaN/Inf or residual blow-up."""
    solver: str
    """Name of the forward solver."""
    tol: float
    stop_mode: str
    jacobian_loss: Tensor | None = None
    """Hutchinson estimate of ||df/dz||_F^2 / dim at z* (differentiable), when enabled."""
    skip_loss: Tensor | None = None
    """Mean squared distance between a learned initial guess and z* (skip-DEQ), when present."""
    trace: Tensor | None = None
    """Forward residual per iteration, shape (nsteps, batch), when ``record_trace``."""
    backward_record: BackwardRecord = field(default_factory=BackwardRecord, repr=False)
    stability: Any = field(default=None, repr=False)
    """The spectrum of df/dz at z* (:class:`mdeq.core.stability.Stability`), when the layer's
    ``stability`` setting checked it on this forward."""

    @classmethod
    def from_result(
        cls,
        result: "EquilibriumResult",
        packer: "StatePacker",
        z0: State,
        *,
        solver: str,
        tol: float,
        stop_mode: str,
        recheck: bool = False,
        skip_loss: Tensor | None = None,
        stability: Any = None,
    ) -> "DEQSolution":
        """The record of one solve (the only place one is built). ``recheck``: the run did not stop
        on ``tol`` itself (an unrolled pass, a neural-ODE integration), so ``converged`` is decided
        here from the returned state's residual: within ``tol`` in ``stop_mode``, finite, not diverged."""
        fwd = result.forward
        converged = fwd.converged
        if recheck:
            residual = fwd.rel_residual if stop_mode == "rel" else fwd.abs_residual
            converged = (residual <= tol) & torch.isfinite(fwd.abs_residual) & ~fwd.diverged
        return cls(
            z_star=packer.unpack(result.output),
            z0=z0,
            residual=fwd.rel_residual,
            abs_residual=fwd.abs_residual,
            nfe=fwd.nfe,
            nsteps=fwd.nsteps,
            converged=converged,
            diverged=fwd.diverged,
            solver=solver,
            tol=tol,
            stop_mode=stop_mode,
            jacobian_loss=result.jacobian_loss,
            skip_loss=skip_loss,
            trace=fwd.trace,
            backward_record=result.backward_record,
            stability=stability,
        )

    @property
    def backward(self) -> BackwardStats | None:
        """Backward statistics, once a backward pass ran through this solution."""
        return self.backward_record.stats

    @property
    def all_converged(self) -> bool:
        """True when every sample converged (reads a device value)."""
        return bool(self.converged.all())

    @property
    def converged_fraction(self) -> float:
        return float(self.converged.float().mean()) if self.converged.numel() else 1.0

    def stats(self) -> dict[str, float]:
        """Scalar summary for logging: nfe, steps, residual mean/max, fraction converged..."""
        res = self.residual.detach().float()
        out: dict[str, float] = {
            "nfe": float(self.nfe),
            "nsteps": float(self.nsteps),
            "residual_mean": float(res.mean()) if res.numel() else 0.0,
            "residual_max": float(res.max()) if res.numel() else 0.0,
            "converged_fraction": self.converged_fraction,
        }
        if self.jacobian_loss is not None:
            out["jacobian_loss"] = float(self.jacobian_loss.detach())
        if self.skip_loss is not None:
            out["skip_loss"] = float(self.skip_loss.detach())
        bw = self.backward
        if bw is not None and bw.residual is not None:
            out["backward_nfe"] = float(bw.nfe)
            out["backward_residual_max"] = float(bw.residual.detach().float().max())
        return out

    def summary(self) -> str:
        """One line for humans."""
        s = self.stats()
        return (
            f"{self.solver}: {s['converged_fraction']:.0%} converged (tol {self.tol:g} {self.stop_mode}), "
            f"residual mean {s['residual_mean']:.2e} max {s['residual_max']:.2e}, "
            f"{self.nsteps} steps, {self.nfe} f-evals"
        )


def detach_state(z: Any) -> Any:
    """Detach a tensor or tuple of tensors."""
    if isinstance(z, Tensor):
        return z.detach()
    return tuple(t.detach() for t in z)


__all__ = ["BackwardRecord", "BackwardStats", "DEQSolution", "detach_state"]


class SolutionSlot:
    """Holds the last :class:`DEQSolution` of a layer called without returning it (e.g. inside
    ``nn.Sequential``). Copies and pickles of the layer get an empty slot: the record belongs to
    one call (its tensors may carry that call's graph, which cannot be deep-copied), not to the
    layer's state, so EMA copies, ``ddp_spawn`` and ``torch.save`` keep working after a forward."""

    def __init__(self) -> None:
        self.value: DEQSolution | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> SolutionSlot:
        return SolutionSlot()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.value = None
