"""Multi-process DDP on CPU equals one process; a killed run resumes to the same weights."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.lightning.conftest import REPO

DDP_SCRIPT = textwrap.dedent(
    """
    import sys, warnings, logging
    warnings.simplefilter("ignore"); logging.disable(logging.WARNING)
    import torch, lightning.pytorch as pl
    from torch import nn
    from mdeq import DEQ, MultiScaleDEQ, SkipDEQ, TanhCell
    from mdeq.lightning import ClassificationModule, DigitsDataModule

    class Scale0(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(24, 24)
        def forward(self, z, x):
            return torch.tanh(0.5 * self.lin(z) + x)

    class Backbone(nn.Module):
        def __init__(self, variant):
            super().__init__()
            self.enc = nn.Linear(64, 32 if variant != "multiscale" else 24)
            if variant == "deq":
                self.deq = DEQ(TanhCell(32, 32, weight_scale=0.5), tol=1e-6, max_steps=60, state_shape=(32,))
            elif variant == "skip":
                self.deq = SkipDEQ(TanhCell(32, 32, weight_scale=0.5), nn.Linear(32, 32), tol=1e-6, max_steps=60, state_shape=(32,))
            else:
                main = [Scale0(), nn.Sequential(nn.Linear(8, 8), nn.Tanh())]
                mapping = [[None, nn.Linear(24, 8)], [nn.Linear(8, 24), None]]
                for row in mapping:
                    for m in row:
                        if m is not None:
                            nn.init.normal_(m.weight, std=0.05)
                self.deq = MultiScaleDEQ(main, mapping, scales=((24,), (8,)), tol=1e-6, max_steps=60)
            self.head = nn.Linear(32, 10)
        def forward(self, x, return_solution=False):
            z, sol = self.deq(self.enc(x.flatten(1)))
            z = torch.cat(z, dim=1) if isinstance(z, tuple) else z
            return (self.head(z), sol) if return_solution else self.head(z)

    mode, out, variant, jac = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    pl.seed_everything(0, verbose=False)
    # the shipped families, small: BatchNorm in stem and head (GroupNorm inside the DEQ). mdeq_digits
    # solves to tol 1e-5: its residuals settle near 8e-7, so at tol 1e-6 (the float32 noise floor
    # of a relative residual) the step that meets tol, and so the iterate returned, would be decided
    # by the order of a sum, and the two runs would differ by more than float noise.
    ZOO = {"mdeq_digits": ("mdeq_digits", dict(channels=[8, 8], head_channels=[2, 4], final_channels=16, tol=1e-5, max_steps=60)),
           "conv_deq": ("conv_deq_small", dict(in_channels=1, image_size=8, pool=2, channels=8, inner_channels=8, tol=1e-6, max_steps=60))}
    if variant in ZOO:
        import zoo
        backbone = zoo.create(ZOO[variant][0], **ZOO[variant][1])
    else:
        backbone = Backbone(variant)
    # SGD for the families: a conv bias right before BatchNorm has a zero gradient, i.e. float noise,
    # which Adam's first step scales up to +-lr; SGD keeps noise noise-sized.
    opt = dict(optimizer="sgd", lr=0.05, momentum=0.0) if variant in ZOO else dict(lr=1e-2)
    module = ClassificationModule(backbone=backbone, scheduler="constant", jacobian_weight=jac, skip_weight=1.0, **opt)
    dm = DigitsDataModule(batch_size=32 if mode == "single" else 16, seed=0)
    # sync_batchnorm: Lightning's own flag (torch's SyncBatchNorm raises on CPU; mdeq swaps in
    # CrossProcessBatchNorm), so BatchNorm sees the statistics of the whole batch of 32
    kw = dict(strategy="ddp", devices=2, sync_batchnorm=variant in ZOO) if mode == "ddp" else dict(devices=1)
    # the families' DEQs are far from contractive at initialisation: float-level differences (the
    # order of a sum over 2 processes) grow about 10x per step there, so they are compared after 2
    steps = 2 if variant in ZOO else 6
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=steps, **kw)
    # In DDP the DataModule's sampler gives rank r every 2nd index of the same seeded permutation:
    # together the two local batches of 16 are exactly the single process's batch of 32.
    trainer.fit(module, datamodule=dm)
    if trainer.is_global_zero:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        metrics = {k: v.detach().clone() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        torch.save({"state": state, "metrics": metrics}, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean gloo shutdown (else: abort at exit)
    """
)


@pytest.mark.parametrize(
    ("variant", "jacobian_weight", "port"),
    [("deq", 0.0, 29517), ("skip", 0.5, 29518), ("multiscale", 0.5, 29519), ("mdeq_digits", 0.5, 29520), ("conv_deq", 0.0, 29521)],
    ids=["deq", "skip-deq+jacobian", "multiscale+jacobian", "mdeq-family+syncbn+jacobian", "conv-deq-family+syncbn"],
)
def test_ddp_two_processes_equal_one_process(tmp_path, variant, jacobian_weight, port):
    script = tmp_path / "ddp_run.py"
    # Same global batch, same shuffled order: the DataModule's sampler shards one permutation.
    # With Jacobian regularization on, each sample's Hutchinson probe is keyed by its position
    # in the global batch, so the two shards draw exactly the probes one process draws.
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(port)}
    for mode in ("single", "ddp"):
        cmd = [sys.executable, str(script), mode, str(tmp_path / f"{mode}.pt"), variant, str(jacobian_weight)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    assert single["state"].keys() == ddp["state"].keys()
    for k, v in single["state"].items():
        torch.testing.assert_close(ddp["state"][k], v, atol=1e-5, rtol=0, msg=k)
    # evaluation metrics are averaged over the processes: the same numbers as one process. Not
    # val/nfe: a batch iterates until its slowest sample stops, so it depends on batch composition.
    assert {"val/acc", "val/loss", "val/nfe", "val/residual_mean", "val/converged_fraction"} <= set(single["metrics"])
    for k, v in single["metrics"].items():
        if k == "val/nfe":
            continue
        torch.testing.assert_close(ddp["metrics"][k].float(), v.float(), atol=1e-5, rtol=1e-5, msg=k)


def _resume_config(tmp_path: Path, name: str) -> Path:
    cfg = yaml.safe_load((REPO / "configs/digits/mdeq_digits.yaml").read_text())
    cfg["trainer"].update({"max_epochs": 6, "logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path / name)})
    # keep the config's own checkpoint callbacks (best by val/acc + last after every epoch)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    cfg["model"]["init_args"]["backbone_kwargs"] = {"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16, "expansion": 2}
    cfg["model"]["init_args"]["jacobian_weight"] = 0.5  # random probes: resumption must restore the RNG
    cfg["model"]["init_args"]["jacobian_probability"] = 0.5
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "mdeq.cli", "fit", "--config", str(config), *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    ref = _fit(_resume_config(tmp_path, "reference"))
    assert ref.wait(timeout=500) == 0, ref.stderr.read()[-2000:]

    cfg = _resume_config(tmp_path, "killed")
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    proc = _fit(cfg)
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.4)  # now inside the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be interrupted"
    epoch_at_kill = torch.load(last, weights_only=False)["epoch"]
    assert epoch_at_kill < 5

    resumed = _fit(cfg, "--ckpt_path", "last")
    assert resumed.wait(timeout=500) == 0, resumed.stderr.read()[-2000:]
    a = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["epoch"] == b["epoch"] == 5 and a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0, msg=k)


def test_resume_with_the_wandb_logger_finds_last_and_keeps_the_best_score(tmp_path, caplog, recwarn):
    """An offline W&B run gets a new id on every start; checkpoints must not live under it, or
    ``--ckpt_path last`` finds nothing and training silently starts again from scratch."""
    from mdeq.cli import main

    small = '{"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16, "expansion": 2}'
    args = [
        "fit", "--config", str(REPO / "configs/digits/mdeq_digits.yaml"), "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--model.init_args.backbone_kwargs", small,
    ]
    assert main([*args, "--trainer.max_epochs", "1"]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        assert main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"]) == 0
    folder = tmp_path / "runs" / "digits" / "mdeq_digits" / "checkpoints"
    assert f"Restoring states from the checkpoint path at {folder / 'last.ckpt'}" in caplog.text
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    assert len(glob_runs := list((tmp_path / "runs").rglob("offline-run-*"))) == 2, glob_runs  # two W&B runs
    assert {p.parent for p in (tmp_path / "runs").rglob("*.ckpt")} == {folder}  # none under the W&B runs
    last = torch.load(folder / "last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (1, 6)
    best = next(v for k, v in last["callbacks"].items() if "val/acc" in k)
    assert best["best_model_score"] is not None and len(best["best_k_models"]) == 1


SMALL_DIGITS = '{"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16, "expansion": 2}'


@pytest.mark.filterwarnings("ignore::mdeq.core.errors.ConvergenceWarning")  # a random-init model at 3/7 steps
def test_module_and_cli_survive_pickle_and_deepcopy():
    """What ddp_spawn, EMA and checkpointing copy: the module (with its per-layer solver
    budgets) and the CLI class (pickled by reference, so it must live at module level)."""
    import copy
    import json
    import pickle

    from mdeq.lightning import ClassificationModule
    from mdeq.lightning.cli import MDEQCLI

    module = ClassificationModule(backbone="mdeq_digits", backbone_kwargs=json.loads(SMALL_DIGITS), eval_max_steps=7, train_max_steps=3)
    own = [d.max_steps for d in module.deqs]
    x = torch.randn(4, 1, 8, 8)
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        for training, steps in ((True, 3), (False, 7)):
            _, sol = clone.run_backbone(x, training=training)
            assert sol.nsteps <= steps and sol.nfe <= steps + 1
            assert [d.max_steps for d in clone.deqs] == own  # the budget went with the call
        assert all(a is not b for a, b in zip(clone.deqs, module.deqs))
    assert pickle.loads(pickle.dumps(MDEQCLI)) is MDEQCLI


def test_ddp_spawn_trains_and_tests_the_main_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": "29533"}
    args = [
        sys.executable, "-m", "mdeq.cli", "fit", "--config", str(REPO / "configs/digits/mdeq_digits.yaml"), "--trainer.strategy", "ddp_spawn",
        "--trainer.devices", "2", "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false", "--model.init_args.backbone_kwargs", SMALL_DIGITS,
    ]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("RESULT: test accuracy") == 1, proc.stdout[-2000:]
    assert (tmp_path / "runs/digits/mdeq_digits/checkpoints/last.ckpt").is_file()
