"""How gradients pass through an equilibrium: implicit (IFT), phantom, or unrolled.

Each mode is a small dataclass with :meth:`Backward.attach`, which takes the solver's z* and
returns it as the layer output, wired for gradients (the value is z* itself, whose residual the
solution record reports; only the gradient differs between modes). The forward solve itself is done elsewhere
(:mod:`mdeq.core.equilibrium`), once, for all modes.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Union

import torch
from torch import Tensor

from mdeq.core.errors import (
    HigherOrderGradientError,
    WarningThrottle,
    autocast_dtype,
    near_misses_only,
    nonconvergence_message,
    report_nonconvergence,
)
from mdeq.core.solution import BackwardRecord, BackwardStats
from mdeq.core.solvers import Solver, SolverSpec, get_solver
from mdeq.core.solvers.base import linear_algebra_dtype

Map = Callable[[Tensor], Tensor]


@dataclass
class BackwardContext:
    """What a backward mode needs to know about the forward solve."""

    solver: Solver
    tol: float
    max_steps: int
    stop_mode: str
    divergence_factor: float
    record_trace: bool
    on_divergence: str
    record: BackwardRecord
    throttle: WarningThrottle | None = None
    linear_solver: str = "iterative"
    low_precision: torch.dtype | None = None
    """The autocast dtype f ran in during the forward pass (its graph keeps that precision)."""
    early_stop: bool = True
    """As the forward solve's: False runs the backward's iterative solve for exactly ``max_steps``
    iterations without asking the device whether it is done (no host read in the backward)."""


LINEAR_SOLVERS = ("auto", "iterative", "gmres", "dense")


def _dense_solve(vjp: Callable[[Tensor], Tensor], grad: Tensor) -> tuple[Tensor, Tensor]:
    """Exact solve of (I - J^T) g = grad per sample: J^T from dim batched VJPs, then LU."""
    b, d = grad.shape
    eye = torch.eye(d, dtype=grad.dtype, device=grad.device)
    rows = [vjp(eye[i].expand(b, d).contiguous()) for i in range(d)]  # rows[i] = e_i^T J (per sample)
    jac = torch.stack(rows, dim=1)  # (b, d, d): jac[:, i, :] = J[i, :]
    wide = linear_algebra_dtype(grad.dtype)  # float16/bfloat16: the LU in float32
    g = torch.linalg.solve((eye - jac.transpose(1, 2)).to(wide), grad[..., None].to(wide))[..., 0].to(grad.dtype)
    res = torch.linalg.vector_norm(g - vjp(g) - grad, dim=1) / torch.linalg.vector_norm(grad, dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
    return g, res


@dataclass
class Backward:
    """Base class of backward modes."""

    name: ClassVar[str] = "base"
    differentiates_solver: ClassVar[bool] = False
    """True when the forward solve itself must run under autograd (unrolled)."""

    def attach(self, f: Map, z_star: Tensor, ctx: BackwardContext, need_jacobian: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Return ``(output, z_leaf, f(z_leaf))``; the last two (or Nones) serve the Jacobian
        regularizer, which needs f evaluated with a graph from a leaf z*."""
        raise NotImplementedError


@dataclass
class ImplicitBackward(Backward):
    """Implicit function theorem: the gradient g of the loss w.r.t. z* solves
    g = (df/dz)^T g + dL/dz*, found by a solver on vector-Jacobian products; then one VJP
    carries g into x and f's parameters.

    ``solver``/``tol``/``max_steps`` default to the forward solve's settings.

    ``linear_solver`` picks how (I - J^T) g = dL/dz* is solved: "iterative" (the solver above on
    the fixed-point form), "gmres" (matrix-free GMRES on vector-Jacobian products), "dense" (the
    exact per-sample Jacobian from dim batched VJPs, then an LU solve: exact and fastest for small
    states) or "auto" (dense up to ``dense_max_dim`` state dimensions unless a backward ``solver`` is given,
    else iterative). GMRES and
    dense also solve systems whose fixed-point form diverges (equilibria that only a root finder
    or the ODE solver reaches).
    """

    name = "implicit"
    solver: SolverSpec | None = None
    tol: float | None = None
    max_steps: int | None = None
    stop_mode: str | None = None
    linear_solver: str = "auto"
    dense_max_dim: int = 64

    def __post_init__(self) -> None:
        if self.solver is not None:
            self.solver = get_solver(self.solver)
        if self.linear_solver not in LINEAR_SOLVERS:
            raise ValueError(f"linear_solver must be one of {LINEAR_SOLVERS}, got {self.linear_solver!r}")

    def attach(self, f: Map, z_star: Tensor, ctx: BackwardContext, need_jacobian: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        z_leaf = z_star.detach().requires_grad_()
        with torch.enable_grad():
            fz = f(z_leaf)
        dim = z_star.shape[1]
        linear = self.linear_solver
        if linear == "auto":  # an explicitly chosen backward solver means the iterative form
            linear = "dense" if dim <= self.dense_max_dim and self.solver is None else "iterative"
        settings = dataclasses.replace(
            ctx,
            linear_solver=linear,
            solver=self.solver if self.solver is not None else ctx.solver,
            tol=self.tol if self.tol is not None else ctx.tol,
            max_steps=self.max_steps if self.max_steps is not None else ctx.max_steps,
            stop_mode=self.stop_mode if self.stop_mode is not None else ctx.stop_mode,
            low_precision=autocast_dtype(z_star.device),
        )
        out = _ImplicitGradient.apply(fz, z_leaf, settings)
        return out, z_leaf, fz


class _ImplicitGradient(torch.autograd.Function):
    """Returns the value of z* in forward; in backward replaces the incoming gradient by
    (I - J^T)^-1 grad and sends it into f(z*)'s graph (to x and f's parameters)."""

    @staticmethod
    def forward(ctx: Any, fz: Tensor, z_leaf: Tensor, settings: BackwardContext) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(fz, z_leaf)
        ctx.settings = settings
        return z_leaf.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise HigherOrderGradientError(
                "higher-order gradients (create_graph=True) through the implicit DEQ backward are not "
                "supported: the linear solve is not differentiable. Use backward='unrolled' for "
                "second derivatives, or compute them without create_graph."
            )
        fz, z_leaf = ctx.saved_tensors
        s: BackwardContext = ctx.settings

        def vjp(v: Tensor) -> Tensor:
            (out,) = torch.autograd.grad(fz, z_leaf, v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if out is None else out

        grad = grad.contiguous()
        if s.linear_solver in ("dense", "gmres"):
            return _direct_backward(s, vjp, grad), None, None
        result = s.solver.solve(
            lambda g: vjp(g) + grad,
            grad,
            tol=s.tol,
            max_steps=s.max_steps,
            stop_mode=s.stop_mode,
            divergence_factor=s.divergence_factor,
            record_trace=s.record_trace,
            jvp=vjp,
            early_stop=s.early_stop,
        )
        s.record.stats = BackwardStats(
            mode="implicit",
            solver=s.solver.name,
            nfe=result.nfe,
            nsteps=result.nsteps,
            residual=result.residual,
            converged=result.converged,
            trace=result.trace,
        )
        if s.on_divergence != "ignore" and not bool(result.converged.all()) and not (s.on_divergence == "warn" and near_misses_only(result, s.tol)):
            msg = nonconvergence_message(
                result, what="backward", solver=s.solver.name, tol=s.tol, stop_mode=s.stop_mode, max_steps=s.max_steps, low_precision=s.low_precision
            )
            report_nonconvergence(msg, s.on_divergence, kind="backward", throttle=s.throttle)
        return result.z, None, None


def _direct_backward(s: BackwardContext, vjp: Callable[[Tensor], Tensor], grad: Tensor) -> Tensor:
    """The dense or GMRES backward; records statistics like the iterative one."""
    from mdeq.core.solvers.gmres import gmres

    d = grad.shape[1]
    if s.linear_solver == "dense":
        g, res = _dense_solve(vjp, grad)
        nfe, steps, solver = d + 1, 1, "dense"
    else:
        g, res, steps = gmres(lambda u: u - vjp(u), grad, max_iter=min(s.max_steps, d), rtol=s.tol)
        nfe, solver = steps, "gmres"
    converged = res <= max(s.tol, 100 * torch.finfo(grad.dtype).eps)
    s.record.stats = BackwardStats(mode="implicit", solver=solver, nfe=nfe, nsteps=steps, residual=res, converged=converged)
    if s.on_divergence != "ignore" and not bool(converged.all()):
        msg = (
            f"DEQ backward {solver} solve did not reach tol={s.tol:g} for {int((~converged).sum())}/{converged.numel()} samples "
            f"(relative residual max {float(res.max()):.3g}); (I - J^T) may be singular at this equilibrium."
        )
        report_nonconvergence(msg, s.on_divergence, kind="backward", throttle=s.throttle)
    return g


@dataclass
class PhantomBackward(Backward):
    """Phantom gradient: ``steps`` damped iterations z <- damping z + (1 - damping) f(z) from
    z* (detached) with autograd. ``steps=1, damping=0`` is the Jacobian-free backward."""

    name = "phantom"
    steps: int = 1
    damping: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"phantom steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.damping < 1.0:
            raise ValueError(f"phantom damping must be in [0, 1), got {self.damping}")

    def attach(self, f: Map, z_star: Tensor, ctx: BackwardContext, need_jacobian: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        z = z_star.detach()
        if need_jacobian:
            z = z.requires_grad_()
        z_leaf, fz0 = z, None
        with torch.enable_grad():
            for k in range(self.steps):
                fz = f(z)
                if k == 0:
                    fz0 = fz
                z = fz if self.damping == 0.0 else self.damping * z + (1.0 - self.damping) * fz
        ctx.record.stats = BackwardStats(mode="phantom", nfe=self.steps, nsteps=self.steps)
        out = z_star.detach() + (z - z.detach())  # the value of z*, the phantom iterate's gradient
        return out, (z_leaf if need_jacobian else None), (fz0 if need_jacobian else None)


@dataclass
class UnrolledBackward(Backward):
    """Exact backpropagation through the forward solver's iterations (memory grows with steps;
    for checking and small models).

    With ``fixed_point`` this is the classic reference gradient. Backpropagating through
    Anderson's or Broyden's internal linear algebra is exact too, but becomes ill-conditioned
    when the solve is pushed to machine precision (the residual history turns collinear), so
    use ``fixed_point`` when the unrolled gradient serves as a reference.
    """

    name = "unrolled"
    differentiates_solver = True

    def attach(self, f: Map, z_star: Tensor, ctx: BackwardContext, need_jacobian: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        ctx.record.stats = BackwardStats(mode="unrolled")
        return z_star, None, None  # the solver's iterate, differentiable through every step


_BACKWARDS: dict[str, type[Backward]] = {
    cls.name: cls for cls in (ImplicitBackward, PhantomBackward, UnrolledBackward)
}

BackwardSpec = Union[str, Mapping[str, Any], Backward]


def list_backwards() -> list[str]:
    """Names of the backward modes."""
    return sorted(_BACKWARDS)


def get_backward(spec: BackwardSpec, **options: Any) -> Backward:
    """A backward mode from a name, a mapping with a ``name`` key, or an instance."""
    if isinstance(spec, Backward):
        return dataclasses.replace(spec, **options) if options else spec
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"a backward given as a mapping needs a 'name' key, got keys {sorted(spec)}")
        return get_backward(spec.pop("name"), **{**spec, **options})
    if not isinstance(spec, str):
        raise TypeError(f"backward must be a name, a mapping or a Backward instance, got {type(spec).__name__}")
    if spec == "SteadyStateAdjoint":
        raise ValueError(
            "unknown backward mode 'SteadyStateAdjoint': that is DeepEquilibriumNetworks.jl / SciML's name for the implicit "
            "(IFT) gradient; use backward='implicit' (ImplicitBackward(linear_solver='dense') solves it with an LU "
            f"factorisation, like SteadyStateAdjoint with LU). Available: {', '.join(list_backwards())}."
        )
    if spec not in _BACKWARDS:
        close = difflib.get_close_matches(spec, list_backwards(), n=2, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown backward mode {spec!r}.{hint} Available: {', '.join(list_backwards())}.")
    cls = _BACKWARDS[spec]
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in valid:
            raise ValueError(f"unknown option {key!r} for backward {spec!r}; valid options: {', '.join(valid) or 'none'}")
    return cls(**options)
