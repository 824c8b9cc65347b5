"""The DEQ layer: one core type; skip-DEQ and skip-reg DEQ are constructors over it."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from mdeq.core.backward import BackwardSpec, UnrolledBackward, get_backward
from mdeq.core.budget import SolverBudget, current_budget
from mdeq.core.equilibrium import solve_equilibrium
from mdeq.core.errors import WarningThrottle, autocast_dtype, check_policy
from mdeq.core.jacobian import JacobianSpec, get_jacobian_regularization
from mdeq.core.neural_ode import NeuralODE
from mdeq.core.options import OptionError, check_option, choice, integer, real
from mdeq.core.packing import State, StatePacker
from mdeq.core.solution import DEQSolution, SolutionSlot
from mdeq.core.solvers import FixedPoint, SolverSpec, get_solver
from mdeq.core.stability import Stability, StabilityWarning, equilibrium_stability, repelling_message
from mdeq.nn.norms import begin_solve

InitSpec = Union[str, nn.Module, Callable[[Any], State]]
INIT_NAMES = ("zeros", "f0")


def check_cell_signature(f: Callable[..., Any]) -> None:
    """Raise ``TypeError`` unless ``f`` can be called as ``f(z, x)``."""
    target = f.forward if isinstance(f, nn.Module) else f
    if not callable(target):
        raise TypeError(f"f must be an nn.Module or a callable f(z, x), got {type(f).__name__}")
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: trust the caller
    try:
        sig.bind(None, None)
    except TypeError:
        name = type(f).__name__ if isinstance(f, nn.Module) else getattr(f, "__name__", repr(f))
        if isinstance(f, nn.Module):
            how = (
                f"Wrap it so that its parameters stay the DEQ's: DEQ(mdeq.InputInjection({name}(...))) computes "
                f"g(z + x), or write an nn.Module whose forward(z, x) calls it (a lambda z, x: g(z + x) would hide g's "
                "parameters from deq.parameters() and the optimizer)."
            )
        else:
            how = "Wrap it, e.g. lambda z, x: g(z + x) (for an nn.Module g: mdeq.InputInjection(g), which keeps g's parameters)."
        raise TypeError(
            f"f must be callable as f(z, x) (the state z and the input injection x); {name} has signature {sig}. {how}"
        ) from None


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for t in x if isinstance(t, Tensor)]
    return []


def _cell_failure(err: BaseException, state: Any, x: Any) -> str:
    """A message for an exception raised inside the cell, naming the shapes it was called with."""
    shapes = [tuple(t.shape) for t in (state if isinstance(state, tuple) else (state,))]
    xs = [tuple(t.shape) for t in _tensors(x)]
    return (
        f"the cell f(z, x) failed when called with z of shape {shapes[0] if len(shapes) == 1 else shapes} and x of shape "
        f"{xs[0] if len(xs) == 1 else xs}: {err}. Check that the state's shape is what f expects (by default the "
        f"state has x's shape; otherwise set state_shape=... or pass z0)."
    )


def _first_param(module: Any) -> Tensor | None:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p
    return None


STABILITY_MODES = ("auto", "always", "never")
STABILITY_AUTO_MAX_DIM = 64
"""``stability="auto"`` checks states of at most this many dimensions (per sample) by itself."""
STABILITY_EVERY = 100
"""``stability="auto"``: the first training forward is checked, then every this many."""
STABILITY_SAMPLES = 8
"""Samples of the batch a periodic check looks at (bounds its cost)."""
STABILITY_KRYLOV = 20
"""Jacobian-vector products per check: the spectrum is exact for states up to this size."""

DEQ_OPTION_RULES = {
    "stability": choice(*STABILITY_MODES),
    "stop_mode": choice("rel", "abs"),
    "max_steps": integer(1, 1_000_000),
    "tol": real(0.0),
    "divergence_factor": real(1.0, low_open=True, allow_inf=True),
}
"""The DEQ layer's solve options and what each must be (see :mod:`mdeq.core.options`)."""


class DEQ(nn.Module):
    """A deep equilibrium layer: returns z* with z* = f(z*, x), and a :class:`DEQSolution`.

    Args:
        f: the cell, an ``nn.Module`` (or callable) called as ``f(z, x)``; z is a tensor or a
            tuple of tensors (the state), x the input injection.
        solver: forward solver: a name (``"anderson"``, ``"broyden"``, ``"fixed_point"``,
            ``"newton_krylov"``, ``"newton"``, ``"trust_region"``; ``mdeq.list_solvers()``), a mapping ``{"name": ..., **options}`` or a ``Solver``.
        backward: ``"implicit"`` (IFT; default), ``"phantom"`` or ``"unrolled"``, a mapping or
            a ``Backward`` instance (e.g. ``ImplicitBackward(solver="broyden", tol=1e-6)``).
        tol, max_steps, stop_mode: stop when the per-sample residual ("rel" or "abs") is at
            most ``tol``, or after ``max_steps`` iterations.
        init: initial guess: ``"zeros"``; ``"f0"`` (z0 = f(0, x), skip-reg); an ``nn.Module``
            init network (skip-DEQ: its output is trained toward z* through
            ``solution.skip_loss``); or any callable ``init(x)``.
        state_shape: per-sample shape of the state (or a tuple of shapes for a tuple state);
            default: the shape of x (for ``init="zeros"``) or of the initial guess.
        jacobian_regularization: None, True, a backend name ("vjp", "jvp", "finite_diff"), a
            mapping or a ``JacobianRegularization``; computed in training mode with autograd on.
        on_divergence: what to do when samples do not converge: "warn" (repeats within one
            layer are thinned to powers of two), "raise" (``ConvergenceError``) or "ignore".
            The solution always records it.
        divergence_factor: a sample is stopped as diverged when its residual grows to more than
            this factor times its initial residual (or becomes NaN/Inf).
        record_trace: keep the residual of every iteration in ``solution.trace``.
        check_input: reject NaN/Inf inputs with a clear error (one device sync per call).
        early_stop: stop the forward solve once every sample has converged (the default). With
            ``False`` it runs exactly ``max_steps`` iterations (converged samples stay frozen)
            and reads nothing on the host; with ``check_input=False`` and
            ``on_divergence="ignore"`` the whole inference forward then compiles as one graph
            (``torch.compile(..., fullgraph=True)``) or can be captured in a CUDA graph.
        mode: ``"equilibrium"`` (default: solve for z*) or ``"neural_ode"``: integrate
            dz/dt = f(z, x) - z from the initial state over ``t_span`` and return z(T) instead
            (a :class:`~mdeq.core.neural_ode.NeuralODE` instance sets method, tolerances and
            ``gradient="adjoint"`` or ``"backprop"``). Solver and backward settings apply to
            equilibrium mode only; in both modes the solution's residual is that of the returned
            state and ``converged`` compares it with ``tol`` (in neural-ODE mode: whether z(T) is
            an equilibrium, which a short ``t_span`` need not reach).
        t_span: (t0, T) for ``mode="neural_ode"``.
        return_solution: ``True`` (default): a call returns ``(z_star, solution)``; ``False``: only
            ``z_star``, the solution kept in :attr:`last_solution` (a layer in ``nn.Sequential``,
            a function for ``torch.autograd.gradcheck``; add ``last_solution.jacobian_loss`` or
            ``skip_loss`` to the loss as usual). :meth:`solve` always returns both.
        stability: whether to check that the equilibrium found attracts plain iteration
            (spectral radius of df/dz at z* below 1; see :mod:`mdeq.core.stability`): ``"auto"``
            (default) checks, in training mode, states of at most 64 dimensions on the first
            forward and every 100th after, on up to 8 samples; ``"always"`` checks every forward
            and puts the result on ``solution.stability``; ``"never"``. A repelling equilibrium is
            reported once per layer (a :class:`~mdeq.core.stability.StabilityWarning` naming the
            fixes; ``on_divergence="raise"`` raises, ``"ignore"`` stays silent).
            :meth:`request_stability_check` asks for one check on the next training forward (the
            Lightning ``ConvergenceGuard`` does so periodically for larger states).
    """

    # defaults for modules pickled before the stability check existed
    stability = "auto"
    stability_forwards = 0
    stability_requested = False
    stability_warned = False
    last_stability: Stability | None = None

    def __init__(
        self,
        f: nn.Module | Callable[[State, Any], State],
        solver: SolverSpec = "anderson",
        backward: BackwardSpec = "implicit",
        *,
        tol: float = 1e-4,
        max_steps: int = 50,
        stop_mode: str = "rel",
        init: InitSpec = "zeros",
        state_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
        jacobian_regularization: JacobianSpec = None,
        on_divergence: str = "warn",
        divergence_factor: float = 1e2,
        record_trace: bool = False,
        check_input: bool = True,
        early_stop: bool = True,
        mode: str | NeuralODE = "equilibrium",
        t_span: tuple[float, float] | None = None,
        stability: str = "auto",
        return_solution: bool = True,
    ) -> None:
        super().__init__()
        check_cell_signature(f)
        if not isinstance(return_solution, bool):
            raise TypeError(f"DEQ option 'return_solution' must be True or False, got {return_solution!r}")
        self.return_solution = return_solution
        self._last_solution = SolutionSlot()
        self.neural_ode = _neural_ode_mode(mode, t_span, f, jacobian_regularization)
        self.f = f
        self.solver = get_solver(solver)
        self.backward_mode = get_backward(backward)
        for name, value in (
            ("stop_mode", stop_mode), ("max_steps", max_steps), ("tol", tol), ("divergence_factor", divergence_factor), ("stability", stability),
        ):
            check_option("DEQ", name, value, DEQ_OPTION_RULES[name])
        self.stability = stability
        self.stability_forwards = 0  # training forwards seen by the automatic check
        self.stability_requested = False
        self.stability_warned = False
        self.last_stability: Stability | None = None
        self.tol = float(tol)
        self.max_steps = max_steps
        self.stop_mode = stop_mode
        self.divergence_factor = float(divergence_factor)
        self.record_trace = bool(record_trace)
        self.check_input = bool(check_input)
        self.early_stop = bool(early_stop)
        self.on_divergence = check_policy(on_divergence)
        self.warning_throttle = WarningThrottle()
        self.expected_converged_fraction: float | None = None
        """A pretrained layer's converged fraction at its own budget (set from the model card by
        ``zoo.create(pretrained=True)``): batches that converge about as often get no warning."""
        self.jacobian_regularization = get_jacobian_regularization(jacobian_regularization)
        if isinstance(init, str):
            if init not in INIT_NAMES:
                raise ValueError(f"init must be one of {INIT_NAMES}, an nn.Module or a callable; got {init!r}")
        elif not callable(init):
            raise TypeError(f"init must be a name, an nn.Module or a callable init(x); got {type(init).__name__}")
        self.init = init
        self.state_packer = self._packer_for(state_shape)

    @staticmethod
    def _packer_for(state_shape: Any) -> StatePacker | None:
        if state_shape is None:
            return None
        if isinstance(state_shape, (str, bytes)) or not isinstance(state_shape, Sequence):
            raise OptionError(f"DEQ option 'state_shape' must be a per-sample shape (a tuple of sizes >= 1) or a tuple of shapes, got {state_shape!r}")
        shape = tuple(state_shape)
        size = lambda d: isinstance(d, int) and not isinstance(d, bool) and d >= 1  # noqa: E731
        if all(size(d) for d in shape):
            return StatePacker([shape], is_tuple=False)
        if shape and all(isinstance(s, (tuple, list)) and s and all(size(d) for d in s) for s in shape):
            return StatePacker(shape, is_tuple=True)
        raise OptionError(f"DEQ option 'state_shape' must be a per-sample shape (a tuple of sizes >= 1) or a tuple of shapes, got {state_shape!r}")

    @property
    def learned_init(self) -> bool:
        """True when the initial guess is trained toward z* (skip-DEQ and skip-reg)."""
        return isinstance(self.init, nn.Module) or self.init == "f0"

    def extra_repr(self) -> str:
        init = self.init if isinstance(self.init, str) else type(self.init).__name__
        if self.neural_ode is not None:
            return f"mode={self.neural_ode}, init={init!r}"
        return (
            f"solver={self.solver}, backward={self.backward_mode}, tol={self.tol:g}, max_steps={self.max_steps}, "
            f"stop_mode={self.stop_mode!r}, init={init!r}, jacobian_regularization={self.jacobian_regularization}"
        )

    # ---- input checks -------------------------------------------------------------------
    def _check_x(self, x: Any, fixed: bool = False) -> None:
        tensors = _tensors(x)
        check_values = self.check_input and not fixed
        for t in tensors:
            if not t.dtype.is_floating_point:
                raise TypeError(f"the input x must be floating point, got dtype {t.dtype}; convert it with x.float()")
            if check_values and t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError("the input x contains NaN or Inf values; the equilibrium would be NaN. Clean the input.")
        p = _first_param(self.f)
        if p is not None and tensors:
            t = tensors[0]
            if t.device != p.device:
                raise ValueError(f"x is on {t.device} but f's parameters are on {p.device}; move one: model.to(x.device)")
            if t.dtype != p.dtype and self._mixed_precision_dtype(x) is None:
                raise TypeError(
                    f"x has dtype {t.dtype} but f's parameters have dtype {p.dtype}; convert one "
                    f"(model.to({t.dtype}) or x.to({p.dtype})), or run under torch.autocast for mixed precision"
                )

    def _mixed_precision_dtype(self, x: Any) -> torch.dtype | None:
        """Under ``torch.autocast``, the full-precision dtype the solver state is kept in.

        Autocast runs f's convolutions and matmuls in low precision (so x arrives in, e.g.,
        bfloat16), but the solver's own arithmetic (residual norms, Anderson's least squares,
        Broyden's updates) needs the parameters' precision. Returns that dtype when autocast is on
        for x's device and x is in autocast's dtype, else ``None`` (no mixing).
        """
        tensors = _tensors(x)
        p = _first_param(self.f)
        if not tensors or p is None:
            return None
        t = tensors[0]
        if t.dtype != autocast_dtype(t.device):
            return None
        return p.dtype if p.dtype.is_floating_point and p.dtype != t.dtype else None

    def _check_z0(self, z0: State, x: Any, packer: StatePacker, mixed: bool = False) -> None:
        packer.check(z0, "the initial state z0")
        parts = z0 if isinstance(z0, tuple) else (z0,)
        tensors = _tensors(x)
        for t in parts:
            if not t.dtype.is_floating_point:
                raise TypeError(f"the initial state z0 must be floating point, got dtype {t.dtype}")
            if tensors:
                ref = tensors[0]
                if t.shape[0] != ref.shape[0]:
                    raise ValueError(f"x has batch size {ref.shape[0]} but the initial state z0 has batch size {t.shape[0]}")
                if t.dtype != ref.dtype and not mixed:
                    raise TypeError(f"x has dtype {ref.dtype} but the initial state z0 has dtype {t.dtype}; use one dtype")
                if t.device != ref.device:
                    raise ValueError(f"x is on {ref.device} but the initial state z0 is on {t.device}; use one device")

    # ---- forward ------------------------------------------------------------------------
    def initial_state(self, x: Any) -> State:
        """The initial guess z0 for input ``x`` according to ``init``."""
        if self.init == "zeros" or self.init == "f0":
            zeros = self._zeros_like_state(x)
            return self.f(zeros, x) if self.init == "f0" else zeros
        return self.init(x)  # type: ignore[operator]

    def _zeros_like_state(self, x: Any) -> State:
        tensors = _tensors(x)
        if self.state_packer is None:
            if not isinstance(x, Tensor):
                raise ValueError("init='zeros' with a non-tensor x needs state_shape=... to know the state's shape")
            return torch.zeros_like(x)
        if not tensors:
            raise ValueError("cannot infer batch size, dtype and device: x holds no tensor; pass z0 explicitly")
        ref = tensors[0]
        parts = tuple(ref.new_zeros((ref.shape[0], *s)) for s in self.state_packer.shapes)
        return parts if self.state_packer.is_tuple else parts[0]

    def flat_problem(self, x: Any, z0: State | None = None, *, fixed: bool = False) -> tuple[Callable[[Tensor], Tensor], Tensor, StatePacker, State]:
        """The problem this layer solves for input ``x``, on flat states: ``(f_flat, z0_flat,
        packer, z0)`` with f_flat(z) = pack(f(unpack(z), x)). Validates x (its values too, unless
        the call runs a ``fixed`` budget) and z0."""
        self._check_x(x, fixed)
        full = self._mixed_precision_dtype(x)
        if z0 is None:
            z0 = self.initial_state(x)
        packer = self.state_packer or StatePacker.from_state(z0)
        self._check_z0(z0, x, packer, mixed=full is not None)
        if full is not None:  # mixed precision: f runs under autocast, the solver state stays full precision
            z0 = tuple(t.to(full) for t in z0) if isinstance(z0, tuple) else z0.to(full)
        z0_flat = packer.pack(z0, "the initial state z0")
        state_dtype = z0_flat.dtype
        f = self.f

        def f_flat(z: Tensor) -> Tensor:
            state = packer.unpack(z)
            try:
                out = f(state, x)
            except RuntimeError as err:
                if type(err) is not RuntimeError:  # our own errors (e.g. a nested ConvergenceError) pass
                    raise
                raise RuntimeError(_cell_failure(err, state, x)) from err
            flat = packer.pack(out, "the output of f(z, x)")
            return flat if flat.dtype == state_dtype else flat.to(state_dtype)

        return f_flat, z0_flat, packer, z0

    @property
    def last_solution(self) -> DEQSolution | None:
        """The record of the last call made with ``return_solution=False`` (None before one)."""
        slot = getattr(self, "_last_solution", None)  # (modules pickled before the option existed)
        return None if slot is None else slot.value

    def forward(
        self, x: Any, z0: State | None = None, *, unroll: int | None = None, budget: SolverBudget | None = None
    ) -> tuple[State, DEQSolution] | State:
        """``(z_star, solution)`` (see :meth:`solve`); with ``return_solution=False`` only ``z_star``,
        the solution then in :attr:`last_solution` (for ``nn.Sequential`` and ``gradcheck(deq, x)``)."""
        z_star, solution = self.solve(x, z0, unroll=unroll, budget=budget)
        if getattr(self, "return_solution", True):
            return z_star, solution
        if not hasattr(self, "_last_solution"):
            self._last_solution = SolutionSlot()
        self._last_solution.value = solution
        return z_star

    def solve(
        self, x: Any, z0: State | None = None, *, unroll: int | None = None, budget: SolverBudget | None = None
    ) -> tuple[State, DEQSolution]:
        """Solve for the equilibrium of ``f(., x)``; return ``(z_star, solution)``.

        ``z0`` overrides the initial guess (warm start). ``unroll=N`` skips the solver and
        backpropagates through N weight-tied applications of f instead (MDEQ's "pretraining"
        phase); the solution still reports the residual reached and, against the layer's own
        ``tol``, which samples it brings within tolerance. ``budget`` (a
        :class:`~mdeq.core.budget.SolverBudget`) overrides ``max_steps``, ``tol`` and the Jacobian
        regularization for this call only, over any enclosing :func:`~mdeq.core.budget.solver_budget`
        block; the layer's own attributes are never changed.
        """
        if torch.jit.is_tracing():
            self._check_traceable()
        # meta tensors carry shapes, no values (timm's config tests run models on "meta"): the solve
        # is then shape propagation, a fixed budget with no host read
        scoped = self._scoped(budget)  # resolved once per call: budget, fixed, quiet
        fixed = bool(scoped is not None and scoped.fixed) or any(t.is_meta for t in _tensors(x))
        f_flat, z0_flat, packer, z0 = self.flat_problem(x, z0, fixed=fixed)
        if isinstance(self.f, nn.Module):  # once per solve: new dropout masks, refined spectral norms
            begin_solve(self.f.modules())
        max_steps, tol, jacobian, record_trace = self._resolve(scoped)

        if self.neural_ode is not None and unroll is None:
            return self._integrate(f_flat, z0_flat, packer, z0, x, tol)
        use_jr = jacobian is not None and self.training
        if unroll is not None:
            if not (isinstance(unroll, int) and unroll >= 1):
                raise ValueError(f"unroll must be a positive number of steps, got {unroll!r}")
            # N applications of f: iterates z_0..z_N, the last f evaluation only measures z_N
            solver, backward, policy = FixedPoint(), UnrolledBackward(), "ignore"
            solve_tol, solve_steps = 0.0, unroll + 1
        else:
            solver, backward, policy = self.solver, self.backward_mode, self._policy_for_call(scoped, fixed)
            solve_tol, solve_steps = tol, max_steps
        result = solve_equilibrium(
            f_flat,
            z0_flat,
            solver=solver,
            backward=backward,
            tol=solve_tol,
            max_steps=solve_steps,
            stop_mode=self.stop_mode,
            divergence_factor=self.divergence_factor,
            record_trace=record_trace,
            jacobian_regularization=jacobian if use_jr else None,
            on_divergence=policy,
            throttle=self.warning_throttle,
            early_stop=getattr(self, "early_stop", True) and not fixed,  # (modules pickled before the option existed)
            expected_converged=self._expected_converged(max_steps, tol),
        )
        skip_loss = None
        if self.learned_init:
            gap = z0_flat - result.forward.z.detach()
            skip_loss = gap.pow(2).sum() / max(gap.numel(), 1)  # the mean; an empty batch gives 0, not NaN
        stability = None
        if unroll is None and not fixed and self._stability_due():
            # (a repelling equilibrium is reported once per layer even under a quiet budget: no record shows it)
            stability = self._check_stability(f_flat, result.forward.z, result.forward.converged, self.on_divergence)
        # an unrolled pass ran exactly N steps (tol 0): it is reported against the call's tol
        name = solver.name if unroll is None else f"unrolled({unroll})"
        solution = DEQSolution.from_result(
            result, packer, z0, solver=name, tol=tol, stop_mode=self.stop_mode, recheck=unroll is not None,
            skip_loss=skip_loss, stability=stability,
        )
        return solution.z_star, solution

    def _check_traceable(self) -> None:
        """``torch.jit.trace`` records the operations of one run as constants: a solve whose stopping
        step, input check, divergence report or per-sample repairs depend on values of that run is
        replayed with them for every input, and gives wrong outputs (off by 1e-2 and more) without
        a word. Refuse, naming what works."""
        raise RuntimeError(
            "torch.jit.trace cannot record a DEQ faithfully: its solver loop depends on values computed "
            "during the run, so a trace would replay this input's solve for every input. For a compiled "
            "graph use torch.compile(model, fullgraph=True) on a layer built with early_stop=False, "
            "check_input=False, on_divergence='ignore' (exactly max_steps iterations, no host read; "
            "equal to eager)."
        )

    def __prepare_scriptable__(self) -> DEQ:
        """``torch.jit.script`` calls this first: refuse with the route that works, instead of
        TorchScript's compile error deep inside the solver (the solve is a data-dependent loop over
        Python objects: solvers, records, hooks)."""
        raise RuntimeError(
            "torch.jit.script cannot compile a DEQ: its solve is a data-dependent loop over Python solver "
            "objects. Use the eager model, or torch.compile(model, fullgraph=True) on a layer built with "
            "early_stop=False, check_input=False, on_divergence='ignore' for a compiled graph."
        )

    @staticmethod
    def _scoped(budget: SolverBudget | None) -> SolverBudget | None:
        """The call's budget over any enclosing :func:`~mdeq.core.budget.solver_budget` block."""
        scoped = current_budget()
        return scoped if budget is None else budget.over(scoped)

    def _policy_for_call(self, scoped: SolverBudget | None, fixed: bool) -> str:
        """``on_divergence`` for this call (``scoped``: its resolved budget): "ignore" under a fixed
        budget, and "warn" turns silent when the budget is ``quiet`` (its caller reads the records);
        "raise" stays."""
        if fixed:
            return "ignore"
        if self.on_divergence == "warn" and scoped is not None and scoped.quiet:
            return "ignore"
        return self.on_divergence

    def _expected_converged(self, max_steps: int, tol: float) -> float | None:
        """The card's converged fraction of a pretrained layer, when this call runs at the budget it
        was measured at (the layer's own ``max_steps`` and ``tol``)."""
        expected = getattr(self, "expected_converged_fraction", None)  # (modules pickled before it existed)
        if expected is None or max_steps != self.max_steps or tol != self.tol:
            return None
        return expected

    def budget_for_call(self, budget: SolverBudget | None = None) -> tuple[int, float, Any, bool]:
        """(max_steps, tol, Jacobian regularization, record_trace) this layer uses for a call now:
        its own settings under ``budget`` and any enclosing :func:`~mdeq.core.budget.solver_budget` block."""
        return self._resolve(self._scoped(budget))

    def _resolve(self, scoped: SolverBudget | None) -> tuple[int, float, Any, bool]:
        """This layer's own settings under an already resolved budget."""
        own = (self.max_steps, self.tol, self.jacobian_regularization, self.record_trace)
        return own if scoped is None else scoped.resolve(*own)

    # ---- stability of the equilibrium ------------------------------------------------------
    def request_stability_check(self) -> None:
        """Check the stability of the equilibrium on the next training forward (whatever its size)."""
        self.stability_requested = True

    def _stability_due(self) -> bool:
        """Whether this forward may check (``_check_stability`` applies the size and cadence)."""
        if self.stability == "always":
            return True
        return self.stability == "auto" and self.training and torch.is_grad_enabled()

    def _check_stability(self, f_flat: Callable[[Tensor], Tensor], z_star: Tensor, converged: Tensor, policy: str) -> Stability | None:
        """Estimate the spectrum at z* (restoring f's buffers, e.g. batch-norm statistics, that
        the extra evaluations would move) and report a repelling equilibrium once."""
        if self.stability == "auto" and not self.stability_requested:
            if z_star.shape[1] > STABILITY_AUTO_MAX_DIM:
                return None
            due = self.stability_forwards % STABILITY_EVERY == 0
            self.stability_forwards += 1
            if not due:
                return None
        self.stability_requested = False
        every = self.stability == "always"
        # (tensor, version, copy): only buffers written in place by the extra evaluations are put
        # back; rewriting the others would invalidate the graph that saved them for backward
        buffers = [(b, b._version, b.detach().clone()) for b in self.f.buffers()] if isinstance(self.f, nn.Module) else []
        try:
            stab = equilibrium_stability(f_flat, z_star, k=STABILITY_KRYLOV, max_samples=None if every else STABILITY_SAMPLES)
        finally:
            with torch.no_grad():
                for b, version, saved in buffers:
                    if b._version != version or not torch.equal(b, saved):  # (batch norm's kernel
                        b.copy_(saved)  # updates its statistics without a version bump)
        self.last_stability = stab
        if policy != "ignore" and not self.stability_warned:
            bad = stab.repelling & converged[stab.samples]  # unconverged samples are reported anyway
            if bool(bad.any()):
                self.stability_warned = True
                msg = repelling_message(stab, solver=self.solver.name)
                if policy == "raise":
                    from mdeq.core.errors import ConvergenceError

                    raise ConvergenceError(msg)
                from mdeq.core.errors import _user_stacklevel

                warnings.warn(msg, StabilityWarning, stacklevel=_user_stacklevel())
        return stab

    def _integrate(self, f_flat: Callable[[Tensor], Tensor], z0_flat: Tensor, packer: StatePacker, z0: State, x: Any, tol: float) -> tuple[State, DEQSolution]:
        """Neural-ODE mode: z(T) of dz/dt = f(z, x) - z. The record means what it means in
        equilibrium mode: the residual is that of z(T) as an equilibrium, ``converged`` says
        whether z(T) is one within ``tol`` (a short span need not reach it)."""
        assert self.neural_ode is not None
        leaves = [p for p in self.f.parameters() if p.requires_grad] if isinstance(self.f, nn.Module) else []
        leaves += [t for t in _tensors(x) if t.requires_grad]
        record = self.neural_ode.integrate(f_flat, z0_flat, leaves)
        solution = DEQSolution.from_result(
            record.as_equilibrium_result(), packer, z0, solver=self.neural_ode.describe(), tol=tol, stop_mode=self.stop_mode, recheck=True
        )
        return solution.z_star, solution


def deq_layers(module: nn.Module) -> list[DEQ]:
    """Every DEQ layer inside ``module`` (the module itself included), in ``modules()`` order."""
    return [m for m in module.modules() if isinstance(m, DEQ)]


def _neural_ode_mode(mode: Any, t_span: Any, f: Any, jacobian_regularization: Any) -> NeuralODE | None:
    """Validate ``mode``/``t_span``; the :class:`NeuralODE` options in neural-ODE mode, else None."""
    if isinstance(mode, NeuralODE):
        if t_span is not None:
            raise ValueError("give t_span either to NeuralODE(...) or to the layer, not both")
        ode: NeuralODE | None = mode
    elif mode == "neural_ode":
        if t_span is None:
            raise ValueError("mode='neural_ode' needs t_span=(t0, T), the integration interval")
        ode = NeuralODE(t_span=tuple(t_span))  # type: ignore[arg-type]
    elif mode == "equilibrium":
        if t_span is not None:
            raise ValueError("t_span only applies to mode='neural_ode'")
        return None
    else:
        raise ValueError(f"mode must be 'equilibrium', 'neural_ode' or a NeuralODE, got {mode!r}")
    if jacobian_regularization not in (None, False):
        raise ValueError("Jacobian regularization applies to equilibrium mode, not to mode='neural_ode'")
    if ode.gradient == "adjoint" and not isinstance(f, nn.Module):
        raise ValueError(
            "the adjoint gradient needs f to be an nn.Module (its parameters must be known to "
            "integrate their gradients); wrap the cell in a module or use NeuralODE(gradient='backprop')"
        )
    return ode


class SkipDEQ(DEQ):
    """Skip-DEQ (Pal et al., 2022): an explicit network predicts the initial guess.

    ``SkipDEQ(f, init_net)`` sets z0 = init_net(x); ``SkipDEQ(f, None)`` is the skip-reg variant
    with z0 = f(0, x). Either way ``solution.skip_loss`` (mean squared distance between z0 and
    z*) should be added to the training loss. Only a constructor over :class:`DEQ`.
    """

    def __init__(self, f: nn.Module | Callable[[State, Any], State], init_net: nn.Module | None = None, **kwargs: Any) -> None:
        if "init" in kwargs:
            raise TypeError("SkipDEQ takes init_net, not init")
        super().__init__(f, init=init_net if init_net is not None else "f0", **kwargs)
