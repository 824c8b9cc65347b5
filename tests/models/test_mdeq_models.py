"""The MDEQ image classifiers and the tutorial conv DEQ."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from mdeq.models import (
    MDEQClassifier,
    MDEQConfig,
    conv_deq_small,
    conv_deq_small_gray,
    mdeq_imagenet_small,
    mdeq_large,
    mdeq_tiny,
    mdeq_tiny_gray,
)
from mdeq.nn.mdeq_blocks import VariationalDropout2d


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "build, published",
    [(mdeq_tiny, 0.165e6), (mdeq_large, 10.5e6), (mdeq_imagenet_small, 17.5e6), (conv_deq_small, 65e3)],
)
def test_parameter_counts_match_published_within_10_percent(build, published):
    assert abs(n_params(build()) - published) / published < 0.10


def test_mdeq_tiny_converges_at_random_init():
    """Training starts here: >= 95% of a CIFAR-sized batch below 1e-2 within the default budget."""
    model = mdeq_tiny().train()
    with torch.no_grad():
        logits, sol = model(torch.randn(32, 3, 32, 32), return_solution=True)
    assert logits.shape == (32, 10)
    assert float((sol.residual < 1e-2).float().mean()) >= 0.95
    assert sol.nfe <= model.config.max_steps


def test_grayscale_variant_and_conv_deq_shapes():
    model = mdeq_tiny_gray().train()
    with torch.no_grad():
        logits, sol = model(torch.randn(4, 1, 28, 28), return_solution=True)
    assert logits.shape == (4, 10) and float((sol.residual < 1e-2).float().mean()) == 1.0
    for build, shape in ((conv_deq_small, (2, 3, 32, 32)), (conv_deq_small_gray, (2, 1, 28, 28))):
        m = build().train()
        logits, sol = m(torch.randn(*shape), return_solution=True)
        assert logits.shape == (2, 10) and sol.all_converged


def test_training_step_reaches_every_parameter():
    model = mdeq_tiny(channels=(8, 8), head_channels=(2, 4), final_channels=16, expansion=2, num_groups=4)
    x = torch.randn(4, 3, 16, 16)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_input_errors_are_clear():
    model = mdeq_tiny()
    with pytest.raises(ValueError, match="expected 3 input channel"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"image size \(31, 31\) must be divisible by 2"):
        model(torch.randn(2, 3, 31, 31))
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 32, 32\)"):
        conv_deq_small()(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="head_channels has 1 entries for 2 branches"):
        MDEQConfig(head_channels=(8,))
    with pytest.raises(ValueError, match="num_groups=8 must divide"):
        MDEQConfig(channels=(12, 20), num_groups=8)


def test_variational_dropout_mask_is_fixed_within_a_solve_and_renewed_between():
    model = mdeq_tiny(dropout=0.2, on_divergence="ignore").train()
    drops = [m for m in model.modules() if isinstance(m, VariationalDropout2d)]
    assert drops
    x = torch.randn(4, 3, 32, 32)
    logits, sol = model(x, return_solution=True)
    first = drops[0].mask.clone()
    # the solve itself converged with dropout on: the map kept one fixed point
    assert float((sol.residual < 1e-2).float().mean()) >= 0.75
    model(x)
    assert not torch.equal(first, drops[0].mask)
    model.eval()
    a, b = model(x), model(x)
    torch.testing.assert_close(a, b)


def test_weight_norm_variant_trains_and_copies():
    model = mdeq_tiny(weight_norm=True, on_divergence="ignore")
    assert any(n.endswith("weight_g") for n, _ in model.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    clone = copy.deepcopy(model)
    again = pickle.loads(pickle.dumps(model))
    model.eval(), clone.eval(), again.eval()
    torch.testing.assert_close(model(x), clone(x))
    torch.testing.assert_close(model(x), again(x))


def test_unroll_pretraining_through_the_classifier():
    model = mdeq_tiny()
    logits, sol = model(torch.randn(2, 3, 32, 32), return_solution=True, unroll=4)
    assert sol.solver == "unrolled(4)"
    logits.sum().backward()


def test_config_overrides_and_solver_choice():
    model = MDEQClassifier(MDEQConfig(), solver="broyden", max_steps=12)
    assert model.deq.solver.name == "broyden" and model.deq.max_steps == 12
    with pytest.raises(TypeError):
        MDEQClassifier(MDEQConfig(), max_step=12)
