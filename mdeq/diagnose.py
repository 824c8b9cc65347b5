"""The convergence doctor: why a DEQ does (not) converge on a batch, and what to change.

``diagnose(model, batch)`` runs the model once to capture a DEQ layer's input, then on that exact
fixed-point problem: the layer's own forward solve and an implicit backward solve (with traces),
an estimate of the Jacobian's spectrum at z* (spectral radius: is iteration locally stable;
rightmost real part: is the flow dz/dt = f(z) - z locally stable), trials of every solver within
the layer's budget, and recommendations ranked by expected effect, each of which can be applied
to the layer (``recommendation.apply(deq)``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from mdeq.core.backward import ImplicitBackward
from mdeq.core.jacobian import JacobianRegularization, jacobian_eigenvalues
from mdeq.core.solvers import FixedPoint, Solver, SolverResult, get_solver
from mdeq.core.stability import best_damping, temper_scale
from mdeq.nn.cells import Tempered
from mdeq.nn.deq import DEQ

DEFAULT_TRIALS = ("fixed_point", "anderson", "broyden", "newton_krylov", "ode")


@dataclass
class SolverReport:
    """How one solver did on the batch (forward, and the backward linear solve)."""

    solver: str
    converged_fraction: float
    residual_median: float
    residual_max: float
    nfe: int
    seconds: float
    backward_converged_fraction: float | None = None
    backward_residual_max: float | None = None
    backward_nfe: int | None = None
    trace: Tensor | None = field(default=None, repr=False)
    backward_trace: Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("trace"), d.pop("backward_trace")
        return d


@dataclass
class Recommendation:
    """One concrete change, the evidence for it, and a function that applies it to a DEQ."""

    title: str
    detail: str
    apply: Callable[[DEQ], None] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "detail": self.detail, "applicable": self.apply is not None}


@dataclass
class Diagnosis:
    """The doctor's findings for one DEQ layer on one batch."""

    layer: str
    batch_size: int
    state_dim: int
    tol: float
    stop_mode: str
    max_steps: int
    forward: SolverReport
    spectral_radius: float
    rightmost_real: float
    spectral_radius_per_sample: list[float]
    nonfinite_at_start: int
    trials: list[SolverReport]
    recommendations: list[Recommendation]

    @property
    def converged(self) -> bool:
        return self.forward.converged_fraction == 1.0

    @property
    def iteration_stable(self) -> bool:
        """Locally, plain iteration contracts (spectral radius of df/dz below 1)."""
        return self.spectral_radius < 1.0

    @property
    def flow_stable(self) -> bool:
        """Locally, the flow dz/dt = f(z) - z is stable (eigenvalues of df/dz - I in the left half plane)."""
        return self.rightmost_real < 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "batch_size": self.batch_size,
            "state_dim": self.state_dim,
            "tol": self.tol,
            "stop_mode": self.stop_mode,
            "max_steps": self.max_steps,
            "converged": self.converged,
            "forward": self.forward.to_dict(),
            "spectral_radius": self.spectral_radius,
            "rightmost_real": self.rightmost_real,
            "iteration_stable": self.iteration_stable,
            "flow_stable": self.flow_stable,
            "nonfinite_at_start": self.nonfinite_at_start,
            "trials": [t.to_dict() for t in self.trials],
            "recommendations": [r.to_dict() for r in self.recommendations],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """Readable report for a terminal."""
        f = self.forward
        lines = [
            f"DEQ layer '{self.layer}': batch {self.batch_size}, state dim {self.state_dim}, tol {self.tol:g} ({self.stop_mode}), max_steps {self.max_steps}",
            f"  forward ({f.solver}): {f.converged_fraction:.0%} converged, residual median {f.residual_median:.2e} max {f.residual_max:.2e}, {f.nfe} f-evals",
        ]
        if f.backward_converged_fraction is not None:
            lines.append(
                f"  backward (implicit, {f.solver}): {f.backward_converged_fraction:.0%} converged, residual max {f.backward_residual_max:.2e}, {f.backward_nfe} evals"
            )
        lines.append(
            f"  Jacobian at z*: spectral radius {self.spectral_radius:.3g} -> iteration "
            f"{'locally stable' if self.iteration_stable else 'NOT locally stable (rho >= 1)'}; "
            f"rightmost real part {self.rightmost_real:.3g} -> flow {'stable' if self.flow_stable else 'NOT stable'}"
        )
        if self.nonfinite_at_start:
            lines.append(f"  f returned NaN/Inf at its first evaluation for {self.nonfinite_at_start} sample(s)")
        lines.append("")
        lines.append(f"  {'solver':<15}{'converged':>10}{'res. median':>13}{'res. max':>11}{'f-evals':>9}{'seconds':>9}{'backward':>10}")
        for t in self.trials:
            bw = "-" if t.backward_converged_fraction is None else f"{t.backward_converged_fraction:.0%}"
            lines.append(
                f"  {t.solver:<15}{t.converged_fraction:>10.0%}{t.residual_median:>13.2e}{t.residual_max:>11.2e}{t.nfe:>9d}{t.seconds:>9.2f}{bw:>10}"
            )
        lines.append("")
        lines.append("  Recommendations (most effective first):" if self.recommendations else "  No change needed.")
        for i, r in enumerate(self.recommendations, 1):
            lines.append(f"  {i}. {r.title}")
            lines.append(f"     {r.detail}")
        return "\n".join(lines)

    def figure(self) -> Any:
        """Relative residual against the cost (f-evaluations) per solver, forward and backward,
        with the tolerance line."""
        from mdeq.plots import solver_comparison_figure

        fwd = {t.solver: t.trace for t in self.trials if t.trace is not None}
        bwd = {t.solver: t.backward_trace for t in self.trials if t.backward_trace is not None}
        nfe = {
            "forward": {t.solver: t.nfe for t in self.trials},
            "backward": {t.solver: t.backward_nfe for t in self.trials if t.backward_nfe},
        }
        return solver_comparison_figure(fwd, bwd, title=f"layer '{self.layer}', batch {self.batch_size}", nfe=nfe, tol=self.tol)

    def log_figure(self, loggers: Any, step: int = 0, fallback_path: str | None = None) -> str:
        """Log the figure to a W&B / TensorBoard logger (a Lightning logger or a list of them),
        else save it to ``fallback_path``. Returns where it went."""
        from mdeq.plots import log_figure

        fig = self.figure()
        seq = loggers if isinstance(loggers, (list, tuple)) else [loggers]
        where = log_figure(fig, seq, step, key=f"doctor/{self.layer}", fallback_path=fallback_path)
        import matplotlib.pyplot as plt

        plt.close(fig)
        return where


# ---- running the diagnosis ------------------------------------------------------------------------
def find_deq_layers(model: nn.Module) -> list[tuple[str, DEQ]]:
    """(name, layer) for every DEQ in ``model`` (the model itself counts, with name '')."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DEQ)]


def _capture_input(model: nn.Module, layer: DEQ, x: Any) -> tuple[Any, Any]:
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if "x" not in captured:
            captured["x"] = args[0] if args else kwargs.get("x")
            captured["z0"] = args[1] if len(args) > 1 else kwargs.get("z0")

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    policy = layer.on_divergence
    layer.on_divergence = "ignore"
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        layer.on_divergence = policy
    if "x" not in captured:
        raise RuntimeError("the model's forward did not call the DEQ layer being diagnosed")
    return captured["x"], captured["z0"]


def _report(name: str, res: SolverResult, seconds: float) -> SolverReport:
    r = res.residual.detach().float().cpu()
    finite = r[torch.isfinite(r)]
    return SolverReport(
        solver=name,
        converged_fraction=float(res.converged.float().mean()) if r.numel() else 1.0,
        residual_median=float(finite.median()) if finite.numel() else math.inf,
        residual_max=float(r.max()) if r.numel() else 0.0,
        nfe=res.nfe,
        seconds=seconds,
        trace=res.trace,
    )


def _backward(solver: Solver, f: Callable[[Tensor], Tensor], z_star: Tensor, kw: dict[str, Any], seed: int) -> SolverResult:
    """The implicit backward's linear solve g = J^T g + v at z* for a random cotangent v."""
    z_leaf = z_star.detach().requires_grad_()
    with torch.enable_grad():
        fz = f(z_leaf)
    g = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(z_star.shape, generator=g, dtype=z_star.dtype).to(z_star.device)

    def vjp(u: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(fz, z_leaf, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if out is None else out

    with torch.no_grad():
        return solver.solve(lambda u: vjp(u) + v, v, jvp=vjp, **kw)


def diagnose(
    model: nn.Module,
    batch: Any,
    *,
    layer: str | None = None,
    trials: Sequence[str] = DEFAULT_TRIALS,
    krylov_dim: int = 20,
    seed: int = 0,
) -> Diagnosis:
    """Diagnose the DEQ layer ``layer`` (default: the first) of ``model`` on ``batch`` (the model's
    input, or a tuple whose first element is). The model's train/eval mode is left as it is."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    layers = find_deq_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no DEQ layer to diagnose")
    names = [n or "<model>" for n, _ in layers]
    if layer is None:
        name, deq = layers[0]
    else:
        match = [(n, m) for n, m in layers if n == layer]
        if not match:
            raise ValueError(f"no DEQ layer named {layer!r}; layers: {names}")
        name, deq = match[0]
    inj, z0 = (x, None) if deq is model else _capture_input(model, deq, x)
    f, z0_flat, _, _ = deq.flat_problem(inj, z0)
    kw = dict(tol=deq.tol, max_steps=deq.max_steps, stop_mode=deq.stop_mode, divergence_factor=deq.divergence_factor, record_trace=True)
    bw_mode = deq.backward_mode
    reports = []
    own = None
    for trial in dict.fromkeys([deq.solver.name, *trials]):
        solver = deq.solver if trial == deq.solver.name else get_solver(trial)
        t0 = time.perf_counter()
        with torch.no_grad():
            res = solver.solve(f, z0_flat, **kw)
        rep = _report(trial, res, time.perf_counter() - t0)
        if bool(res.converged.any()) or trial == deq.solver.name:
            bsolver = bw_mode.solver if isinstance(bw_mode, ImplicitBackward) and bw_mode.solver is not None and trial == deq.solver.name else solver
            bres = _backward(bsolver, f, res.z, kw, seed)
            rep.backward_converged_fraction = float(bres.converged.float().mean())
            rep.backward_residual_max = float(bres.residual.max())
            rep.backward_nfe = bres.nfe
            rep.backward_trace = bres.trace
        reports.append(rep)
        if trial == deq.solver.name:
            own, own_res = rep, res
    assert own is not None
    # spectrum at the best iterate the layer's own solver found
    ev = jacobian_eigenvalues(f, own_res.z.detach(), k=krylov_dim, seed=seed)
    finite = torch.isfinite(ev.abs()).all(dim=1)
    rho_s = ev.abs().amax(dim=1)
    rho_s = torch.where(finite, rho_s, torch.full_like(rho_s, math.inf))
    rho = float(rho_s.max())
    right = float(torch.where(finite, ev.real.amax(dim=1), torch.full_like(rho_s, math.inf)).max())
    diag = Diagnosis(
        layer=name or "<model>",
        batch_size=z0_flat.shape[0],
        state_dim=z0_flat.shape[1],
        tol=deq.tol,
        stop_mode=deq.stop_mode,
        max_steps=deq.max_steps,
        forward=own,
        spectral_radius=rho,
        rightmost_real=right,
        spectral_radius_per_sample=[float(v) for v in rho_s],
        nonfinite_at_start=int(own_res.nonfinite_at_start.sum()),
        trials=[r for r in reports if r.solver != own.solver] if own.solver not in trials else reports,
        recommendations=[],
    )
    diag.recommendations = recommend(diag, ev, own_res)
    return diag


# ---- recommendations ----------------------------------------------------------------------------------
def _steps_needed(res: SolverResult, tol: float, max_steps: int) -> int | None:
    """Steps to reach ``tol`` at the observed late linear rate of the slowest sample."""
    if res.trace is None or res.trace.shape[0] < 6:
        return None
    tr = res.trace.detach().double().cpu()
    worst = int(tr[-1].argmax())
    seq = tr[:, worst]
    a, b = float(seq[-1]), float(seq[len(seq) // 2])
    n = len(seq) - len(seq) // 2 - 1
    if not (0 < a < b) or n <= 0:
        return None
    rate = (a / b) ** (1.0 / n)
    if rate >= 0.999:
        return None
    return int(math.ceil(1.2 * (max_steps + math.log(tol / a) / math.log(rate)))) + 1  # 20% margin


def recommend(diag: Diagnosis, ev: Tensor, own_res: SolverResult) -> list[Recommendation]:
    """Ranked recommendations from the diagnosis (evidence first, predictions after)."""
    recs: list[Recommendation] = []
    if diag.nonfinite_at_start:
        recs.append(
            Recommendation(
                "Check the input and f's initialisation: f returns NaN/Inf at the first step",
                "No solver can recover from a NaN at z0; look for NaN inputs, exploding weights or a log/division in f.",
            )
        )
    converged_trials = sorted((t for t in diag.trials if t.converged_fraction == 1.0), key=lambda t: t.nfe)
    if not diag.iteration_stable:
        scale = temper_scale(diag.spectral_radius)
        recs.append(
            Recommendation(
                f"Temper f: use Tempered(f, scale={scale:g}) (i.e. f * {scale:g})",
                f"The spectral radius of df/dz at z* is {diag.spectral_radius:.3g} >= 1, so the equilibrium repels plain iteration "
                f"and training will keep losing it. Scaling f by {scale:g} scales the Jacobian to ~{diag.spectral_radius * scale:.2g}: "
                "a contraction, so every solver converges; training recovers the output scale.",
                apply=lambda deq, s=scale: setattr(deq, "f", Tempered(deq.f, s)),
            )
        )
        d, rate = best_damping(ev)
        if rate < 1.0:
            recs.append(
                Recommendation(
                    f"Damp the iteration: solver=FixedPoint(damping={d:g})",
                    f"Locally, z <- {d:g} z + {1 - d:g} f(z) contracts at rate {rate:.3g} per step with this Jacobian's eigenvalues.",
                    apply=lambda deq, d=d: setattr(deq, "solver", FixedPoint(damping=d)),
                )
            )
        if diag.flow_stable:
            ode = next((t for t in diag.trials if t.solver == "ode"), None)
            evidence = f" (on this batch: {ode.converged_fraction:.0%} converged, {ode.nfe} f-evals)" if ode else ""
            recs.append(
                Recommendation(
                    "Use the continuous solver: solver='ode'",
                    f"The rightmost eigenvalue of df/dz has real part {diag.rightmost_real:.3g} < 1: the flow dz/dt = f(z) - z is stable "
                    f"even though iteration is not{evidence}.",
                    apply=lambda deq: setattr(deq, "solver", get_solver("ode")),
                )
            )
    if not diag.converged:
        for t in converged_trials[:2]:
            if t.solver == diag.forward.solver:
                continue
            recs.append(
                Recommendation(
                    f"Switch solver: solver='{t.solver}'",
                    f"It converged on all {diag.batch_size} samples of this batch in {t.nfe} f-evaluations "
                    f"(the layer's {diag.forward.solver}: {diag.forward.converged_fraction:.0%}).",
                    apply=lambda deq, name=t.solver: setattr(deq, "solver", get_solver(name)),
                )
            )
        steps = _steps_needed(own_res, diag.tol, diag.max_steps) if diag.iteration_stable else None
        if steps is not None:
            recs.append(
                Recommendation(
                    f"Raise max_steps to ~{steps}",
                    f"The slowest sample's residual is still falling linearly; at its current rate it reaches tol {diag.tol:g} in about {steps} steps.",
                    apply=lambda deq, n=steps: setattr(deq, "max_steps", n),
                )
            )
    if not diag.iteration_stable or diag.spectral_radius > 0.9 or not diag.converged:
        recs.append(
            Recommendation(
                "Add Jacobian regularization while training (jacobian_regularization='vjp', weight ~0.5-2 in the loss)",
                f"It penalises ||df/dz||_F, keeping the spectral radius (now {diag.spectral_radius:.3g}) below 1 as training proceeds.",
                apply=lambda deq: setattr(deq, "jacobian_regularization", JacobianRegularization()),
            )
        )
    if not diag.iteration_stable:
        recs.append(
            Recommendation(
                "Normalise f's weights (weight or spectral normalisation) or initialise them smaller",
                "Bounding the layers' gains bounds the Jacobian; smaller init (e.g. N(0, 0.01) convolutions) starts training contractive.",
            )
        )
    elif diag.converged:
        fastest = converged_trials[0] if converged_trials else None
        if fastest is not None and fastest.solver != diag.forward.solver and fastest.nfe < 0.8 * diag.forward.nfe:
            recs.append(
                Recommendation(
                    f"Optional: solver='{fastest.solver}' is cheaper here",
                    f"{fastest.nfe} f-evaluations instead of {diag.forward.nfe} for the same tolerance on this batch.",
                    apply=lambda deq, name=fastest.solver: setattr(deq, "solver", get_solver(name)),
                )
            )
    return recs
