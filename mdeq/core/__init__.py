"""The fixed-point core: solvers, backward modes, Jacobian regularization, solution record."""

from mdeq.core.backward import (
    Backward,
    ImplicitBackward,
    PhantomBackward,
    UnrolledBackward,
    get_backward,
    list_backwards,
)
from mdeq.core.budget import SolverBudget, current_budget, solver_budget
from mdeq.core.equilibrium import EquilibriumResult, solve_equilibrium
from mdeq.core.errors import ConvergenceError, ConvergenceWarning, HigherOrderGradientError
from mdeq.core.jacobian import JacobianRegularization, get_jacobian_regularization, jacobian_frobenius
from mdeq.core.neural_ode import NeuralODE
from mdeq.core.packing import StatePacker
from mdeq.core.solution import BackwardStats, DEQSolution
from mdeq.core.stability import Stability, StabilityWarning, equilibrium_stability
from mdeq.core.solvers import (
    Anderson,
    Broyden,
    FallbackChain,
    FixedPoint,
    Newton,
    NewtonKrylov,
    ODESteadyState,
    Solver,
    SolverResult,
    TrustRegion,
    get_solver,
    list_solvers,
    register_solver,
)

__all__ = [
    "Anderson",
    "Backward",
    "BackwardStats",
    "Broyden",
    "ConvergenceError",
    "ConvergenceWarning",
    "DEQSolution",
    "EquilibriumResult",
    "FallbackChain",
    "FixedPoint",
    "NeuralODE",
    "HigherOrderGradientError",
    "ImplicitBackward",
    "JacobianRegularization",
    "Newton",
    "NewtonKrylov",
    "ODESteadyState",
    "PhantomBackward",
    "Solver",
    "TrustRegion",
    "SolverBudget",
    "SolverResult",
    "Stability",
    "StabilityWarning",
    "StatePacker",
    "UnrolledBackward",
    "current_budget",
    "equilibrium_stability",
    "get_backward",
    "get_jacobian_regularization",
    "get_solver",
    "jacobian_frobenius",
    "list_backwards",
    "list_solvers",
    "register_solver",
    "solver_budget",
    "solve_equilibrium",
]
