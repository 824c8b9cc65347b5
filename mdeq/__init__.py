"""mdeq: deep equilibrium models for PyTorch.

>>> from mdeq import DEQ
>>> deq = DEQ(f, solver="anderson", backward="implicit", tol=1e-4, max_steps=50)
>>> z_star, solution = deq(x)
"""

from mdeq.core import (
    Anderson,
    BackwardStats,
    Broyden,
    ConvergenceError,
    ConvergenceWarning,
    DEQSolution,
    FixedPoint,
    HigherOrderGradientError,
    ImplicitBackward,
    JacobianRegularization,
    FallbackChain,
    NeuralODE,
    Newton,
    NewtonKrylov,
    ODESteadyState,
    PhantomBackward,
    Solver,
    TrustRegion,
    SolverBudget,
    StabilityWarning,
    UnrolledBackward,
    equilibrium_stability,
    get_backward,
    get_solver,
    list_backwards,
    list_solvers,
    register_solver,
    solve_equilibrium,
    solver_budget,
)
from mdeq.diagnose import Diagnosis, diagnose
from mdeq.nn import DEQ, ConvResidualCell, InputInjection, MultiScaleDEQ, MultiScaleNeuralODE, MultiScaleSkipDEQ, SkipDEQ, TanhCell, Tempered

__version__ = "0.1.0"

__all__ = [
    "DEQ",
    "Anderson",
    "BackwardStats",
    "Broyden",
    "ConvResidualCell",
    "ConvergenceError",
    "ConvergenceWarning",
    "DEQSolution",
    "Diagnosis",
    "FallbackChain",
    "FixedPoint",
    "HigherOrderGradientError",
    "ImplicitBackward",
    "JacobianRegularization",
    "InputInjection",
    "MultiScaleDEQ",
    "MultiScaleNeuralODE",
    "MultiScaleSkipDEQ",
    "NeuralODE",
    "Newton",
    "NewtonKrylov",
    "ODESteadyState",
    "PhantomBackward",
    "SkipDEQ",
    "Solver",
    "TrustRegion",
    "SolverBudget",
    "StabilityWarning",
    "TanhCell",
    "Tempered",
    "UnrolledBackward",
    "diagnose",
    "equilibrium_stability",
    "get_backward",
    "get_solver",
    "list_backwards",
    "list_solvers",
    "register_solver",
    "solve_equilibrium",
    "solver_budget",
]

from mdeq import timm_hook as _timm_hook  # noqa: E402

_timm_hook.install()  # the zoo's models appear in timm once timm is imported
