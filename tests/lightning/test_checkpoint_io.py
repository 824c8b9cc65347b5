"""Checkpoint writes are atomic: a process killed mid-write leaves the previous file intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch

from mdeq.lightning import AtomicCheckpointIO, use_atomic_checkpoints
from tests.lightning.conftest import REPO

KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from mdeq.lightning import AtomicCheckpointIO

    class KillWhilePickling:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGKILL)

    where, path = sys.argv[1], sys.argv[2]
    io = AtomicCheckpointIO()
    io.save_checkpoint({"version": 1, "w": torch.ones(1000)}, path)
    new = {"version": 2, "w": torch.full((1_000_000,), 2.0)}
    if where == "during_write":      # killed halfway through serialising (big tensor already out)
        new["tail"] = KillWhilePickling()
    else:                            # killed after the bytes are written, before the rename
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    io.save_checkpoint(new, path)
    """
)


@pytest.mark.parametrize("where", ["during_write", "before_rename"])
def test_killed_checkpoint_write_leaves_the_old_file_intact(tmp_path, where):
    script, target = tmp_path / "kill.py", tmp_path / "last.ckpt"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), where, str(target)], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["version"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))


def test_atomic_save_replaces_and_cleans_up(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "sub" / "last.ckpt"
    for v in (1, 2):
        io.save_checkpoint({"version": v}, target)
    assert torch.load(target, weights_only=True)["version"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temp files left

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.save_checkpoint({"bad": Unpicklable()}, target)
    assert torch.load(target, weights_only=True)["version"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, target, storage_options={"x": 1})


def test_cli_trainers_use_atomic_checkpoints():
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    use_atomic_checkpoints(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


class _Marker:
    """Unpickling this would create a file: a stand-in for code smuggled into a checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resuming_from_a_checkpoint_carrying_code_refuses_without_running_it(tmp_path):
    from mdeq.lightning import ClassificationModule, DigitsDataModule

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "payload": _Marker(str(marker))}, evil)
    module = ClassificationModule(backbone="mdeq_digits", backbone_kwargs={"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, limit_train=64), ckpt_path=str(evil))
    assert not marker.exists()
