"""The equilibrium check: accuracy, convergence and residual at growing solver budgets, and the
verdict that tells a real equilibrium from weights that only work on a truncated iterate."""

from __future__ import annotations

import pytest
import torch

import zoo
from mdeq.cli import main
from mdeq.equilibrium_check import MAX_ACCURACY_DROP, default_budgets, equilibrium_check, equilibrium_verdict, format_check


def row(steps: int, tol: float, acc: float, res: float) -> dict:
    return {"max_steps": steps, "tol": tol, "accuracy": acc, "converged_fraction": 1.0, "residual_mean": res, "mean_forward_nfe": float(steps)}


def test_verdict_holds_when_accuracy_stays_and_the_residual_falls():
    v = equilibrium_verdict([row(25, 1e-2, 0.680, 0.012), row(50, 5e-3, 0.687, 0.006), row(125, 1e-3, 0.683, 0.001)])
    assert v["holds"] and v["accuracy_change"] == pytest.approx(0.003)
    assert v["summary"].startswith("equilibrium holds")


def test_verdict_lost_when_accuracy_falls_with_more_steps():
    # what the second CPU CIFAR-10 run did: 74.6% at 25 steps, 64.8% at 150 (residual still falling slowly)
    v = equilibrium_verdict([row(25, 1e-2, 0.746, 0.101), row(150, 1e-3, 0.648, 0.074)])
    assert not v["holds"] and v["accuracy_change"] == pytest.approx(-0.098)
    assert "equilibrium lost" in v["summary"] and "Jacobian regularization" in v["summary"]


def test_verdict_allows_a_small_drop_but_not_more():
    assert equilibrium_verdict([row(25, 1e-2, 0.70, 0.01), row(125, 1e-3, 0.70 - MAX_ACCURACY_DROP + 1e-6, 0.001)])["holds"]
    assert not equilibrium_verdict([row(25, 1e-2, 0.70, 0.01), row(125, 1e-3, 0.70 - MAX_ACCURACY_DROP - 1e-3, 0.001)])["holds"]


def test_verdict_no_equilibrium_when_the_residual_does_not_fall():
    v = equilibrium_verdict([row(25, 1e-2, 0.5, 0.3), row(125, 1e-3, 0.5, 0.9)])
    assert not v["holds"] and "does not fall" in v["summary"] and "mdeq doctor" in v["summary"]


def test_verdict_needs_two_budgets():
    with pytest.raises(ValueError, match="at least two budgets"):
        equilibrium_verdict([row(25, 1e-2, 0.5, 0.3)])


def test_default_budgets_scale_the_layers_own_settings():
    model = zoo.create("mdeq_digits")  # anderson, 30 steps, tol 1e-3
    assert default_budgets(model) == [(30, 1e-3), (60, 5e-4), (150, pytest.approx(1e-4))]
    assert default_budgets(model, 10, 1e-2)[-1] == (50, pytest.approx(1e-3))
    with pytest.raises(ValueError, match="no DEQ layer"):
        default_budgets(torch.nn.Linear(2, 2))


def test_check_on_shipped_digits_weights_holds_and_leaves_the_model_unchanged():
    model = zoo.create("mdeq_digits", pretrained=True)
    deq = next(m for m in model.modules() if hasattr(m, "max_steps"))
    own = (deq.max_steps, deq.tol)
    check = equilibrium_check(model, "digits")
    assert (deq.max_steps, deq.tol) == own
    assert check["first_n"] == 360 and [r["max_steps"] for r in check["rows"]] == [30, 60, 150]
    residuals = [r["residual_mean"] for r in check["rows"]]
    assert residuals == sorted(residuals, reverse=True) and residuals[-1] < 1e-4  # tighter tol, smaller residual
    assert check["holds"], check["summary"]
    # the first budget is the card's own: the same accuracy the card reports
    assert check["rows"][0]["accuracy"] == pytest.approx(zoo.card("mdeq_digits").metrics.test_accuracy, abs=1e-6)
    assert "equilibrium holds" in format_check(check)


def test_cli_prints_the_check(capsys):
    assert main(["test", "--model", "mdeq_digits", "--equilibrium-check", "--max-steps", "20", "--limit", "100"]) == 0
    out = capsys.readouterr().out
    assert "equilibrium check on 100 test images" in out and "equilibrium holds" in out
    assert [line.split()[0] for line in out.splitlines() if line.strip()[:3] in ("20 ", "40 ", "100")] == ["20", "40", "100"]
    with pytest.raises(SystemExit):
        main(["test", "--model", "mdeq_digits", "--data", "digits", "--max-steps", "0"])
