"""Convergence reports fit the situation: a forward solve that ran out of steps, one that
diverged, a backward solve; a pretrained model converging as its card says is not warned about;
a caller that reads the records itself (quiet budget) gets no warnings, and "raise" still raises."""

from __future__ import annotations

import warnings

import pytest
import torch

from mdeq import DEQ, ConvergenceError, ConvergenceWarning, SolverBudget, StabilityWarning, TanhCell, solver_budget
from mdeq.core.errors import BUDGET_ADVICE, within_expected_rate
from tests.core.test_near_miss_warning import Linear  # f(z, x) = a z + x


def test_a_solve_that_ran_out_of_steps_gets_budget_advice_not_initialisation_advice():
    deq = DEQ(Linear(0.9), solver="fixed_point", tol=1e-10, max_steps=30)
    with pytest.warns(ConvergenceWarning) as caught:
        deq(torch.ones(2, 3, dtype=torch.float64))
    text = str(caught[0].message)
    assert "ran out of steps" in text and "more steps" in text
    assert "make f contract at initialisation" not in text


def test_a_diverging_solve_gets_the_contraction_advice():
    deq = DEQ(Linear(2.0), solver="fixed_point", tol=1e-6, max_steps=50)
    with pytest.warns(ConvergenceWarning, match="diverged.*make f contract at initialisation"):
        deq(torch.ones(2, 3))


def test_a_backward_solve_gets_backward_advice():
    # the forward converges (Newton), the backward's fixed-point form I - J^T has |J| = 1.5: iteration fails
    deq = DEQ(Linear(1.5), solver="newton", backward={"name": "implicit", "solver": "fixed_point", "max_steps": 10}, tol=1e-8, max_steps=10)
    x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.warns(StabilityWarning, match="repelling equilibrium"):  # true: z* = -2 repels iteration
        z, sol = deq(x)
    assert bool(sol.converged.all())
    with pytest.warns(ConvergenceWarning) as caught:
        z.sum().backward()
    text = str(caught[0].message)
    assert "backward" in text and "gradient of these samples is approximate" in text
    assert "make f contract at initialisation" not in text


def test_quiet_budget_silences_warn_but_not_raise_and_keeps_the_record():
    x = torch.ones(2, 3)
    warn_layer = DEQ(Linear(2.0), solver="fixed_point", tol=1e-6, max_steps=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with solver_budget(quiet=True):
            _, sol = warn_layer(x)
        _, sol2 = warn_layer(x, budget=SolverBudget(quiet=True))
    assert not bool(sol.converged.any()) and bool(sol.diverged.all()) and not bool(sol2.converged.any())
    raise_layer = DEQ(Linear(2.0), solver="fixed_point", tol=1e-6, max_steps=30, on_divergence="raise")
    with solver_budget(quiet=True), pytest.raises(ConvergenceError):
        raise_layer(x)
    with pytest.raises(TypeError, match="quiet"):
        SolverBudget(quiet="yes")
    with solver_budget(quiet=True), solver_budget(max_steps=5) as inner:
        assert inner.quiet is True  # nested budgets keep it


def test_quiet_budget_also_covers_the_backward_of_that_call():
    deq = DEQ(Linear(1.5), solver="newton", backward={"name": "implicit", "solver": "fixed_point", "max_steps": 10}, tol=1e-8, max_steps=10)
    x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    with solver_budget(quiet=True), pytest.warns(StabilityWarning):  # (no record shows a repelling equilibrium: still said)
        z, sol = deq(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z.sum().backward()
    assert not bool(sol.backward.converged.all())


def test_expected_rate_spares_batches_that_converge_as_the_card_says():
    torch.manual_seed(0)
    deq = DEQ(TanhCell(6, weight_scale=0.9), solver="fixed_point", tol=1e-6, max_steps=12)
    x = torch.randn(64, 6) * torch.linspace(0.1, 3.0, 64)[:, None]
    _, probe = deq(x, budget=SolverBudget(quiet=True))
    rate = float(probe.converged.float().mean())
    assert 0.2 < rate < 1.0  # some samples need more than 12 steps
    deq.expected_converged_fraction = rate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq(x)  # as often as the card says: no warning
    deq.expected_converged_fraction = min(1.0, rate + 0.5)
    with pytest.warns(ConvergenceWarning, match=r"card records \d+% of samples converged at this budget"):
        deq(x)
    deq.expected_converged_fraction = rate
    with pytest.warns(ConvergenceWarning, match="ran out of steps"):
        deq(x, budget=SolverBudget(max_steps=6))  # another budget than the card's: the usual report


def test_within_expected_rate_refuses_divergence():
    deq = DEQ(Linear(2.0), solver="fixed_point", tol=1e-6, max_steps=30, on_divergence="ignore")
    _, sol = deq(torch.ones(4, 3))
    assert not within_expected_rate(sol, 0.0)
    assert not within_expected_rate(sol, None)
    assert "more steps" in BUDGET_ADVICE
