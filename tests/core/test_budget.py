"""Solver budgets travel with the call: scoped blocks, nesting, the per-call argument, and the
layer's own settings left as the user set them."""

from __future__ import annotations

import threading

import pytest
import torch

from mdeq import DEQ, TanhCell
from mdeq.core import ConvergenceWarning, JacobianRegularization
from mdeq.core.budget import KEEP, SolverBudget, current_budget, solver_budget
from mdeq.core.options import OptionError


def _layer(**kw):
    torch.manual_seed(0)
    return DEQ(TanhCell(6), tol=1e-6, max_steps=40, **kw)


def test_a_block_sets_the_budget_of_every_call_inside_and_nothing_after() -> None:
    deq = _layer(solver="fixed_point")
    x = torch.randn(3, 6)
    with torch.no_grad():
        _, own = deq(x)
        with solver_budget(max_steps=4, tol=1e-2), pytest.warns(ConvergenceWarning, match="4 steps of max_steps=4"):
            _, short = deq(x)
        _, again = deq(x)
    assert short.nsteps <= 4 and short.tol == 1e-2
    assert own.tol == again.tol == 1e-6 and own.nsteps == again.nsteps > 4
    assert (deq.max_steps, deq.tol) == (40, 1e-6) and current_budget() is None


def test_nested_blocks_override_only_what_they_set_and_the_argument_wins() -> None:
    deq = _layer()
    with solver_budget(max_steps=7, tol=1e-3):
        with solver_budget(tol=1e-2):
            assert deq.budget_for_call()[:2] == (7, 1e-2)
            assert deq.budget_for_call(SolverBudget(max_steps=3))[:2] == (3, 1e-2)
        assert deq.budget_for_call()[:2] == (7, 1e-3)
    assert deq.budget_for_call()[:2] == (40, 1e-6)


def test_the_jacobian_setting_of_a_call() -> None:
    reg = JacobianRegularization()
    deq = _layer(jacobian_regularization="vjp").train()
    own = deq.jacobian_regularization
    x = torch.randn(4, 6)
    with solver_budget(jacobian=None):
        _, off = deq(x)
    with solver_budget(jacobian=reg):
        assert deq.budget_for_call()[2] is reg
        with solver_budget(max_steps=5):  # an inner block that leaves jacobian open keeps the outer one
            assert deq.budget_for_call()[2] is reg
    _, on = deq(x)
    assert off.jacobian_loss is None and on.jacobian_loss is not None
    assert deq.jacobian_regularization is own and SolverBudget().jacobian == KEEP


def test_bad_budgets_are_named() -> None:
    with pytest.raises(OptionError, match="max_steps"):
        SolverBudget(max_steps=0)
    with pytest.raises(OptionError, match="tol"):
        SolverBudget(tol=float("nan"))
    with pytest.raises(TypeError, match="jacobian"):
        SolverBudget(jacobian="vjp")
    with pytest.raises(TypeError, match="not both"):
        with solver_budget(SolverBudget(max_steps=3), tol=1e-3):
            pass


def test_each_thread_sees_its_own_budget() -> None:
    seen = {}

    def worker() -> None:
        seen["thread"] = current_budget()

    with solver_budget(max_steps=9):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert current_budget().max_steps == 9
    assert seen["thread"] is None


def test_record_trace_for_one_call() -> None:
    deq = _layer()
    x = torch.randn(2, 6)
    with torch.no_grad(), solver_budget(record_trace=True):
        _, traced = deq(x)
    _, plain = deq(x)
    assert traced.trace is not None and traced.trace.shape[0] == traced.nsteps and plain.trace is None
    assert deq.record_trace is False
