"""Neural-ODE mode: integrate dz/dt = f(z, x) - z over a fixed time span instead of solving for
the steady state (DeepEquilibriumNetworks.jl's ``ODEProblem`` problem type).

The same cells work in both modes. Gradients either backpropagate through the integrator's
steps (``gradient="backprop"``: exact for the computed trajectory, memory grows with the number
of steps) or follow the continuous adjoint (``gradient="adjoint"``: the adjoint state
a(t) = dL/dz(t) is integrated backwards, da/dt = -a^T dg/dz, with parameter and input
gradients accumulated as integral of a^T dg/dtheta; memory holds one state per accepted step
and one step's graph). In the backward sweep each step restarts from the state stored by the
forward pass, so the reverse reconstruction of z(t) never accumulates error across steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mdeq.core.errors import ConvergenceError
from mdeq.core.runge_kutta import TABLEAUS, combine, error_estimate, initial_step, rk_step, scaled_rms

Map = Callable[[Tensor], Tensor]
METHODS = ("tsit5", "dopri5", "rk4")
GRADIENTS = ("adjoint", "backprop")


@dataclass
class ODERecord:
    """What one integration did: accepted steps, step attempts, f-evaluations, end state."""

    z: Tensor
    """z(T), shape (batch, dim)."""
    velocity: Tensor
    """dz/dt at T, i.e. f(z(T)) - z(T) (its norm is the distance from steady state)."""
    nfe: int
    naccepted: int
    nattempts: int

    def as_equilibrium_result(self) -> Any:
        """The record in the form every mode reports (an
        :class:`~mdeq.core.equilibrium.EquilibriumResult`): z(T) with its residual as an
        equilibrium, ||f(z) - z|| and ||f(z) - z|| / ||f(z)||; steps are the step attempts."""
        from mdeq.core.equilibrium import EquilibriumResult
        from mdeq.core.solution import BackwardRecord
        from mdeq.core.solvers.base import SolverResult, row_norms

        with torch.no_grad():
            abs_r = row_norms(self.velocity)
            rel_r = abs_r / row_norms(self.velocity + self.z).clamp_min(torch.finfo(abs_r.dtype).tiny)
        finite = torch.isfinite(abs_r)
        forward = SolverResult(
            z=self.z.detach(), residual=rel_r, abs_residual=abs_r, rel_residual=rel_r, converged=finite, diverged=~finite,
            nonfinite_at_start=torch.zeros_like(finite), best_step=torch.full_like(abs_r, self.nattempts, dtype=torch.long),
            nfe=self.nfe, nsteps=self.nattempts,
        )
        return EquilibriumResult(output=self.z, forward=forward, jacobian_loss=None, backward_record=BackwardRecord())


@dataclass
class NeuralODE:
    """Options of neural-ODE mode.

    Args:
        t_span: (t0, T) with T > t0; z(t0) is the layer's initial state, z(T) its output.
        method: ``"tsit5"`` or ``"dopri5"`` (adaptive 5(4) pairs, error per ``rtol``/``atol``)
            or ``"rk4"`` (classic fixed-step Runge-Kutta with ``step_size``).
        rtol, atol: local error tolerances of the adaptive methods (one step size for the
            whole batch, as in torchdiffeq).
        gradient: ``"adjoint"`` (continuous adjoint) or ``"backprop"`` (through the steps).
        step_size: the step of ``rk4`` (the span is split into equal steps of at most this
            size); for the adaptive methods, the first step (default: chosen automatically).
        max_steps: limit on step attempts; exceeding it raises ``ConvergenceError``.
    """

    t_span: tuple[float, float] = (0.0, 1.0)
    method: str = "tsit5"
    rtol: float = 1e-4
    atol: float = 1e-6
    gradient: str = "adjoint"
    step_size: float | None = None
    max_steps: int = 10_000
    safety: float = 0.9

    name = "neural_ode"

    def __post_init__(self) -> None:
        try:
            t0, t1 = (float(t) for t in self.t_span)
        except (TypeError, ValueError):
            raise ValueError(f"t_span must be a pair (t0, T) of numbers, got {self.t_span!r}") from None
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
            raise ValueError(f"t_span must be finite with T > t0, got {self.t_span!r}")
        self.t_span = (t0, t1)
        if self.method not in METHODS:
            raise ValueError(f"unknown neural-ODE method {self.method!r}; choose from {METHODS}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        if self.method == "rk4" and self.step_size is None:
            raise ValueError("method='rk4' needs step_size (the fixed step)")
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size!r}")
        if self.method != "rk4" and not (self.rtol > 0 or self.atol > 0):
            raise ValueError("adaptive neural-ODE methods need rtol > 0 or atol > 0")
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")

    def describe(self) -> str:
        return f"neural_ode({self.method}, t_span={self.t_span}, gradient={self.gradient})"

    # ---- public entry -----------------------------------------------------------------------
    def integrate(self, f: Map, z0: Tensor, leaves: Sequence[Tensor] = ()) -> ODERecord:
        """Integrate dz/dt = f(z) - z from ``z0`` (batch, dim) over ``t_span``.

        ``leaves`` are the tensors f depends on that need gradients (its parameters and the
        input injection); the adjoint returns gradients for them. With ``gradient="backprop"``
        autograd simply records the steps.
        """
        if self.gradient == "adjoint" and torch.is_grad_enabled():
            leaves = [t for t in leaves if t.requires_grad]
            info: dict[str, Any] = {}
            z_end = _Adjoint.apply(self, f, info, z0, *leaves)
            return ODERecord(z_end, info["velocity"], info["nfe"], info["naccepted"], info["nattempts"])
        return self._forward(f, z0, keep=False)[0]

    # ---- integration (on the shared Runge-Kutta core) --------------------------------------
    def _forward(self, f: Map, z0: Tensor, keep: bool) -> tuple[ODERecord, list[tuple[float, Tensor]]]:
        """Integrate; with ``keep`` also return (h, z_start) of every accepted step."""
        nfe = 0

        def counted(z: Tensor) -> Tensor:
            nonlocal nfe
            nfe += 1
            return f(z)

        tableau = TABLEAUS[self.method]
        t0, t1 = self.t_span
        z, fz = z0, counted(z0)
        _check_finite(fz - z, "f(z0, x)", self)
        steps: list[tuple[float, Tensor]] = []
        t, attempts, accepted = t0, 0, 0
        if not tableau.adaptive:
            n = max(1, math.ceil((t1 - t0) / self.step_size - 1e-9))  # type: ignore[operator]
            h = (t1 - t0) / n
            for _ in range(n):
                if keep:
                    steps.append((h, z))
                z, fz, _ = rk_step(tableau, counted, z, fz, h)
                attempts += 1
            _check_finite(z, "the integrated state", self)
            return ODERecord(z, fz - z, nfe, n, n), steps
        if self.step_size is not None:
            h = self.step_size
        else:
            with torch.no_grad():
                h = float(initial_step(counted, z.detach(), (fz - z).detach(), self.rtol, self.atol, per_sample=False))
        while t1 - t > 1e-12 * max(1.0, abs(t1)):
            if attempts >= self.max_steps:
                raise ConvergenceError(
                    f"neural-ODE integration gave up after {attempts} step attempts at t={t:.4g} of "
                    f"T={t1:g} (method={self.method}, rtol={self.rtol:g}, atol={self.atol:g}). The "
                    f"dynamics are stiff or blow up: scale f down, loosen rtol/atol, raise max_steps, "
                    f"or shorten t_span."
                )
            h = min(h, t1 - t)
            z_new, fz_new, k = rk_step(tableau, counted, z, fz, h)
            with torch.no_grad():
                err = float(scaled_rms(error_estimate(tableau, k, h), self.rtol, self.atol, z, z_new, per_sample=False))
            attempts += 1
            if math.isfinite(err) and err <= 1.0:
                if keep:
                    steps.append((h, z))
                t, z, fz = t + h, z_new, fz_new
                accepted += 1
            factor = 0.2 if not math.isfinite(err) else min(10.0, max(0.2, self.safety * max(err, 1e-10) ** -0.2))
            h = h * factor
        _check_finite(z, "the integrated state", self)
        return ODERecord(z, fz - z, nfe, accepted, attempts), steps

    def _adjoint_step(self, f: Map, leaves: Sequence[Tensor], h: float, z_end: Tensor, a: Tensor) -> tuple[Tensor, list[Tensor | None], int]:
        """One RK step of the adjoint system backwards over [t_k, t_k + h], starting from the
        stored end state: returns a(t_k), the step's contribution to dL/dleaves, and the number
        of f-evaluations (each stage is one forward and one vector-Jacobian product)."""
        tableau = TABLEAUS[self.method]
        rows = tableau.rows
        n_stages = tableau.weighted_stages  # FSAL's last stage has b = 0
        coef = list(tableau.b[:n_stages])
        kz: list[Tensor] = []
        ka: list[Tensor] = []
        grads: list[Tensor | None] = [None] * len(leaves)
        for i in range(n_stages):
            row = () if i == 0 else rows[i - 1]
            zi = z_end - h * combine(row, kz) if i else z_end
            ai = a + h * combine(row, ka) if i else a
            with torch.enable_grad():
                zi = zi.detach().requires_grad_()
                gz = f(zi) - zi
                vj = torch.autograd.grad(gz, [zi, *leaves], ai, allow_unused=True)
            kz.append(gz.detach())
            ka.append(vj[0])
            for j, v in enumerate(vj[1:]):
                if v is not None and coef[i] != 0.0:
                    grads[j] = h * coef[i] * v if grads[j] is None else grads[j] + h * coef[i] * v
        a_start = a + h * combine(coef, ka)
        return a_start, grads, n_stages


def _check_finite(t: Tensor, what: str, ode: NeuralODE) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t.reshape(t.shape[0], -1))).any(dim=1).sum())
        raise ConvergenceError(
            f"neural-ODE integration produced NaN/Inf in {what} for {bad}/{t.shape[0]} samples "
            f"({ode.describe()}). What to try: scale f down at initialisation (e.g. f(z, x) / 100), "
            f"check the input for NaN/Inf, or shorten t_span."
        )


class _Adjoint(torch.autograd.Function):
    """z(T) = Integrate(z0); gradients by the continuous adjoint over the stored steps."""

    @staticmethod
    def forward(ctx: Any, ode: NeuralODE, f: Map, info: dict, z0: Tensor, *leaves: Tensor) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            record, steps = ode._forward(f, z0, keep=True)
        info.update(velocity=record.velocity, nfe=record.nfe, naccepted=record.naccepted, nattempts=record.nattempts)
        ctx.ode, ctx.f, ctx.steps, ctx.leaves = ode, f, steps, leaves
        ctx.save_for_backward(record.z)
        ctx.z0_requires_grad = z0.requires_grad
        return record.z

    @staticmethod
    def backward(ctx: Any, grad_z: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (z_end,) = ctx.saved_tensors
        ode, f, steps, leaves = ctx.ode, ctx.f, ctx.steps, ctx.leaves
        a = grad_z
        total: list[Tensor | None] = [None] * len(leaves)
        ends = [z for _, z in steps[1:]] + [z_end]
        for (h, _), z_after in zip(reversed(steps), reversed(ends)):
            a, grads, _ = ode._adjoint_step(f, leaves, h, z_after, a)
            total = [g if t is None else (t if g is None else t + g) for t, g in zip(total, grads)]
        ctx.steps = ctx.leaves = None
        return (None, None, None, a if ctx.z0_requires_grad else None, *total)
