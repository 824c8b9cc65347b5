"""The solver interface and the bookkeeping every solver shares.

A solver finds z with z = f(z) for a batch of flat states z of shape (batch, dim). Every
solver runs the same loop (:meth:`Solver.solve`): evaluate f at the current iterate, let the
:class:`ConvergenceTracker` record residuals, the best iterate, convergence and divergence per
sample, then ask the solver's :meth:`Solver.step` for the next iterate. Samples that converged
or diverged are frozen, so each sample has its own stop; the loop ends when every sample has
stopped or ``max_steps`` is reached. Solvers are written without in-place updates of tensors
that may carry gradients, so the same code also runs under autograd (the "unrolled" backward).
"""

from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

Map = Callable[[Tensor], Tensor]

STOP_MODES = ("rel", "abs")


@dataclass
class SolverResult:
    """Outcome of one batched solve. All tensors have a leading batch dimension."""

    z: Tensor
    """Best iterate per sample (lowest residual seen), shape (batch, dim)."""
    residual: Tensor
    """Residual of ``z`` in the stop mode ("rel": ||f(z)-z|| / ||f(z)||, or "abs")."""
    abs_residual: Tensor
    """||f(z) - z|| of ``z``."""
    rel_residual: Tensor
    """||f(z) - z|| / ||f(z)|| of ``z``."""
    converged: Tensor
    """Per-sample bool: residual <= tol."""
    diverged: Tensor
    """Per-sample bool: NaN/Inf seen or residual blew up; stopped early."""
    nonfinite_at_start: Tensor
    """Per-sample bool: the very first f evaluation was NaN/Inf."""
    best_step: Tensor
    """Per-sample index (0-based) of the iteration whose iterate is returned."""
    nfe: int
    """Number of (batched) f evaluations, including Jacobian-vector products."""
    nsteps: int
    """Number of loop iterations run."""
    trace: Tensor | None = None
    """Residual (stop mode) per iteration, shape (nsteps, batch), when recorded."""
    nonfinite_output: Tensor | None = None
    """Per-sample bool, set by the layer: f at the returned iterate gave NaN/Inf (then not converged)."""
    runaway: Tensor | None = None
    """Per-sample bool: some iterate met ``tol`` only because it had grown, not because
    ||f(z) - z|| fell (a runaway; see :class:`ConvergenceTracker`), so it was not accepted."""
    origin: tuple[Tensor, Tensor] | None = None
    """(first residual ||f(z0) - z0||, start scale max(||z0||, ||f(z0)||)) per sample: what the
    runaway guard measured progress against; a solve that continues this one (FallbackChain)
    passes it on, so a restart from a runaway iterate is not a fresh start."""


class _CountedMap:
    """Wraps f and counts its evaluations; f runs under the autocast state of the caller while
    the solver's own arithmetic (mixing, least squares, updates) runs with autocast off, in the
    state's precision (see :meth:`Solver.solve`)."""

    def __init__(self, f: Map, device: torch.device) -> None:
        self.f = f
        self.nfe = 0
        self.device_type = device.type
        self.autocast = self.device_type != "meta" and torch.is_autocast_enabled(self.device_type)
        self.autocast_dtype = torch.get_autocast_dtype(self.device_type) if self.autocast else None

    def __call__(self, z: Tensor) -> Tensor:
        self.nfe += 1
        if not self.autocast:
            return self.f(z)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype):
            return self.f(z)

    def solver_arithmetic(self) -> Any:
        """A context in which autocast is off (a no-op when it was off already)."""
        return torch.autocast(self.device_type, enabled=False) if self.autocast else contextlib.nullcontext()


class _StopCheck:
    """Answers "has every sample stopped?" without stalling the device.

    On CPU the flag is read directly (no cost). On CUDA the flag is copied to pinned host memory
    asynchronously and read once its event has completed, so the solver loop never waits for the
    GPU; it may run one or two extra (frozen, harmless) iterations instead. At most ``max_lag``
    flags are in flight before the oldest is waited for.
    """

    def __init__(self, device: torch.device, max_lag: int = 4) -> None:
        self.asynchronous = device.type == "cuda"
        self.max_lag = max_lag
        self.pending: collections.deque[tuple[Any, Tensor]] = collections.deque()

    def all_stopped(self, active: Tensor) -> bool:
        if not self.asynchronous:
            return not bool(active.any())
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(active.any(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((event, host))
        while self.pending:
            event, host = self.pending[0]
            if len(self.pending) > self.max_lag:
                event.synchronize()
            elif not event.query():
                break
            self.pending.popleft()
            if not bool(host):
                return True
        return False


def host_reads_are_free(t: Tensor) -> bool:
    """Whether reading ``t``'s value on the host costs no device synchronisation (CPU tensors).

    Solver loops read flags only where this holds; on accelerators, and under torch.compile, they
    run branch-free, so an iteration never waits for the device and compiles without graph breaks
    (tests/core/test_host_syncs.py counts the reads)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()  # a read would break the graph


def select_rows(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per sample (row) ``a`` where ``mask`` else ``b``, for (batch, dim) tensors.

    On the CPU reading a flag costs nothing, so a uniform mask (the common case: every sample
    active, every proposal finite) skips the full-size select; on accelerators the select always
    runs, keeping solver loops free of host synchronisation.
    """
    if host_reads_are_free(mask):
        if bool(mask.all()):
            return a
        if not bool(mask.any()):
            return b
    return torch.where(mask[:, None], a, b)


RESIDUAL_DTYPE = torch.float64
"""Residuals and the per-sample bookkeeping are kept in float64 whatever the state's dtype."""

PROGRESS_TO_CONVERGE = 0.5
"""Once an iterate has outgrown its start, it counts as converged only if its residual (plus
the rounding floor) is at most this fraction of the first residual (see ConvergenceTracker)."""


def row_norms(v: Tensor) -> Tensor:
    """Per-row 2-norms of a (batch, dim) tensor in float64, without underflow or overflow.

    Squares of float32 entries underflow below about 1e-19 and overflow above 1e19, so a plain
    norm of a state at the scale 1e-23 is 0 (a false "converged"). Float64 holds every float32,
    float16 and bfloat16 square. On the CPU the plain norm is taken first and only rows in the
    unsafe range are recomputed in float64 (a free host read); on accelerators the norm is
    accumulated in float64 directly, with no read. Float64 states use the plain norm (safe for
    entries between about 1e-150 and 1e150).
    """
    if v.dtype == RESIDUAL_DTYPE:
        return torch.linalg.vector_norm(v, dim=1)
    if not host_reads_are_free(v):
        return torch.linalg.vector_norm(v, dim=1, dtype=RESIDUAL_DTYPE)
    n = torch.linalg.vector_norm(v, dim=1)
    info = torch.finfo(v.dtype)
    # entries below sqrt(tiny) square to 0: their total is at most sqrt(dim * tiny), negligible
    # (under eps relative) only for norms above this floor
    floor = math.sqrt(max(v.shape[1], 1) * info.tiny) / info.eps
    unsafe = (n < floor) | ~torch.isfinite(n)
    n = n.to(RESIDUAL_DTYPE)
    if bool(unsafe.any()):
        n = torch.where(unsafe, torch.linalg.vector_norm(v, dim=1, dtype=RESIDUAL_DTYPE), n)
    return n


class ConvergenceTracker:
    """Per-sample residuals, best iterate, convergence and divergence, shared by all solvers.

    What "converged" means: the residual (relative ||f(z)-z|| / ||f(z)||, or absolute) is at most
    ``tol``, and, once the iterate has outgrown its start (||f(z)|| above max(||z0||, ||f(z0)||)),
    the solve has made real progress: ||f(z)-z|| plus its rounding floor eps * ||f(z)|| is at
    most half of ||f(z0)-z0||. The second condition refuses runaways: a map with no fixed point
    (f(z) - z bounded away from zero) drives the relative residual to 0 as the iterate runs off,
    and at |z| ~ 1/eps rounding drives even the absolute one to 0; neither is an equilibrium.
    Such samples are flagged ``runaway`` and, while no progress at all is made (residual not
    below its start), their iterates are not taken as the best one either. A genuine solve that
    grows far from its start (e.g. a contraction of modulus 0.99 from z0 = 0 at a loose tol) may
    need a few more steps to halve its first residual, never fewer.

    Residuals are float64 (:func:`row_norms`), so tiny and huge states are measured correctly.
    """

    def __init__(
        self,
        z0: Tensor,
        *,
        tol: float,
        stop_mode: str,
        divergence_factor: float,
        record_trace: bool,
        origin: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        b = z0.shape[0]
        dev = z0.device
        self.origin = origin
        self.tol = tol
        self.rel = stop_mode == "rel"
        self.divergence_factor = divergence_factor
        self.eps = torch.finfo(RESIDUAL_DTYPE).tiny
        self.rounding = torch.finfo(z0.dtype).eps if z0.dtype.is_floating_point else 0.0
        inf = torch.full((b,), math.inf, device=dev, dtype=RESIDUAL_DTYPE)
        self.best_z = z0
        self.best_r = inf
        self.best_abs = inf
        self.best_rel = inf
        self.first_abs = inf
        self.start_scale = inf
        self.best_step = torch.zeros(b, dtype=torch.long, device=dev)
        self.converged = torch.zeros(b, dtype=torch.bool, device=dev)
        self.diverged = torch.zeros(b, dtype=torch.bool, device=dev)
        self.runaway = torch.zeros(b, dtype=torch.bool, device=dev)
        self.nonfinite_at_start = torch.zeros(b, dtype=torch.bool, device=dev)
        self.active = torch.ones(b, dtype=torch.bool, device=dev)
        self.stopped = torch.zeros(b, dtype=torch.bool, device=dev)  # given up by the solver
        self.trace: list[Tensor] | None = [] if record_trace else None
        self.step = 0

    def observe(self, z: Tensor, fz: Tensor) -> Tensor:
        """Record the residual of iterate ``z`` (given f(z)); return the still-active mask."""
        abs_r = row_norms((fz - z).detach())
        fz_norm = row_norms(fz.detach())
        rel_r = abs_r / (fz_norm + self.eps)
        r = rel_r if self.rel else abs_r
        finite = torch.isfinite(abs_r) & torch.isfinite(rel_r)
        active = self.active
        within = r <= self.tol
        if self.step == 0:
            self.nonfinite_at_start = ~finite
            if self.origin is None:
                self.first_abs = torch.where(finite, abs_r, self.first_abs)
                self.start_scale = torch.maximum(row_norms(z.detach()), fz_norm)
            else:  # continuing an earlier solve: its start is the reference
                self.first_abs, self.start_scale = self.origin
        if self.step == 0 and self.origin is None:
            eligible = finite
        else:
            # runaway guard (see the class docstring): measured against the start, no host read
            grown = fz_norm > self.start_scale
            floor = abs_r + self.rounding * fz_norm
            progressed = ~grown | (floor <= PROGRESS_TO_CONVERGE * self.first_abs)
            self.runaway = self.runaway | (active & finite & within & ~progressed)
            within = within & progressed
            eligible = finite & (~grown | (floor < self.first_abs))
        newly = active & finite & within
        # a converging iterate is always the one returned (an earlier, refused runaway iterate
        # may have had a lower residual)
        improved = active & eligible & ((r < self.best_r) | newly)
        self.best_r = torch.where(improved, r, self.best_r)
        self.best_abs = torch.where(improved, abs_r, self.best_abs)
        self.best_rel = torch.where(improved, rel_r, self.best_rel)
        self.best_z = select_rows(improved, z, self.best_z)
        self.best_step = torch.where(improved, torch.full_like(self.best_step, self.step), self.best_step)
        # Blow-up is measured against the first residual, not the best one: solvers are not
        # monotone, and near the precision floor a 100x jump over the best is only noise.
        blew_up = abs_r > self.divergence_factor * self.first_abs
        self.diverged = self.diverged | (active & (~finite | blew_up))
        self.converged = self.converged | newly
        self.active = ~(self.converged | self.diverged | self.stopped)
        if self.trace is not None:
            self.trace.append(r.detach())
        self.step += 1
        return self.active

    def next_iterate(self, proposed: Tensor, z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
        """Freeze stopped samples, reset diverged ones to their best iterate, and replace a
        non-finite proposal (e.g. a singular extrapolation) by a plain fixed-point step.

        Returns the next iterate and the mask of samples that took the solver's proposal."""
        # One reduction instead of an elementwise isfinite: a row with NaN/Inf sums to NaN/Inf (a
        # finite row whose sum overflows is also refused, and takes the plain step instead).
        proposal_ok = torch.isfinite(proposed.sum(dim=1))
        took = self.active & proposal_ok & ~self.diverged
        proposed = select_rows(proposal_ok, proposed, fz)
        nxt = select_rows(self.active, proposed, z)
        return select_rows(~self.diverged, nxt, self.best_z), took

    def give_up(self, mask: Tensor) -> None:
        """Stop samples the solver cannot continue (e.g. an ODE solve reached its end time)."""
        self.stopped = self.stopped | (mask & self.active)
        self.active = self.active & ~mask

    def result(self, nfe: int) -> SolverResult:
        trace = torch.stack(self.trace) if self.trace else None
        return SolverResult(
            z=self.best_z,
            residual=self.best_r,
            abs_residual=self.best_abs,
            rel_residual=self.best_rel,
            converged=self.converged,
            diverged=self.diverged & ~self.converged,
            nonfinite_at_start=self.nonfinite_at_start,
            best_step=self.best_step,
            nfe=nfe,
            nsteps=self.step,
            trace=trace,
            runaway=self.runaway & ~self.converged,
            origin=(self.first_abs, self.start_scale),
        )


@dataclass
class Solver:
    """Base class of all solvers: a small dataclass of options plus a :meth:`step` rule.

    Subclasses set ``name`` and implement :meth:`init_state` and :meth:`step`. Instances are
    plain picklable, deep-copyable objects; they hold no tensors between solves.
    """

    name: ClassVar[str] = "base"

    def init_state(self, z0: Tensor) -> Any:
        """Per-solve state (histories etc.)."""
        return None

    def step(self, state: Any, z: Tensor, fz: Tensor, f: Map, jvp: Map | None) -> Tensor:
        """Propose the next iterate from the current iterate ``z`` and ``fz = f(z)``.

        ``f`` may be called again (e.g. for Jacobian-vector products); its evaluations are
        counted. ``jvp``, when given, computes the Jacobian of f at ``z`` times a vector
        exactly (used for affine maps such as the backward linear system).
        """
        raise NotImplementedError

    def proposal_fz(self, state: Any) -> Tensor | None:
        """f at the last proposed iterate, when the step already computed it (FSAL). Samples
        that did not take the proposal keep their current f(z). Default: none."""
        return None

    def exhausted(self, state: Any) -> Tensor | None:
        """Per-sample mask of samples the solver cannot continue (default: none)."""
        return None

    def options(self) -> dict[str, Any]:
        """The solver's options as a dict (for logging and model cards)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def solve(
        self,
        f: Map,
        z0: Tensor,
        *,
        tol: float = 1e-4,
        max_steps: int = 50,
        stop_mode: str = "rel",
        divergence_factor: float = 1e2,
        record_trace: bool = False,
        jvp: Map | None = None,
        early_stop: bool = True,
        origin: tuple[Tensor, Tensor] | None = None,
    ) -> SolverResult:
        """Solve z = f(z) from ``z0`` of shape (batch, dim); return the best iterate per sample.

        ``origin`` (a previous result's ``origin``) continues an earlier solve: convergence is
        judged against that solve's start, not against ``z0`` (see :class:`ConvergenceTracker`).

        ``early_stop=False`` runs exactly ``max_steps`` iterations (stopped samples stay frozen)
        and never asks the device whether all samples are done: a loop with no host read at all,
        which CUDA-graph capture needs (see benchmarks/gpu_path.py)."""
        validate_solve_args(z0, tol=tol, max_steps=max_steps, stop_mode=stop_mode)
        counted = _CountedMap(f, z0.device)
        with counted.solver_arithmetic():
            return self._loop(counted, z0, tol, max_steps, stop_mode, divergence_factor, record_trace, jvp, early_stop, origin)

    def _loop(
        self, counted: _CountedMap, z0: Tensor, tol: float, max_steps: int, stop_mode: str,
        divergence_factor: float, record_trace: bool, jvp: Map | None, early_stop: bool,
        origin: tuple[Tensor, Tensor] | None,
    ) -> SolverResult:
        """The shared iteration of :meth:`solve` (autocast off; f re-enables it)."""
        tracker = ConvergenceTracker(
            z0, tol=tol, stop_mode=stop_mode, divergence_factor=divergence_factor, record_trace=record_trace, origin=origin
        )
        stop = _StopCheck(z0.device)
        state = self.init_state(z0)
        z, fz = z0, None
        for k in range(max_steps):
            if fz is None:
                fz = counted(z)
                if fz.shape != z.shape:
                    raise ValueError(f"the map returned shape {tuple(fz.shape)} for a state of shape {tuple(z.shape)}")
            active = tracker.observe(z, fz)
            if k == max_steps - 1 or (early_stop and stop.all_stopped(active)):
                break
            proposed = self.step(state, z, fz, counted, jvp)
            z, took = tracker.next_iterate(proposed, z, fz)
            cached = self.proposal_fz(state)
            # Reuse f at the proposal where it was taken; frozen samples keep their f(z). (Diverged
            # samples, reset to their best iterate, are inactive: their stale f(z) is never used.)
            fz = None if cached is None else select_rows(took, cached, fz)
            gave_up = self.exhausted(state)
            if gave_up is not None:
                tracker.give_up(gave_up)
        return tracker.result(counted.nfe)


def validate_solve_args(z0: Tensor, *, tol: float, max_steps: int, stop_mode: str) -> None:
    """Clear errors for bad solver arguments."""
    if not isinstance(z0, Tensor) or z0.dim() != 2:
        shape = tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__
        raise ValueError(f"solvers take a flat state of shape (batch, dim); got {shape}")
    if not z0.dtype.is_floating_point:
        raise TypeError(f"the state must be floating point, got dtype {z0.dtype}")
    from mdeq.core.options import check_option, choice, integer, real

    check_option("solve", "stop_mode", stop_mode, choice(*STOP_MODES))
    check_option("solve", "max_steps", max_steps, integer(1))
    check_option("solve", "tol", tol, real(0.0))


def linear_algebra_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype small dense systems (Anderson's m x m, GMRES's triangle, the dense backward) are
    solved in: float32 for float16/bfloat16 states, which torch's LU and triangular solves do not
    take (and whose precision would not do), else the state's own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two (batch, dim) tensors."""
    return (a * b).sum(dim=1)
