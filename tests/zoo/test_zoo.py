"""The zoo: names, cards, shipped weights re-measured, and weights that must be refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

import zoo
from zoo.weights import WeightsError, load_weights, read_tensors, save_weights, sha256_of

REPO = Path(__file__).resolve().parents[2]
SHIPPED = zoo.list_models(pretrained=True)


def test_names_and_errors():
    assert {"mdeq_tiny", "mdeq_large", "conv_deq_small", "mdeq_digits"} <= set(zoo.list_models())
    with pytest.raises(ValueError, match="unknown model 'mdeq_tyni'.*Did you mean 'mdeq_tiny'"):
        zoo.create("mdeq_tyni")
    with pytest.raises(ValueError, match="no pretrained weights ship for 'mdeq_large'"):
        zoo.create("mdeq_large", pretrained=True)
    with pytest.raises(ValueError, match="no shipped weights, so no model card"):
        zoo.card("mdeq_large")
    rows = zoo.list_models(details=True)
    assert all({"name", "task", "weights"} <= set(r) for r in rows)


def test_at_least_one_model_ships_weights():
    assert "mdeq_digits" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_card_is_complete_and_matches_the_file(name):
    card = zoo.card(name)  # typed and validated: every field present with its type
    entry = zoo.entry(name)
    assert (card.name, card.task, card.architecture) == (name, entry.task, entry.architecture.__name__)
    assert card.preprocessing.input_shape == entry.input_shape and card.license
    path = entry.weights_path()
    assert sha256_of(path) == card.sha256
    assert path.stat().st_size < 20 * 2**20
    assert (REPO / card.provenance.train_config).is_file()
    model = zoo.create(name, pretrained=True)
    assert not model.training and sum(p.numel() for p in model.parameters()) == card.num_params


# The accuracy each task's shipped weights must reach on the full official test split (issue #5;
# deq_mlp_mnist is the julialang.org DiffEqFlux blog post's small MLP DEQ, held to what it reached when shipped;
# the CIFAR-10 models were trained on a CPU and are held to what they reached: conv_deq_small 75.1%
# and mdeq_tiny 81.8%; the tutorial's 81.6% and the paper's 87.1% are the goals for GPU-trained weights).
TARGETS = {
    "mdeq_digits": 0.98, "mdeq_mnist": 0.994, "mdeq_fashion_mnist": 0.915, "deq_mlp_mnist": 0.97,
    "conv_deq_small_cifar10": 0.75, "mdeq_tiny_cifar10": 0.81,
}
DATA = Path(os.environ.get("MDEQ_DATA", REPO.parent / "shared" / "data"))


# The CIFAR-10 re-measures (2000 images through 30 Anderson steps: about 5 minutes on 2 cores
# together) run with -m slow; CI's default run keeps the digits and MNIST-family ones.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if zoo.entry(n).task == "cifar10" else n for n in SHIPPED])
def test_shipped_weights_reach_their_card_accuracy(name):
    """Re-measure on the real test split (digits: all 360 images; other tasks: the card's fixed
    slice of the first images), within 0.5 points of the card."""
    from mdeq.evaluation import evaluate

    card = zoo.card(name)
    assert name in TARGETS, f"{name} ships weights but has no accuracy target in this test"
    assert card.metrics.test_accuracy >= TARGETS[name]
    model = zoo.create(name, pretrained=True)
    if card.task == "digits":
        measured = evaluate(model, "digits")
        assert abs(measured.accuracy - card.metrics.test_accuracy) <= 0.005
        return
    folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}[card.task]
    if not (DATA / folder).is_dir():
        pytest.skip(f"{card.task} test data not found under {DATA} (set MDEQ_DATA to the folder holding {folder}/)")
    sl = card.metrics.test_slice
    measured = evaluate(model, card.task, root=str(DATA), limit=sl.first_n)
    assert measured.num_samples == sl.first_n
    assert abs(measured.accuracy - sl.accuracy) <= 0.005


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_keep_their_equilibrium(name):
    """Every card carries an equilibrium check (its own budget, then 2x and 5x the steps at a
    tighter tol) whose verdict holds: nothing ships that only works on a truncated iterate."""
    from mdeq.equilibrium_check import equilibrium_verdict

    card = zoo.card(name)
    check = card.equilibrium_check
    assert check is not None, f"{name}'s card has no equilibrium check (re-export, or zoo.export.remeasure_card)"
    rows = [vars(r) for r in check.rows]
    assert (rows[0]["max_steps"], rows[0]["tol"]) == (card.solver.max_steps, card.solver.tol)
    assert rows[-1]["max_steps"] >= 5 * rows[0]["max_steps"] and rows[-1]["tol"] <= rows[0]["tol"] / 10 * 1.0001
    assert equilibrium_verdict(rows) == {"holds": check.holds, "accuracy_change": check.accuracy_change, "summary": check.summary}  # not edited by hand
    assert check.holds, check.summary
    # the first budget is the card's own, on the card's test slice: the same accuracy
    sl = card.metrics.test_slice
    expected = sl.accuracy if sl is not None else card.metrics.test_accuracy
    assert check.first_n == (sl.first_n if sl is not None else card.metrics.num_test_samples)
    assert rows[0]["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_pretrained_with_another_class_count_reinitialises_only_the_head():
    ref = zoo.create("mdeq_digits", pretrained=True)
    torch.manual_seed(0)
    five = zoo.create("mdeq_digits", pretrained=True, num_classes=5)
    a, b = ref.state_dict(), five.state_dict()
    changed = sorted(k for k in a if a[k].shape != b[k].shape)
    assert changed and all(b[k].shape[0] == 5 and a[k].shape[0] == 10 for k in changed)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in changed)  # the rest is the shipped weights
    assert five(torch.randn(2, 1, 8, 8)).shape == (2, 5)


def test_same_weights_through_timm():
    import timm

    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(timm.create_model("mdeq_digits", pretrained=True)(x), zoo.create("mdeq_digits", pretrained=True)(x))


def test_changed_bytes_are_refused(shipped_copy):
    data = bytearray(shipped_copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shipped_copy.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        zoo.create("mdeq_digits", pretrained=True)


def test_truncated_file_is_refused(shipped_copy):
    data = shipped_copy.read_bytes()
    shipped_copy.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        zoo.create("mdeq_digits", pretrained=True)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        read_tensors(shipped_copy)


def test_another_models_file_is_refused(shipped_copy, tmp_path):
    other = tmp_path / "other.safetensors"
    save_weights(zoo.create("conv_deq_small_gray"), other)
    assert other.stat().st_mode & 0o777 == 0o644  # shippable: safetensors alone writes 0600
    with pytest.raises(WeightsError, match="does not fit MDEQClassifier.*missing.*unexpected"):
        load_weights(zoo.create("mdeq_digits"), other)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": payload}, fh, protocol=2)  # (torch.save's protocol: no "protocol 4" notice)
    with pytest.raises(WeightsError, match="refused to load.*weights_only"):
        load_weights(zoo.create("mdeq_digits"), evil)
    assert not marker.exists()


def test_readme_table_is_generated_from_the_cards():
    from zoo.readme import BEGIN, END, render_table

    text = (REPO / "README.md").read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == render_table(), "README zoo table is stale: run `python -m zoo.readme`"


@pytest.mark.parametrize("name", SHIPPED)
def test_the_solver_budget_belongs_to_the_entry_not_to_pretrained(name):
    """create(name) + the shipped state dict computes what create(name, pretrained=True) computes:
    the card's architecture options (the budget included) build the entry either way."""
    shipped = zoo.create(name, pretrained=True)
    built = zoo.create(name)
    built.load_state_dict(read_tensors(zoo.entry(name).weights_path()))
    built.eval()
    own = [(d.max_steps, d.tol, d.solver.name) for d in shipped.modules() if hasattr(d, "max_steps") and hasattr(d, "solver")]
    assert own == [(d.max_steps, d.tol, d.solver.name) for d in built.modules() if hasattr(d, "max_steps") and hasattr(d, "solver")]
    c = zoo.card(name)
    assert own[0][:2] == (c.solver.max_steps, c.solver.tol)
    shape = zoo.entry(name).input_shape
    torch.manual_seed(0)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(built(x), shipped(x), rtol=0, atol=0)


def test_pretrained_layers_know_their_cards_converged_fraction():
    from mdeq.nn.deq import deq_layers

    for name in ("mdeq_digits", "conv_deq_small_cifar10"):
        card_fraction = zoo.card(name).metrics.converged_fraction
        layers = deq_layers(zoo.create(name, pretrained=True))
        assert layers and all(layer.expected_converged_fraction == pytest.approx(card_fraction) for layer in layers)
        assert all(layer.expected_converged_fraction is None for layer in deq_layers(zoo.create(name)))  # untrained: no claim
