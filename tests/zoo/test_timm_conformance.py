"""Every zoo image classifier behaves as a timm model under timm's own API: what timm's model tests
(pytorch-image-models ``tests/test_models.py``) check of each registered model, checked here on
ours through ``timm.create_model``.

Not applicable, and excluded as timm excludes its own models from the same tests:
- TorchScript (``torch.jit.script``) and torch.fx tracing: a DEQ's solve is a data-dependent loop;
  both are refused with a clear error (tested below).
- ``deq_mlp_mnist`` works on vectors: it takes timm's non-spatial ("NON_STD") checks, like timm's
  MLP-Mixer and ViT models, and has no feature levels (no ``features_only``).
"""

from __future__ import annotations

import math

import pytest
import torch

import mdeq  # noqa: F401  (registers the zoo with timm when timm is imported)
import timm
from timm.data import create_transform, resolve_data_config

# Freshly initialised models in eval mode have no BatchNorm statistics yet, so their solves need
# not converge (MDEQClassifier's docstring): the ConvergenceWarning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::mdeq.ConvergenceWarning")

NON_SPATIAL = {"deq_mlp_mnist"}
HEAVY = {"mdeq_large", "mdeq_imagenet_small"}  # 10-18M parameters: in the slow set

ALL = timm.list_models("*deq*")
PRETRAINED = timm.list_models("*deq*", pretrained=True)


def _param(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


def _input_size(model_or_name: object, target: int | None = None) -> tuple[int, ...]:
    """The input size timm's tests use: the configured size, capped at ``target`` unless fixed."""
    if isinstance(model_or_name, str):
        size = timm.get_pretrained_cfg_value(model_or_name, "input_size")
        fixed = timm.get_pretrained_cfg_value(model_or_name, "fixed_input_size")
    else:
        size, fixed = model_or_name.default_cfg["input_size"], model_or_name.default_cfg.get("fixed_input_size")
    assert size is not None
    if fixed or target is None or max(size) <= target:
        return tuple(size)
    return (size[0], *(min(s, target) for s in size[1:]))


def test_every_image_classifier_is_listed():
    import zoo
    from zoo.pretrained_cfg import is_image_classifier

    expected = {n for n in zoo.list_models() if is_image_classifier(zoo.entry(n))}
    assert set(ALL) == expected and "deq_toy_regressor" not in ALL
    assert set(PRETRAINED) == set(zoo.list_models(pretrained=True)) - {"deq_toy_regressor"}


@pytest.mark.parametrize("name", _param(ALL))
def test_forward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    out = model(torch.randn(1, *_input_size(model, 384)))
    assert out.shape[0] == 1 and not torch.isnan(out).any()


@pytest.mark.parametrize("name", _param(ALL))
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=42).train()
    out = model(torch.randn(2, *_input_size(name, 128)))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


def _check_names_in_state_dict(model, cfg):
    state = model.state_dict()
    if cfg.get("num_classes"):
        assert cfg["classifier"] + ".weight" in state
    assert cfg["first_conv"] + ".weight" in state


@pytest.mark.parametrize("name", _param([n for n in ALL if n not in NON_SPATIAL]))
def test_head_api_spatial(name):
    """forward_features is unpooled at pool_size with num_features channels; forward_head pools;
    reset_classifier(0) and num_classes=0 give pooled features; global_pool='' the map."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    cfg = model.default_cfg
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *_input_size(model))
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert tuple(feats.shape[2:]) == tuple(cfg["pool_size"]) and feats.shape[1] == model.num_features
        assert pre.shape[1] == model.head_hidden_size
        logits = model.forward_head(feats)
        torch.testing.assert_close(logits, model(x))
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre.shape
        torch.testing.assert_close(pooled, pre)
        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.dim() == 4 and tuple(unpooled.shape[2:]) == tuple(cfg["pool_size"])
        fresh = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()
        out = fresh(x)
        assert out.dim() == 4 and tuple(out.shape[2:]) == tuple(cfg["pool_size"])
    _check_names_in_state_dict(timm.create_model(name, pretrained=False), cfg)


@pytest.mark.parametrize("name", _param([n for n in ALL if n not in NON_SPATIAL]))
def test_config_checks_run_on_the_meta_device(name):
    """timm runs its config checks on "meta" tensors (shapes, no values): a DEQ's solve is then a
    fixed budget with no host read. Also: in_chans, unknown options refused, reset_classifier keeps
    the pooling by default and the model's device, dtype and mode, bfloat16 after a forward."""
    import inspect

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, device="meta", dtype=torch.float32).eval()
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    cfg = model.default_cfg
    assert model.in_chans == cfg["input_size"][0]
    with pytest.raises(TypeError):
        timm.create_model(name, pretrained=False, device="meta", not_a_model_arg=1)
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    x = torch.randn(1, *cfg["input_size"], device="meta")
    feats = model.forward_features(x)
    assert tuple(feats.shape[2:]) == tuple(cfg["pool_size"]) and feats.shape[1] == model.num_features
    model.to(torch.bfloat16)
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0, "")
    model.reset_classifier(2)  # a classifier after no pooling brings the pooling back
    params = list(model.get_classifier().parameters())
    assert params and all(p.device.type == "meta" and p.dtype == torch.float64 for p in params)
    assert not any(m.training for m in model.modules())
    assert model(x.to(torch.float64)).shape == (1, 2)


@pytest.mark.parametrize("name", sorted(NON_SPATIAL))
def test_head_api_non_spatial(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    cfg = model.default_cfg
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *_input_size(model))
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape[1] == model.num_features and pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == pre.shape
        out = timm.create_model(name, pretrained=False, num_classes=0).eval()(x)
        assert out.shape[1] == model.num_features
    _check_names_in_state_dict(timm.create_model(name, pretrained=False), cfg)
    with pytest.raises(ValueError, match="no spatial feature levels"):
        timm.create_model(name, features_only=True)


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_loads_for_other_channels_and_classes(name):
    """timm's check: shipped weights load with in_chans=1 and 5 or 0 classes."""
    five = timm.create_model(name, pretrained=True, in_chans=1, num_classes=5)
    zero = timm.create_model(name, pretrained=True, in_chans=1, num_classes=0)
    x = torch.randn(2, 1, *_input_size(name)[1:])
    with torch.no_grad():
        assert five(x).shape == (2, 5)
        assert zero(x).shape == (2, zero.head_hidden_size)


@pytest.mark.parametrize("name", [n for n in PRETRAINED if n not in NON_SPATIAL])
def test_pretrained_features_only(name):
    model = timm.create_model(name, pretrained=True, features_only=True)
    assert len(model.feature_info) >= 3


@pytest.mark.parametrize("name", _param([n for n in ALL if n not in NON_SPATIAL]))
def test_features_only(name):
    """features_only: at least 3 levels, each with the declared channels and reduction."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    size = _input_size(model, 96)
    with torch.no_grad():
        outs = model(torch.randn(1, *size))
    assert len(outs) == len(channels)
    for c, r, o in zip(channels, reductions, outs):
        assert o.shape[1] == c and o.shape[0] == 1 and not torch.isnan(o).any()
        assert o.shape[2] <= math.ceil(size[1] / r) + 1 and o.shape[3] <= math.ceil(size[2] / r) + 1
    assert not any(k.startswith(("model.head.", "model.classifier.")) for k in model.state_dict()), "the head is dropped"
    assert model.last_solution is not None and model.last_solution.converged.numel() == 1


def test_features_only_selects_levels():
    model = timm.create_model("mdeq_digits", features_only=True, out_indices=(1, 2)).eval()
    assert model.feature_info.channels() == [16, 16] and model.feature_info.reduction() == [1, 2]
    with torch.no_grad():
        outs = model(torch.randn(2, 1, 8, 8))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 8, 8), (2, 16, 4, 4)]
    with pytest.raises(ValueError, match="levels 0..2"):
        timm.create_model("mdeq_digits", features_only=True, out_indices=(3,))


def test_multiscale_levels_are_the_equilibrium():
    """The features of an MDEQ are its solve's per-scale equilibria (what forward classifies)."""
    torch.manual_seed(0)
    model = timm.create_model("mdeq_digits", pretrained=True)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        final, levels = model.forward_intermediates(x)
        inj = model.injection(model.stem(x))
        zs, _ = model.deq(inj, z0=model.initial_state(inj))
        torch.testing.assert_close(levels[0], inj)
        for a, b in zip(levels[1:], zs):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(final, model.forward_features(x))


@pytest.mark.parametrize("name", ["mdeq_digits", "conv_deq_small_gray", "deq_mlp_mnist"])
def test_script_and_fx_are_refused_clearly(name):
    import torch.fx

    model = timm.create_model(name).eval()
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError, match="torch.jit.script cannot compile a DEQ"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match="torch.fx symbolic tracing cannot follow a DEQ"):
        torch.fx.symbolic_trace(model)


@pytest.mark.parametrize("name", PRETRAINED)
def test_timm_inference_recipe_gives_our_preprocessing(name):
    """resolve_data_config + create_transform on a PIL image gives exactly the tensor our data
    pipeline feeds the model: the card's input size, channels, mean and std."""
    from PIL import Image

    import zoo

    model = timm.create_model(name, pretrained=True)
    config = resolve_data_config({}, model=model)
    task = zoo.entry(name).task_info
    assert config["input_size"] == task.input_shape
    transform = create_transform(**config)
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, task.input_shape, generator=g, dtype=torch.uint8)
    pil = Image.fromarray(raw[0].numpy(), mode="L") if raw.shape[0] == 1 else Image.fromarray(raw.permute(1, 2, 0).numpy(), mode="RGB")
    from mdeq.data.normalized import NormalizedTensorDataset

    # 8-bit images (the digits' 0..16 values are such an image scaled by 255/16)
    ours = NormalizedTensorDataset(raw[None], torch.zeros(1, dtype=torch.long), task.mean, task.std, augment=False, scale=255.0)[0][0]
    torch.testing.assert_close(transform(pil), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", ["import mdeq, timm", "import timm, mdeq", "import zoo, timm"])
def test_listed_in_timm_after_import_mdeq_in_either_order(order):
    """`import mdeq` alone does not import timm (or the zoo); importing timm then lists the zoo."""
    import subprocess
    import sys

    code = (
        "import sys; import mdeq; assert 'timm' not in sys.modules and 'zoo' not in sys.modules; "
        if order.startswith("import mdeq")
        else ""
    ) + f"{order}; import timm; print(sorted(timm.list_models('*deq*', pretrained=True)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sorted(PRETRAINED)) and out.stderr == ""
