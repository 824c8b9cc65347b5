"""A sweep of bad inputs over every public entry point: each must raise an error that names the
problem (checked by message), never a bare failure from deep inside torch.

Cases are grouped by entry point (the first part of each id); the issue's closing note reports
the counts per group.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import torch
from torch import nn

import zoo
from mdeq import DEQ, MultiScaleDEQ, MultiScaleSkipDEQ, NeuralODE, SkipDEQ, TanhCell
from mdeq.nn import NoConnection
from mdeq.cli import main as cli_main
from mdeq.lightning import CIFAR10DataModule, ClassificationModule, DigitsDataModule, FashionMNISTDataModule, MNISTDataModule
from mdeq.models import conv_deq_small, deq_mlp_mnist, mdeq_digits


class Inject(nn.Module):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


def cell() -> TanhCell:
    return TanhCell(4)


def setup(dm: Any) -> None:
    dm.setup("fit")


X = lambda *s, **k: torch.randn(*s, **k)  # noqa: E731

CASES: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    # ---- DEQ constructor ---------------------------------------------------------------------
    ("deq_init/cell_f(z)", lambda: DEQ(lambda z: z), TypeError, r"f\(z, x\).*signature \(z\)"),
    ("deq_init/cell_f(z,p,t)", lambda: DEQ(lambda z, p, t: z), TypeError, r"signature \(z, p, t\)"),
    ("deq_init/cell_not_callable", lambda: DEQ(3), TypeError, "callable"),
    ("deq_init/solver_typo", lambda: DEQ(cell(), solver="andersen"), ValueError, "Did you mean 'anderson'"),
    ("deq_init/solver_option_typo", lambda: DEQ(cell(), solver={"name": "anderson", "mm": 3}), ValueError, "unknown option 'mm'.*Did you mean 'm'"),
    ("deq_init/backward_typo", lambda: DEQ(cell(), backward="implict"), ValueError, "Did you mean 'implicit'"),
    ("deq_init/tol_negative", lambda: DEQ(cell(), tol=-1), ValueError, "DEQ option 'tol' must be a finite number >= 0, got -1"),
    ("deq_init/max_steps_zero", lambda: DEQ(cell(), max_steps=0), ValueError, "DEQ option 'max_steps' must be an integer >= 1"),
    ("deq_init/max_steps_float", lambda: DEQ(cell(), max_steps=2.5), ValueError, "DEQ option 'max_steps' must be an integer"),
    ("deq_init/stop_mode", lambda: DEQ(cell(), stop_mode="relative"), ValueError, "DEQ option 'stop_mode' must be one of 'rel', 'abs'"),
    ("deq_init/init_name", lambda: DEQ(cell(), init="zero"), ValueError, "init must be one of"),
    ("deq_init/init_type", lambda: DEQ(cell(), init=3), TypeError, "init must be a name"),
    ("deq_init/state_shape", lambda: DEQ(cell(), state_shape="abc"), ValueError, "DEQ option 'state_shape' must be"),
    ("deq_init/jacobian_backend", lambda: DEQ(cell(), jacobian_regularization="vjq"), ValueError, "backend must be one of"),
    ("deq_init/jacobian_option", lambda: DEQ(cell(), jacobian_regularization={"n_probe": 2}), ValueError, "valid: backend, n_probes"),
    ("deq_init/on_divergence", lambda: DEQ(cell(), on_divergence="warning"), ValueError, "on_divergence must be one of"),
    ("deq_init/divergence_factor", lambda: DEQ(cell(), divergence_factor=0.5), ValueError, "DEQ option 'divergence_factor' must be a number > 1"),
    ("deq_init/mode", lambda: DEQ(cell(), mode="ode"), ValueError, "mode must be"),
    ("deq_init/stability", lambda: DEQ(cell(), stability="sometimes"), ValueError, "DEQ option 'stability' must be one of 'auto', 'always', 'never'"),
    # issue #28's sweep: wrong types and absurd values got obscure errors or were accepted
    ("deq_init/tol_none", lambda: DEQ(cell(), tol=None), ValueError, "DEQ option 'tol' must be a finite number >= 0, got None"),
    ("deq_init/tol_string", lambda: DEQ(cell(), tol="1e-3"), ValueError, "DEQ option 'tol' must be a finite number"),
    ("deq_init/tol_nan", lambda: DEQ(cell(), tol=float("nan")), ValueError, "DEQ option 'tol' must be a finite number"),
    ("deq_init/state_shape_negative", lambda: DEQ(cell(), state_shape=(-4,)), ValueError, r"'state_shape' must be a per-sample shape \(a tuple of sizes >= 1\)"),
    ("deq_init/state_shape_tuple_of_empty", lambda: DEQ(cell(), state_shape=((4,), ())), ValueError, "'state_shape' must be"),
    ("solver/anderson_m_float", lambda: DEQ(cell(), solver={"name": "anderson", "m": 5.0}), ValueError, "Anderson option 'm' must be an integer >= 1 and <= 1000, got 5.0"),
    ("solver/anderson_m_huge", lambda: DEQ(cell(), solver={"name": "anderson", "m": 10**9}), ValueError, "Anderson option 'm' must be an integer >= 1 and <= 1000"),
    ("solver/anderson_lam_nan", lambda: DEQ(cell(), solver={"name": "anderson", "lam": float("nan")}), ValueError, "Anderson option 'lam' must be a finite number >= 0, got nan"),
    ("solver/broyden_memory_huge", lambda: DEQ(cell(), solver={"name": "broyden", "memory": 10**7}), ValueError, "Broyden option 'memory' must be an integer >= 1 and <= 1000"),
    ("solver/fixed_point_damping_string", lambda: DEQ(cell(), solver={"name": "fixed_point", "damping": "0.5"}), ValueError, "FixedPoint option 'damping' must be a finite number >= 0 and < 1"),
    ("solver/newton_krylov_dim", lambda: DEQ(cell(), solver={"name": "newton_krylov", "krylov_dim": 0}), ValueError, "NewtonKrylov option 'krylov_dim' must be an integer >= 1"),
    ("solver/newton_krylov_jvp", lambda: DEQ(cell(), solver={"name": "newton_krylov", "jvp": "exact"}), ValueError, "NewtonKrylov option 'jvp' must be one of 'auto'"),
    ("solver/ode_safety_negative", lambda: DEQ(cell(), solver={"name": "ode", "safety": -1}), ValueError, "ODESteadyState option 'safety' must be a finite number > 0 and <= 1"),
    ("solver/ode_rtol_nan", lambda: DEQ(cell(), solver={"name": "ode", "rtol": float("nan")}), ValueError, "ODESteadyState option 'rtol' must be a finite number >= 0"),
    ("solver/ode_max_time_negative", lambda: DEQ(cell(), solver={"name": "ode", "max_time": -1.0}), ValueError, "ODESteadyState option 'max_time' must be a number > 0"),
    ("solver/ode_h0", lambda: DEQ(cell(), solver={"name": "ode", "h0": 0.0}), ValueError, "ODESteadyState option 'h0' must be a finite number > 0 \\(or None\\)"),
    ("solver/fallback_string", lambda: DEQ(cell(), solver={"name": "fallback", "solvers": "anderson"}), TypeError, "takes a sequence of solvers"),
    ("deq_init/neural_ode_no_t_span", lambda: DEQ(cell(), mode="neural_ode"), ValueError, "needs t_span"),
    ("deq_init/neural_ode_option", lambda: NeuralODE(methd="rk4"), TypeError, "methd"),
    ("deq_init/skip_init_kwarg", lambda: SkipDEQ(cell(), init="zeros"), TypeError, "takes init_net, not init"),
    # ---- DEQ forward ------------------------------------------------------------------------
    ("deq_forward/int_dtype", lambda: DEQ(cell())(torch.ones(2, 4, dtype=torch.long)), TypeError, "must be floating point"),
    ("deq_forward/nan_input", lambda: DEQ(cell())(torch.full((2, 4), float("nan"))), ValueError, "NaN or Inf"),
    ("deq_forward/inf_input", lambda: DEQ(cell())(torch.full((2, 4), float("inf"))), ValueError, "NaN or Inf"),
    ("deq_forward/no_batch_dim", lambda: DEQ(cell())(torch.tensor(1.0)), ValueError, "batch dimension"),
    ("deq_forward/wrong_features", lambda: DEQ(cell())(X(2, 5)), RuntimeError, r"cell f\(z, x\) failed when called with z of shape \(2, 5\)"),
    ("deq_forward/z0_shape", lambda: DEQ(cell())(X(2, 4), z0=X(2, 3)), RuntimeError, r"z of shape \(2, 3\) and x of shape \(2, 4\)"),
    ("deq_forward/z0_batch", lambda: DEQ(cell())(X(2, 4), z0=X(3, 4)), ValueError, "batch size 2 but the initial state z0 has batch size 3"),
    ("deq_forward/z0_dtype", lambda: DEQ(cell())(X(2, 4), z0=X(2, 4, dtype=torch.float64)), TypeError, "use one dtype"),
    ("deq_forward/z0_device", lambda: DEQ(cell())(X(2, 4), z0=torch.ones(2, 4, device="meta")), ValueError, "use one device"),
    ("deq_forward/x_dtype_vs_params", lambda: DEQ(cell())(X(2, 4, dtype=torch.float64)), TypeError, "parameters have dtype torch.float32"),
    ("deq_forward/x_not_tensor", lambda: DEQ(cell())("abc"), ValueError, "non-tensor x needs state_shape"),
    ("deq_forward/unroll_zero", lambda: DEQ(cell())(X(2, 4), unroll=0), ValueError, "unroll must be a positive number"),
    # ---- multiscale constructors -----------------------------------------------------------------
    ("multiscale/state_shape_kwarg", lambda: MultiScaleDEQ([Inject()], [[None]], state_shape=(2,)), TypeError, "takes scales"),
    ("multiscale/main_not_module", lambda: MultiScaleDEQ([3], [[None]]), TypeError, r"main_layers\[0\] must be an nn.Module"),
    ("multiscale/mapping_not_square", lambda: MultiScaleDEQ([Inject(), nn.Linear(2, 2)], [[None]]), ValueError, "n x n matrix"),
    ("multiscale/scale_without_input", lambda: MultiScaleDEQ([Inject(), nn.Linear(2, 2)], [[None, None], [nn.Linear(2, 2), NoConnection()]]), ValueError, "scale 1 receives no input"),
    ("multiscale/scales_count", lambda: MultiScaleDEQ([Inject()], [[None]], scales=((2,), (2,))), ValueError, "scales"),
    ("multiscale/post_fuse_count", lambda: MultiScaleDEQ([Inject()], [[None]], [None, None]), ValueError, "post_fuse_layers needs one entry per scale"),
    ("multiscale/skip_init_layers_count", lambda: MultiScaleSkipDEQ([Inject()], [[None]], init_layers=[nn.Linear(2, 2)] * 2), ValueError, "init_layers needs one module per scale"),
    # ---- model zoo ---------------------------------------------------------------------------
    ("zoo/unknown_name", lambda: zoo.create("mdeq_tyni"), ValueError, "unknown model 'mdeq_tyni'.*Did you mean 'mdeq_tiny'"),
    ("zoo/no_weights", lambda: zoo.create("mdeq_large", pretrained=True), ValueError, "no pretrained weights ship for 'mdeq_large'"),
    ("zoo/option_typo", lambda: zoo.create("mdeq_tiny", chanels=(8, 8)), TypeError, "no option 'chanels'.*Did you mean 'channels'"),
    ("zoo/option_typo_conv", lambda: zoo.create("conv_deq_small", inner_chanels=8), TypeError, "Did you mean 'inner_channels'"),
    ("zoo/card_unknown", lambda: zoo.card("nope"), ValueError, "unknown model 'nope'"),
    ("zoo/card_without_weights", lambda: zoo.card("mdeq_large"), ValueError, "no shipped weights"),
    # ---- models' forward ------------------------------------------------------------------------
    ("models/mdeq_wrong_size", lambda: mdeq_digits()(X(2, 1, 9, 9)), ValueError, r"image size \(9, 9\) must be divisible"),
    ("models/mdeq_wrong_channels", lambda: mdeq_digits()(X(2, 3, 8, 8)), ValueError, "expected 1 input channel"),
    ("models/mdeq_flat_input", lambda: mdeq_digits()(X(2, 64)), ValueError, r"expected images of shape \(batch, 1, H, W\)"),
    ("models/mdeq_bad_groups", lambda: zoo.create("mdeq_tiny", channels=(10, 10)), ValueError, "num_groups=8 must divide"),
    ("models/conv_deq_size", lambda: conv_deq_small()(X(2, 3, 28, 28)), ValueError, r"expected images of shape \(batch, 3, 32, 32\)"),
    ("models/deq_mlp_flat", lambda: deq_mlp_mnist()(X(2, 784)), ValueError, r"expected inputs of shape \(batch, 1, 28, 28\)"),
    # ---- LightningModule -----------------------------------------------------------------------
    ("module/unknown_backbone", lambda: ClassificationModule(backbone="mdeq_tyni"), ValueError, "Did you mean 'mdeq_tiny'"),
    ("module/optimizer", lambda: ClassificationModule(optimizer="adamm"), ValueError, "unknown optimizer 'adamm'"),
    ("module/scheduler", lambda: ClassificationModule(scheduler="cosin"), ValueError, "unknown scheduler 'cosin'"),
    ("module/lr_negative", lambda: ClassificationModule(lr=-1.0), ValueError, "lr must be > 0"),
    ("module/weight_decay_negative", lambda: ClassificationModule(weight_decay=-1.0), ValueError, "weight_decay must be >= 0"),
    ("module/jacobian_weight", lambda: ClassificationModule(jacobian_weight=-1.0), ValueError, "weights must be >= 0"),
    ("module/min_lr_ratio_negative", lambda: ClassificationModule(min_lr_ratio=-1.0), ValueError, r"min_lr_ratio must be in \[0, 1\]"),
    ("module/min_lr_ratio_above_one", lambda: ClassificationModule(min_lr_ratio=2.0), ValueError, r"min_lr_ratio must be in \[0, 1\]"),
    ("module/lr_nan", lambda: ClassificationModule(lr=float("nan")), ValueError, r"lr must be > 0 \(a finite number\), got nan"),
    ("module/momentum", lambda: ClassificationModule(momentum=1.5), ValueError, r"momentum must be in \[0, 1\)"),
    ("module/warmup_float", lambda: ClassificationModule(warmup_steps=2.5), ValueError, r"warmup_steps must be >= 0 \(an integer\)"),
    ("module/jacobian_probes", lambda: ClassificationModule(jacobian_probes=0), ValueError, "jacobian_probes must be >= 1"),
    ("module/pretrain_unroll", lambda: ClassificationModule(pretrain_unroll=0), ValueError, "pretrain_unroll must be >= 1"),
    ("module/train_max_steps", lambda: ClassificationModule(train_max_steps=0), ValueError, "train_max_steps must be >= 1"),
    ("module/eval_tol", lambda: ClassificationModule(eval_tol=-1.0), ValueError, r"eval_tol must be in \(0, 1\]"),
    ("module/jacobian_probability", lambda: ClassificationModule(jacobian_probability=2.0), ValueError, r"jacobian_probability must be in \[0, 1\]"),
    ("module/num_classes_mismatch", lambda: ClassificationModule(backbone=__import__("mdeq.models", fromlist=["mdeq_digits"]).mdeq_digits(), num_classes=3), ValueError, "num_classes=3 but the backbone MDEQClassifier predicts 10 classes"),
    # ---- DataModules ---------------------------------------------------------------------------
    ("data/mnist_missing_root", lambda: setup(MNISTDataModule(root="/nonexistent")), FileNotFoundError, "MNIST not found: expected /nonexistent/MNIST/raw"),
    ("data/fashion_missing_root", lambda: setup(FashionMNISTDataModule(root="/nonexistent")), FileNotFoundError, "FashionMNIST not found"),
    ("data/cifar_missing_root", lambda: setup(CIFAR10DataModule(root="/nonexistent")), FileNotFoundError, "CIFAR-10 not found"),
    ("data/batch_size_zero", lambda: DigitsDataModule(batch_size=0), ValueError, "batch_size must be >= 1"),
    ("data/val_fraction", lambda: DigitsDataModule(val_fraction=1.5), ValueError, r"val_fraction must be in \[0, 1\)"),
    ("data/crop_padding", lambda: DigitsDataModule(crop_padding=-1), ValueError, "crop_padding must be >= 0"),
    ("data/limit_test", lambda: DigitsDataModule(limit_test=0), ValueError, "limit_test must be a positive number"),
]


@pytest.mark.parametrize(("case", "fn", "exc", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(case: str, fn: Callable[[], Any], exc: type[BaseException], pattern: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=pattern):
            fn()


def test_batch_of_one_and_empty_batch_are_fine() -> None:
    """Like torch's own layers, a DEQ takes a batch of one and an empty batch (e.g. the tail of
    an uneven shard), and says so in the solution record."""
    z, sol = DEQ(cell())(X(1, 4))
    assert z.shape == (1, 4) and sol.converged.shape == (1,)
    z, sol = DEQ(cell())(X(0, 4))
    assert z.shape == (0, 4) and sol.residual.shape == (0,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model in eval mode need not converge
        assert mdeq_digits().eval()(X(1, 1, 8, 8)).shape == (1, 10)


CLI_CASES = [
    ("cli/yaml_key_typo", ["fit", "--config", "{typo}"], "does not accept option 'trainer.max_epoch'"),
    ("cli/yaml_model_option_typo", ["fit", "--config", "{typo_model}"], "Option 'lerning_rate' is not accepted"),
    ("cli/yaml_wrong_type", ["fit", "--config", "{wrong_type}"], "Expected a <class 'float'>. Got value: fast"),
    ("cli/yaml_malformed", ["fit", "--config", "{malformed}"], "Problems parsing config"),
    ("cli/config_missing", ["fit", "--config", "{missing_file}"], "is neither a file nor a shipped config"),
    ("cli/flag_typo", ["fit", "--config", "{ok}", "--model.init_args.solverr", "anderson"], "solverr"),
    ("cli/unknown_subcommand", ["fitt"], "invalid choice: 'fitt'"),
    ("cli/test_unknown_model", ["test", "--model", "mdeq_tyni", "--data", "digits"], "unknown model 'mdeq_tyni'"),
    ("cli/test_unknown_task", ["test", "--model", "mdeq_digits", "--data", "digit"], "invalid choice: 'digit'"),
    ("cli/missing_data_root", ["fit", "--config", "{missing_data}"], "MNIST not found"),
]

YAMLS = {
    "typo": "trainer:\n  max_epoch: 3\nmodel:\n  class_path: mdeq.lightning.ClassificationModule\ndata:\n  class_path: mdeq.lightning.DigitsDataModule\n",
    "typo_model": "model:\n  class_path: mdeq.lightning.ClassificationModule\n  init_args: {backbone: mdeq_digits, lerning_rate: 0.1}\ndata:\n  class_path: mdeq.lightning.DigitsDataModule\n",
    "wrong_type": "model:\n  class_path: mdeq.lightning.ClassificationModule\n  init_args: {backbone: mdeq_digits, lr: fast}\ndata:\n  class_path: mdeq.lightning.DigitsDataModule\n",
    "malformed": "model: [unclosed\n",
    "ok": "model:\n  class_path: mdeq.lightning.ClassificationModule\ndata:\n  class_path: mdeq.lightning.DigitsDataModule\n",
    "missing_data": "trainer: {max_epochs: 1, logger: false, enable_checkpointing: false}\nmodel:\n  class_path: mdeq.lightning.ClassificationModule\n  init_args: {backbone: mdeq_mnist}\ndata:\n  class_path: mdeq.lightning.MNISTDataModule\n  init_args: {root: /nonexistent}\n",
}


@pytest.mark.parametrize(("case", "argv", "pattern"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_with_a_clear_message(case: str, argv: list[str], pattern: str, tmp_path, capsys, monkeypatch) -> None:
    import re

    monkeypatch.chdir(tmp_path)
    paths = {k: tmp_path / f"{k}.yaml" for k in YAMLS}
    for k, p in paths.items():
        p.write_text(YAMLS[k])
    names = {**{k: str(p) for k, p in paths.items()}, "missing_file": str(tmp_path / "nope.yaml")}
    args = [a.format(**names) for a in argv]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = cli_main(args)
        except SystemExit as e:
            code = e.code
    out = capsys.readouterr()
    assert code not in (0, None), f"{case}: accepted"
    text = out.err + out.out
    assert re.search(pattern, text), f"{case}: {text[-1500:]}"
    assert "Traceback" not in text
