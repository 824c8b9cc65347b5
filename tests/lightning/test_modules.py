"""The LightningModules: logging, DEQ recipes, solver budgets, the regression toy."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from mdeq.lightning import ClassificationModule, ConvergenceGuard, LinearToyDataModule, RegressionModule, SyntheticDataModule
from mdeq.lightning.recipes import JacobianSchedule, build_scheduler


def trainer(**kw):
    """A small CPU trainer with a ConvergenceGuard, as every shipped config (it, not each layer,
    reports convergence in training; the tight test budgets leave samples above tol on purpose)."""
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    kw["callbacks"] = [*kw.get("callbacks", []), ConvergenceGuard()]
    return pl.Trainer(**{**base, **kw})


def small_mdeq(**kw):
    args = dict(channels=[8, 8], expansion=2, num_groups=4, head_channels=[2, 4], final_channels=16)
    return dict(backbone="mdeq_digits", backbone_kwargs=args, **kw)


def test_training_logs_solver_statistics():
    pl.seed_everything(0)
    module = ClassificationModule(**small_mdeq(jacobian_weight=0.5))
    t = trainer(max_steps=3, limit_val_batches=1, val_check_interval=3)
    t.fit(module, datamodule=SyntheticDataModule(batch_size=16))
    logged = t.callback_metrics
    for key in ("train/loss", "train/acc", "train/top5", "train/nfe", "train/residual_mean", "train/residual_max", "train/converged_fraction", "train/jacobian_loss", "train/backward_nfe", "val/acc", "val/nfe"):
        assert key in logged, key
    assert float(logged["train/nfe"]) >= 1


def test_pretraining_then_solver_and_budgets():
    """The phase budgets reach the layer for each call (seen from inside the layer's call) and
    the layer's own max_steps is never rewritten."""
    module = ClassificationModule(**small_mdeq(pretrain_steps=2, pretrain_unroll=3, train_max_steps=5, eval_max_steps=11))
    deq = module.deqs[0]
    own = deq.max_steps
    seen = []
    original = module.run_backbone
    budgets = []
    deq.register_forward_pre_hook(lambda layer, args: budgets.append(layer.budget_for_call()[0]))

    def spy(x, training):
        out = original(x, training)
        seen.append((training, out[1].solver, budgets[-1], out[1].nsteps))
        return out

    module.run_backbone = spy
    t = trainer(max_steps=4, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=4)
    t.fit(module, datamodule=SyntheticDataModule(batch_size=8))
    train = [s for s in seen if s[0]]
    assert [s[1] for s in train] == ["unrolled(3)", "unrolled(3)", "anderson", "anderson"]
    assert all(s[2] == 5 for s in train) and all(s[3] <= 5 for s in train[2:])
    evals = [s for s in seen if not s[0]]
    assert evals and all(s[2] == 11 and s[3] <= 11 for s in evals)
    assert deq.max_steps == own and deq.budget_for_call()[0] == own


def test_jacobian_schedule():
    s = JacobianSchedule(weight=2.0, start_weight=0.0, warmup_steps=10, probability=0.5, seed=1)
    assert s.weight_at(0) == 0.0 and s.weight_at(5) == 1.0 and s.weight_at(50) == 2.0
    draws = [s.active(k) for k in range(10, 210)]
    assert 60 < sum(draws) < 140
    assert draws == [s.active(k) for k in range(10, 210)]  # seeded per step
    with pytest.raises(ValueError, match="jacobian_probability"):
        JacobianSchedule(weight=1.0, probability=1.5)


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "cosine", warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.25 and lrs[3] == 1.0 and lrs[-1] < 0.05
    with pytest.raises(ValueError, match="unknown scheduler"):
        build_scheduler(opt, "cosin", 0, 1)


def test_bad_module_options_are_clear():
    with pytest.raises(ValueError, match="unknown model 'mdeq_tiniest'.*Did you mean"):
        ClassificationModule(backbone="mdeq_tiniest")
    with pytest.raises(ValueError, match="unknown optimizer"):
        ClassificationModule(**small_mdeq(optimizer="adamax"))
    with pytest.raises(TypeError, match="no option 'chanels'. Did you mean 'channels'"):
        ClassificationModule(backbone="mdeq_digits", backbone_kwargs={"chanels": [8, 8]})
    with pytest.raises(ValueError, match="no pretrained weights ship for 'mdeq_large'"):
        ClassificationModule(backbone="mdeq_large", pretrained=True)


def test_module_can_start_from_shipped_weights():
    import zoo

    module = ClassificationModule(backbone="mdeq_digits", pretrained=True)
    shipped = zoo.create("mdeq_digits", pretrained=True)
    for (k, a), (_, b) in zip(module.backbone.state_dict().items(), shipped.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_module_can_start_from_its_own_checkpoint_or_a_weights_file(tmp_path):
    """init_weights: a Lightning checkpoint (its backbone tensors) or a safetensors file; the
    weights load, the step count and optimiser do not."""
    import zoo
    from zoo import save_weights, sha256_of
    from zoo.weights import WeightsError

    pl.seed_everything(0)
    first = ClassificationModule(**small_mdeq())
    t = trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(first, datamodule=SyntheticDataModule(batch_size=16))
    ckpt = tmp_path / "first.ckpt"
    t.save_checkpoint(ckpt)
    x = torch.randn(3, 1, 8, 8)
    first.eval()
    with torch.no_grad():
        expected = first(x)
    pl.seed_everything(1)  # a different random init, which init_weights must overwrite
    for source in (ckpt, tmp_path / "first.safetensors"):
        if source.suffix == ".safetensors":
            save_weights(first.backbone, source)
        second = ClassificationModule(**small_mdeq(init_weights=str(source)))
        assert second.backbone.training, "handed to the trainer in training mode"
        assert second.started_from == {"init_weights": str(source), "sha256": sha256_of(source)}
        second.eval()
        with torch.no_grad():
            torch.testing.assert_close(second(x), expected, msg=str(source))
    fresh = ClassificationModule(**small_mdeq())
    assert fresh.started_from is None and first.started_from is None
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(x), expected)
    # the origin travels in the run's checkpoints and wins over whatever the file holds later
    t = trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    second.train()  # (it was put in eval mode above to compare outputs)
    t.fit(second, datamodule=SyntheticDataModule(batch_size=16))
    t.save_checkpoint(tmp_path / "second.ckpt")
    saved = torch.load(tmp_path / "second.ckpt", map_location="cpu", weights_only=True)["mdeq_started_from"]
    assert saved == {"init_weights": str(source), "sha256": sha256_of(source)}
    save_weights(fresh.backbone, source)  # the starting file is replaced afterwards
    resumed = ClassificationModule(**small_mdeq(init_weights=str(source)))
    assert resumed.started_from["sha256"] != saved["sha256"]
    resumed.on_load_checkpoint(torch.load(tmp_path / "second.ckpt", map_location="cpu", weights_only=True))
    assert resumed.started_from == saved
    assert ClassificationModule(backbone="mdeq_digits", pretrained=True).started_from == {"zoo_weights": "mdeq_digits", "sha256": zoo.card("mdeq_digits").sha256}

    with pytest.raises(WeightsError, match=r"init_weights .*first.ckpt does not fit .*shape mismatch"):
        ClassificationModule(backbone="mdeq_digits", backbone_kwargs=dict(small_mdeq()["backbone_kwargs"], channels=[8, 12]), init_weights=str(ckpt))
    with pytest.raises(WeightsError, match="weights file not found"):
        ClassificationModule(**small_mdeq(init_weights=str(tmp_path / "missing.ckpt")))
    with pytest.raises(ValueError, match="either pretrained=True .* or init_weights"):
        ClassificationModule(backbone="mdeq_digits", pretrained=True, init_weights=str(ckpt))


def test_regression_toy_through_lightning():
    pl.seed_everything(0)
    module = RegressionModule(backbone="deq_toy_regressor", lr=0.05, scheduler="constant")
    t = trainer(max_epochs=500, num_sanity_val_steps=0, check_val_every_n_epoch=500)
    t.fit(module, datamodule=LinearToyDataModule())
    module.eval()
    with torch.no_grad():
        pred = module(torch.tensor([[-5.0]]))
    assert abs(float(pred) + 10.0) < 0.05, float(pred)


def test_residual_figure_without_a_logger_is_saved_as_png(tmp_path):
    from mdeq.lightning import ResidualPlotCallback

    pl.seed_everything(0)
    module = ClassificationModule(**small_mdeq())
    t = trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0, callbacks=[ResidualPlotCallback()], default_root_dir=str(tmp_path))
    t.fit(module, datamodule=SyntheticDataModule(batch_size=8))
    pngs = list(tmp_path.rglob("residual_traces/*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 5000
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


def test_accuracy_is_the_fraction_of_correct_samples_not_a_class_average():
    """3 of 4 right, but class 1's only sample wrong: micro accuracy 0.75, macro would be 0.5."""
    from mdeq.lightning import ClassificationModule

    m = ClassificationModule(backbone="mdeq_digits", num_classes=10)
    logits = torch.full((4, 10), -5.0)
    logits[[0, 1, 2], 0] = 5.0  # predicts 0 for samples 0-2
    logits[3, 2] = 5.0  # predicts 2, label 1
    metric = m.metrics["val_acc"]
    metric(logits, torch.tensor([0, 0, 0, 1]))
    assert float(metric.compute()) == pytest.approx(0.75)


@pytest.mark.filterwarnings("ignore:DEQ")
def test_bf16_mixed_precision_training_keeps_float32_weights_and_finite_statistics():
    pl.seed_everything(0)
    module = ClassificationModule(**small_mdeq(jacobian_weight=0.5, train_tol=0.03, eval_tol=0.03))
    t = trainer(max_steps=3, limit_val_batches=1, val_check_interval=3, precision="bf16-mixed")
    t.fit(module, datamodule=SyntheticDataModule(batch_size=16))
    logged = t.callback_metrics
    assert all(p.dtype == torch.float32 for p in module.parameters())
    for key in ("train/loss", "train/residual_max", "train/jacobian_loss", "val/acc"):
        assert torch.isfinite(logged[key]), key
    assert float(logged["train/nfe"]) >= 1


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)` but the `self.trainer` reference is not registered")  # _step called bare
@pytest.mark.filterwarnings("ignore:DEQ forward solve did not converge")  # an untrained model's solves, not under test
def test_label_smoothing_shapes_the_training_loss_only():
    from mdeq.lightning.errors import ConfigError

    torch.manual_seed(0)
    plain = ClassificationModule(**small_mdeq())
    smooth = ClassificationModule(**small_mdeq(), label_smoothing=0.2)
    smooth.load_state_dict(plain.state_dict())
    assert smooth.hparams["label_smoothing"] == 0.2
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    plain.eval(), smooth.eval()  # same solves, no dropout
    loss_plain, _ = plain._step((x, y), "train")
    loss_smooth, _ = smooth._step((x, y), "train")
    logits = plain(x)
    torch.testing.assert_close(loss_smooth, torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(loss_plain, loss_smooth)
    val_plain, _ = plain._step((x, y), "val")
    val_smooth, _ = smooth._step((x, y), "val")
    torch.testing.assert_close(val_plain, val_smooth)  # reported evaluation loss: plain cross-entropy
    for bad in (-0.1, 1.0, float("nan"), "0.1"):
        with pytest.raises(ConfigError, match="label_smoothing"):
            ClassificationModule(**small_mdeq(), label_smoothing=bad)
