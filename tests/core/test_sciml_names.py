"""DeepEquilibriumNetworks.jl / SciML names given where mdeq's are expected point to mdeq's."""

from __future__ import annotations

import pytest

from mdeq import DEQ, TanhCell, get_backward, get_solver
from mdeq.core.solvers.registry import SCIML_SOLVERS


@pytest.mark.parametrize("name", sorted(SCIML_SOLVERS))
def test_sciml_solver_names_point_to_ours(name):
    ours = SCIML_SOLVERS[name][0]
    get_solver(ours)  # the counterpart exists
    with pytest.raises(ValueError, match=f"DeepEquilibriumNetworks.jl / SciML name; use solver='{ours}'"):
        get_solver(name)


def test_steady_state_adjoint_points_to_the_implicit_backward():
    with pytest.raises(ValueError, match="use backward='implicit'.*linear_solver='dense'"):
        get_backward("SteadyStateAdjoint")
    with pytest.raises(ValueError, match="use solver='broyden'"):
        DEQ(TanhCell(4), solver="LimitedMemoryBroyden")
