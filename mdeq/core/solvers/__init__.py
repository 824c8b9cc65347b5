"""Fixed-point solvers, all sharing :class:`Solver`'s loop and selectable by name."""

from mdeq.core.solvers.anderson import Anderson
from mdeq.core.solvers.base import ConvergenceTracker, Solver, SolverResult
from mdeq.core.solvers.broyden import Broyden
from mdeq.core.solvers.fallback import FallbackChain
from mdeq.core.solvers.fixed_point import FixedPoint
from mdeq.core.solvers.gmres import gmres
from mdeq.core.solvers.newton import Newton
from mdeq.core.solvers.newton_krylov import NewtonKrylov
from mdeq.core.solvers.ode import ODESteadyState
from mdeq.core.solvers.registry import SolverSpec, get_solver, list_solvers, register_solver
from mdeq.core.solvers.trust_region import TrustRegion

__all__ = [
    "Anderson",
    "Broyden",
    "ConvergenceTracker",
    "FallbackChain",
    "FixedPoint",
    "Newton",
    "NewtonKrylov",
    "ODESteadyState",
    "Solver",
    "SolverResult",
    "SolverSpec",
    "TrustRegion",
    "get_solver",
    "gmres",
    "list_solvers",
    "register_solver",
]
