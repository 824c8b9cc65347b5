"""The one evaluation: (model, data, budget) -> metrics, without Lightning, the same numbers for
every kind of data, the budget used for the call only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from mdeq.core.budget import SolverBudget
from mdeq.evaluation import evaluate

REPO = Path(__file__).resolve().parents[1]


def test_shipped_digits_weights_measure_what_their_card_says():
    model = zoo.create("mdeq_digits", pretrained=True)
    m = evaluate(model, "digits")
    card = zoo.card("mdeq_digits").metrics
    assert m.num_samples == card.num_test_samples == 360
    assert m.accuracy == pytest.approx(card.test_accuracy, abs=1e-6) and m.nfe == pytest.approx(card.mean_forward_nfe)
    assert m.residual_mean == pytest.approx(card.residual_mean, rel=1e-4) and m.converged_fraction == card.converged_fraction


def test_a_budget_is_used_for_the_call_only_and_the_mode_is_restored():
    model = zoo.create("mdeq_digits", pretrained=True).train()
    deq = next(m for m in model.modules() if hasattr(m, "max_steps"))
    own = (deq.max_steps, deq.tol)
    one_step = evaluate(model, "digits", SolverBudget(max_steps=1))
    assert one_step.nfe == 1.0 and one_step.converged_fraction < 1.0
    assert (deq.max_steps, deq.tol) == own and model.training  # as it was
    assert evaluate(model, "digits", limit=50).nfe > 1.0


def test_every_kind_of_data_gives_the_same_metrics():
    from mdeq.data import get_task

    model = zoo.create("mdeq_digits", pretrained=True)
    test_set = get_task("digits").test_set(limit=100)
    x, y = test_set.normalized()
    by_name = evaluate(model, "digits", limit=100, batch_size=32)
    by_set = evaluate(model, test_set, batch_size=32)
    by_pair = evaluate(model, (x, y), batch_size=32)
    by_batches = evaluate(model, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 100, 32)])
    by_items = evaluate(model, torch.utils.data.TensorDataset(x, y), batch_size=32)
    assert by_name == by_set == by_pair == by_batches == by_items


def test_bad_data_is_named():
    model = zoo.create("mdeq_digits", pretrained=True)
    with pytest.raises(ValueError, match="unknown task 'digit'.*Did you mean 'digits'"):
        evaluate(model, "digit")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(model, [])
    with pytest.raises(ValueError, match="root and limit apply when data is a task name"):
        evaluate(model, (torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), limit=1)
    with pytest.raises(ValueError, match="differ in number"):
        evaluate(model, (torch.zeros(2, 1, 8, 8), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, "digits", batch_size=0)


def test_evaluation_and_the_zoo_need_no_lightning():
    """Importing the zoo, the evaluation and the equilibrium check never imports Lightning."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import zoo, mdeq.evaluation, mdeq.equilibrium_check, zoo.export\n"
        "m = mdeq.evaluation.evaluate(zoo.create('mdeq_digits', pretrained=True), 'digits', limit=20)\n"
        "print(m.num_samples)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("20")
