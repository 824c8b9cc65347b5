"""WeightEMA: the checkpointed weights are the exponential moving average of the training
iterates; testing a checkpoint after fit evaluates that average (not the raw weights); a resumed
run continues both exactly."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mdeq.lightning import ClassificationModule, ConvergenceGuard, SyntheticDataModule, WeightEMA
from tests.lightning.test_modules import small_mdeq

DECAY = 0.6


def small_module() -> ClassificationModule:
    return ClassificationModule(**small_mdeq(lr=3e-2, scheduler="constant", train_max_steps=8, eval_max_steps=8))


def trainer(root, callbacks, **kw) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True, default_root_dir=root, num_sanity_val_steps=0, limit_train_batches=3, limit_val_batches=1)
    # with a ConvergenceGuard, as every shipped config: it reports convergence (the 8-step budget
    # of these runs leaves samples above tol on purpose), not each layer at every step
    return pl.Trainer(callbacks=[*callbacks, ConvergenceGuard()], **{**base, **kw})


class RecordWeights(pl.Callback):
    """The backbone's parameters after every optimiser step."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def data() -> SyntheticDataModule:
    return SyntheticDataModule(batch_size=16)


def test_checkpoint_holds_the_moving_average_and_testing_it_evaluates_the_average(tmp_path):
    pl.seed_everything(0)
    module, record = small_module(), RecordWeights()
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_top_k=1, filename="best-{epoch}")
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, [record, WeightEMA(decay=DECAY), best, every], max_epochs=2)
    t.fit(module, datamodule=data())
    assert len(record.seen) == 6
    expected = dict(record.seen[0])  # the first update copies the weights
    for step in record.seen[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * step[k] for k in expected}

    last = torch.load(every.last_model_path, map_location="cpu", weights_only=True)
    assert last["global_step"] == 6
    for k, v in expected.items():
        torch.testing.assert_close(last["state_dict"][k], v, msg=k)
        torch.testing.assert_close(last["current_model_state"][k], record.seen[-1][k], msg=k)
    assert any(not torch.allclose(expected[k], record.seen[-1][k]) for k in expected), "averaging changed nothing"
    for k, v in module.named_parameters():  # after fit the module holds the average
        torch.testing.assert_close(v.detach(), expected[k], msg=k)

    # the test after fit (what `mdeq fit` prints) loads the best checkpoint: its average, not the raw weights
    best_ckpt = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    assert any(not torch.allclose(best_ckpt["state_dict"][k], best_ckpt["current_model_state"][k]) for k in expected)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)  # whatever the module holds now must be replaced by the checkpoint's average
    t.test(module, datamodule=data(), ckpt_path=best.best_model_path, verbose=False)
    for k, v in module.named_parameters():
        torch.testing.assert_close(v.detach(), best_ckpt["state_dict"][k], msg=k)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # resuming into its own folder is the point
def test_a_resumed_run_continues_the_weights_and_the_average_exactly(tmp_path):
    def run(root, epochs, ckpt_path=None):
        t = trainer(root, [WeightEMA(decay=DECAY), ModelCheckpoint(dirpath=root, save_last=True)], max_epochs=epochs)
        t.fit(small_module(), datamodule=data(), ckpt_path=ckpt_path)
        return torch.load(root / "last.ckpt", map_location="cpu", weights_only=True)

    pl.seed_everything(0)
    a = run(tmp_path / "a", 2)
    pl.seed_everything(0)
    run(tmp_path / "b", 1)
    pl.seed_everything(5)  # the resume must not depend on the process's seed
    b = run(tmp_path / "b", 2, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert b["global_step"] == a["global_step"] == 6
    for part in ("state_dict", "current_model_state"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], msg=f"{part} {k}")
    assert any(not torch.allclose(a["state_dict"][k], a["current_model_state"][k]) for k in a["state_dict"] if a["state_dict"][k].is_floating_point())


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(decay=1.0), "decay must lie in"), (dict(decay=0.0), "decay must lie in"), (dict(update_every_n_steps=0), "update_every_n_steps"), (dict(update_starting_at_step=-1), "update_starting_at_step")],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightEMA(**kwargs)
