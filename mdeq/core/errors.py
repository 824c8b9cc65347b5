"""Errors and warnings raised by the fixed-point core, and the advice they carry."""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from mdeq.core.solvers.base import SolverResult


class ConvergenceError(RuntimeError):
    """A fixed-point solve did not converge and the policy was ``on_divergence="raise"``.

    The message names the residual, the steps taken, the solver and what to try. The
    (partial) solution record is attached as ``.solution`` when one exists.
    """

    def __init__(self, message: str, solution: Any = None) -> None:
        super().__init__(message)
        self.solution = solution


class ConvergenceWarning(UserWarning):
    """A fixed-point solve did not converge (policy ``on_divergence="warn"``)."""


class HigherOrderGradientError(RuntimeError):
    """Raised when a second derivative is requested through the implicit backward."""


ADVICE = (
    "What to try: (1) make f contract at initialisation: scale f down (e.g. f(z, x) / 100 "
    "or a smaller init of its last layer; training recovers the scale); (2) add Jacobian "
    "regularization (jacobian_regularization='vjp') and weight it in the loss; (3) damp the "
    "iteration (FixedPoint(damping=0.5) or Anderson(beta=0.5)); (4) normalise f's weights "
    "(weight/spectral normalisation); (5) a root-finding solver (broyden, newton_krylov; newton or "
    "trust_region for states of up to a few hundred dimensions) or more steps (max_steps) if the "
    "residual was still falling."
)
"""Advice for a forward solve that diverges, runs away or stalls far from tol: f does not contract."""

BUDGET_ADVICE = (
    "Nothing diverged: the solve was approaching the equilibrium and ran out of steps. What to try: "
    "more steps or a looser tol for these calls (solver_budget(max_steps=..., tol=...) or the layer's "
    "max_steps/tol), or a faster solver (anderson, broyden; newton or trust_region for small states). "
    "A trained model evaluated at the budget it was trained with often leaves some samples just above "
    "tol (a shipped model's card records its converged fraction at that budget); if it was trained "
    "with few steps, `mdeq test --equilibrium-check` tells whether its accuracy holds with more."
)
"""Advice for a forward solve that was converging but hit max_steps."""

BACKWARD_ADVICE = (
    "The gradient of these samples is approximate. What to try: more backward steps or a looser "
    "backward tol (ImplicitBackward(max_steps=..., tol=...)), a Krylov or exact linear solve "
    "(ImplicitBackward(linear_solver='gmres'), or 'dense' for states of up to a few hundred "
    "dimensions), or Jacobian regularization (jacobian_regularization='vjp', weighted in the loss), "
    "which keeps I - J well conditioned."
)
"""Advice for an implicit backward solve that did not reach its tol."""


def budget_bound(result: SolverResult, tol: float) -> bool:
    """Whether a non-converged solve only ran out of steps: no sample diverged, ran away or gave
    NaN, and every failing sample ended within 10x tol, or at a tenth of its first ||f(z) - z|| or
    less, or was still improving (its residual fell over the second half of the trace). Reads tensors on the host (call it after a failure)."""
    bad = ~result.converged
    if _flagged(result, bad):
        return False
    res = result.residual[bad]
    if not bool(torch.isfinite(res).all()):
        return False
    close = res <= 10 * tol
    origin = getattr(result, "origin", None)
    if origin is not None:  # ||f(z) - z|| at most a tenth of where the solve started: well on its way
        close = close | (result.abs_residual[bad] <= 0.1 * origin[0][bad])
    if result.trace is not None and result.trace.shape[0] >= 4:
        tr = result.trace.detach()
        close = close | (tr[-1][bad] < 0.5 * tr[tr.shape[0] // 2][bad])
    return bool(close.all())


def _flagged(result: Any, bad: torch.Tensor) -> bool:
    """Whether any of the ``bad`` samples diverged, ran away or gave NaN at the returned iterate."""
    for name in ("diverged", "runaway", "nonfinite_output"):
        flag = getattr(result, name, None)
        if flag is not None and bool(flag[bad].any()):
            return True
    return False


POLICIES = ("warn", "raise", "ignore")


def check_policy(policy: str) -> str:
    """Validate an ``on_divergence`` policy name."""
    if policy not in POLICIES:
        raise ValueError(f"on_divergence must be one of {POLICIES}, got {policy!r}")
    return policy


def nonconvergence_message(
    result: SolverResult,
    *,
    what: str,
    solver: str,
    tol: float,
    stop_mode: str,
    max_steps: int,
    low_precision: torch.dtype | None = None,
    expected_converged: float | None = None,
) -> str:
    """Describe a solve in which some samples did not converge, with advice that fits: for a
    backward solve, for a forward solve that only ran out of steps (:func:`budget_bound`), or for
    one that diverged or stalled (f does not contract).

    ``what`` names the solve ("forward" or "backward"). ``low_precision`` is the autocast dtype f
    ran in, if any; ``expected_converged`` the converged fraction a pretrained model's card records. Reads tensors on the host: call it only once per solve, after it is known
    that something failed.
    """
    converged = result.converged.detach().cpu()
    diverged = result.diverged.detach().cpu()
    residual = result.residual.detach().cpu()
    n = converged.numel()
    n_bad = int((~converged).sum())
    n_div = int(diverged.sum())
    finite = residual[torch.isfinite(residual)]
    res_txt = (
        f"{stop_mode} residual max {float(finite.max()):.3g}, median {float(finite.median()):.3g}"
        if finite.numel()
        else "residual is NaN/Inf for every sample"
    )
    bounded = what != "backward" and budget_bound(result, tol)
    parts = [
        f"DEQ {what} solve did not converge for {n_bad}/{n} samples "
        f"(solver={solver}, {result.nsteps} steps of max_steps={max_steps}, {result.nfe} f-evaluations, "
        f"tol={tol:g} {stop_mode}): {res_txt}."
    ]
    if result.nonfinite_output is not None and bool(result.nonfinite_output.any()):
        k = int(result.nonfinite_output.sum())
        parts.append(
            f"f returned NaN/Inf when evaluated once more at the returned iterate (for the backward pass) for {k} "
            "sample(s), although the solver measured it finite there: f is not a pure function of (z, x) or is "
            "numerically unstable at that point (overflow, e.g. exp or a division); their gradients would be NaN, "
            "so those samples are reported as diverged."
        )
    if result.runaway is not None and bool(result.runaway.any()):
        k = int(result.runaway.sum())
        parts.append(
            f"For {k} sample(s) the residual fell within tol only because the iterate grew, while ||f(z) - z|| did not "
            "fall to half its starting value: the iterate is running away (f may have no fixed point reachable from "
            "the start, e.g. f(z) - z bounded away from 0), so these are not reported as converged. Check that "
            "f(z, x) = z has a solution for this input (a bias or gain pushing z outward, a missing contraction), "
            "start closer to it (init / z0), or use stop_mode='abs'."
        )
    if result.nonfinite_at_start.any():
        k = int(result.nonfinite_at_start.sum())
        parts.append(
            f"f returned NaN/Inf at its very first evaluation for {k} sample(s): the input or "
            "f itself produces NaN (check the data; scale f down, e.g. f/100, or add Jacobian "
            "regularization)."
        )
    if n_div:
        parts.append(
            f"{n_div} sample(s) diverged (residual became NaN/Inf or grew more than "
            "divergence_factor times its initial value); the best iterate was kept."
        )
    elif result.trace is not None and result.trace.shape[0] >= 4 and not bounded:
        tr = result.trace.detach().cpu()
        late, early = tr[-1][~converged], tr[tr.shape[0] // 2][~converged]
        if late.numel() and bool((late < 0.5 * early).all()):
            parts.append("The residual was still falling: more steps (max_steps) may suffice.")
    precision_floor = low_precision is not None and tol < 2 * torch.finfo(low_precision).eps
    if precision_floor:
        eps = torch.finfo(low_precision).eps
        parts.append(
            f"f ran under autocast in {str(low_precision).replace('torch.', '')}, whose precision (eps {eps:.2g}) puts a "
            f"floor of roughly that size under the residual, above tol={tol:g}: loosen tol to about {2 * eps:.0e} "
            "in mixed precision, or run the solve in float32 (disable autocast around the DEQ)."
        )
    if expected_converged is not None:
        parts.append(
            f"This model's card records {expected_converged:.0%} of samples converged at this budget on its test "
            f"split; this batch had {float(converged.float().mean()):.0%}: check that the inputs are preprocessed "
            "as the card says (size, mean/std) and resemble its training data."
        )
    if what == "backward":
        parts.append(BACKWARD_ADVICE)
    elif bounded:
        if not precision_floor:  # (more steps cannot go below the precision floor)
            parts.append(BUDGET_ADVICE)
    else:
        parts.append(ADVICE)
    return " ".join(parts)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The low-precision dtype autocast uses on ``device`` now, or ``None`` when autocast is off."""
    kind = device.type
    if kind == "meta":  # shapes only: no autocast on meta tensors
        return None
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None



class WarningThrottle:
    """Counts non-convergence events per kind and lets the 1st, 2nd, 4th, 8th... through, so a
    training run that keeps failing stays visible without flooding the log. Picklable."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str) -> int | None:
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        return n if n & (n - 1) == 0 else None


FRAMEWORK_PACKAGES = ("torch", "mdeq", "zoo", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics")
"""Packages whose frames a warning's origin skips: it names the user's code that called into them
(their script, their LightningModule), not Lightning's or torch's files."""


def _internal_dirs() -> tuple[str, ...]:
    dirs = []
    for name in FRAMEWORK_PACKAGES:
        m = sys.modules.get(name)
        if getattr(m, "__file__", None):
            dirs.append(os.path.dirname(os.path.abspath(m.__file__)) + os.sep)  # type: ignore[arg-type, union-attr]
    return tuple(dirs)


def _user_stacklevel() -> int:
    """Stack level of the first frame outside mdeq, torch and Lightning (the user's call; under
    the ``mdeq`` command, the command itself)."""
    internal = _internal_dirs()
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_back is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


NEAR_MISS_FACTOR = 2.0
"""A sample that ends within ``NEAR_MISS_FACTOR * tol`` (finite, not diverged, not running away)
missed tol by a hair: its record says ``converged=False`` and ``converged_fraction`` counts it,
but with ``on_divergence="warn"`` no warning is raised when every failing sample is such a near
miss (the result is the same to within the solver's own accuracy); "raise" stays strict."""


def near_misses_only(result: Any, tol: float) -> bool:
    """Whether every non-converged sample of ``result`` is a near miss (see :data:`NEAR_MISS_FACTOR`)."""
    bad = ~result.converged
    if bool(result.diverged[bad].any()):
        return False
    for flag in (result.runaway, result.nonfinite_output):
        if flag is not None and bool(flag[bad].any()):
            return False
    res = result.residual[bad]
    return bool(torch.isfinite(res).all()) and bool((res <= NEAR_MISS_FACTOR * tol).all())


def within_expected_rate(result: Any, expected: float | None) -> bool:
    """Whether a batch's converged fraction is what a pretrained model's card leads one to expect
    (``expected``, measured at the same budget on the test split): at least ``expected`` minus three
    binomial standard deviations and 2 points, with every failing sample budget-bound (nothing
    diverged, ran away or gave NaN). Such a batch is normal for the model, not worth a warning."""
    if expected is None:
        return False
    bad = ~result.converged
    if _flagged(result, bad):
        return False
    n = result.converged.numel()
    margin = 3.0 * (expected * (1.0 - expected) / max(n, 1)) ** 0.5 + 0.02
    return float(result.converged.float().mean()) >= expected - margin


def report_nonconvergence(
    message: str, policy: str, *, kind: str, throttle: WarningThrottle | None = None, solution: Any = None
) -> None:
    """Apply an ``on_divergence`` policy to a non-convergence ``message``."""
    if policy == "ignore":
        return
    if policy == "raise":
        raise ConvergenceError(message, solution=solution)
    count = throttle(kind) if throttle is not None else 1
    if count is None:
        return
    if count > 1:
        message += f" [{kind} non-convergence #{count} in this layer; repeats are shown at powers of two]"
    warnings.warn(message, ConvergenceWarning, stacklevel=_user_stacklevel())
