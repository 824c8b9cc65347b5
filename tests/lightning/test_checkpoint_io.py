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
    leftovers = list(tmp_path.glob(".last.ckpt.*.partial"))
    assert len(leftovers) == 1  # the killed write's temp file, named with its pid
    live = tmp_path / f".last.ckpt.{os.getpid()}.abc.partial"  # a write in progress elsewhere: kept
    live.write_bytes(b"")
    AtomicCheckpointIO().save_checkpoint({"version": 3}, target)  # the next save clears the abandoned one
    assert not leftovers[0].exists() and live.exists()
    assert torch.load(target, weights_only=True)["version"] == 3


def test_atomic_save_replaces_and_cleans_up(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "sub" / "last.ckpt"
    for v in (1, 2):
        io.save_checkpoint({"version": v}, target)
    assert torch.load(target, weights_only=True)["version"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temp files left
    assert target.stat().st_mode & 0o777 == 0o644, oct(target.stat().st_mode)  # readable like exports

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


@pytest.fixture
def loopback(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/served``; yields (folder, base URL)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # no request lines on stderr
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


SMALL = ["--model.init_args.backbone_kwargs", '{"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16, "expansion": 2}']
DIGITS_ARGS = ["--config", str(REPO / "configs/digits/mdeq_digits.yaml"), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *SMALL]


def _trained_checkpoint(tmp_path):
    from mdeq.cli import main

    assert main(["fit", *DIGITS_ARGS, "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                 "--trainer.default_root_dir", str(tmp_path / "trained")]) == 0
    return tmp_path / "trained" / "checkpoints" / "last.ckpt"


@pytest.mark.filterwarnings("ignore::mdeq.core.errors.ConvergenceWarning")  # 2 training steps from random weights
def test_a_checkpoint_url_carrying_code_is_refused_on_every_path(tmp_path, loopback, capsys):
    """Lightning loads http(s) checkpoints with weights_only=False; mdeq fit/test --ckpt_path and
    load_from_checkpoint must refuse the payload without running it, and still load a clean file."""
    from mdeq.cli import main
    from mdeq.lightning import ClassificationModule
    from mdeq.lightning.checkpoint_io import CheckpointRefusedError

    folder, base = loopback
    good = _trained_checkpoint(tmp_path)
    (folder / "good.ckpt").write_bytes(good.read_bytes())
    marker = tmp_path / "pwned"
    evil = torch.load(good, weights_only=True)
    evil["payload"] = _Marker(str(marker))
    torch.save(evil, folder / "evil.ckpt")
    capsys.readouterr()

    for sub in ("fit", "test"):
        code = main([sub, *DIGITS_ARGS, "--trainer.max_steps", "3", "--trainer.limit_test_batches", "1", "--ckpt_path", f"{base}/evil.ckpt"])
        err = capsys.readouterr().err
        assert code == 2 and "refused to load checkpoint" in err and "evil.ckpt" in err, err[-2000:]
        assert not marker.exists(), sub
    with pytest.raises(CheckpointRefusedError, match="could run code"):
        ClassificationModule.load_from_checkpoint(f"{base}/evil.ckpt")
    with pytest.raises(CheckpointRefusedError, match="weights_only=False"):
        ClassificationModule.load_from_checkpoint(str(good), weights_only=False)
    assert not marker.exists()

    # the safe path still loads a clean checkpoint from the same server, and a local one
    for source in (f"{base}/good.ckpt", str(good)):
        module = ClassificationModule.load_from_checkpoint(source)
        state = torch.load(good, weights_only=True)["state_dict"]
        for k, v in module.state_dict().items():
            assert torch.equal(v, state[k]), k
    assert main(["test", *DIGITS_ARGS, "--trainer.limit_test_batches", "1", "--trainer.default_root_dir", str(tmp_path / "trained"), "--ckpt_path", f"{base}/good.ckpt"]) == 0
    assert "RESULT" not in capsys.readouterr().err
    with pytest.raises(Exception, match="could not download"):
        ClassificationModule.load_from_checkpoint(f"{base}/missing.ckpt")


def test_plain_trainer_reads_checkpoints_safely(tmp_path):
    """Without the CLI: the module's setup hook gives a plain Trainer the safe, atomic checkpoint IO."""
    from mdeq.lightning import ClassificationModule

    module = ClassificationModule(backbone="mdeq_digits", backbone_kwargs={"channels": [8, 8], "head_channels": [2, 4], "final_channels": 16})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    module.setup("fit")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def _fit_digits(*extra):
    from mdeq.cli import main

    return main(["fit", *DIGITS_ARGS, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                 "--trainer.limit_test_batches", "1", *extra])


@pytest.mark.filterwarnings("ignore::mdeq.core.errors.ConvergenceWarning")
def test_a_second_fit_never_mixes_its_files_into_another_runs_folder(tmp_path, capsys):
    assert _fit_digits() == 0
    folder = tmp_path / "runs/digits/mdeq_digits/checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.ckpt")}
    capsys.readouterr()
    assert _fit_digits() == 2
    err = capsys.readouterr().err
    assert "already holds the checkpoints of an earlier run" in err and "--ckpt_path last" in err and "mdeq_digits-2" in err
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.ckpt")} == before  # nothing written, nothing mixed
    assert _fit_digits("--ckpt_path", "last", "--trainer.max_epochs", "2") == 0  # continuing the run is fine
    lock = folder.with_name(".checkpoints.fit.lock")
    assert not lock.exists() or lock.read_text().strip() == str(os.getpid())


def test_a_fit_running_in_a_folder_locks_it(tmp_path, capsys):
    from mdeq.cli import main

    folder = tmp_path / "runs/digits/mdeq_digits/checkpoints"
    folder.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder.with_name(".checkpoints.fit.lock").write_text(f"{sleeper.pid}\n")
        assert main(["fit", *DIGITS_ARGS, "--trainer.max_steps", "1"]) == 2
        assert f"another mdeq fit (process {sleeper.pid}) is writing to" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.filterwarnings("ignore::mdeq.core.errors.ConvergenceWarning", "ignore:The dirpath has changed")
def test_a_moved_run_folder_resumes_and_tests_its_own_best_checkpoint(tmp_path, capsys):
    import shutil

    assert _fit_digits("--trainer.default_root_dir", "first") == 0
    shutil.move(tmp_path / "first", tmp_path / "moved")
    (tmp_path / "first/checkpoints").mkdir(parents=True)  # another run now lives at the old place
    best_name = next(p.name for p in (tmp_path / "moved/checkpoints").glob("best-*.ckpt"))
    (tmp_path / "first/checkpoints" / best_name).write_bytes(b"not this run's checkpoint")
    capsys.readouterr()
    assert _fit_digits("--trainer.default_root_dir", "moved", "--ckpt_path", "moved/checkpoints/last.ckpt") == 0
    captured = capsys.readouterr()
    assert "the run folder has moved: testing" in captured.err
    result = next(line for line in captured.out.splitlines() if line.startswith("RESULT"))
    assert str(tmp_path / "moved/checkpoints" / best_name) in result


@pytest.mark.filterwarnings("ignore::mdeq.core.errors.ConvergenceWarning")  # 2 training steps
def test_load_from_checkpoint_after_the_init_weights_file_is_gone(tmp_path):
    """A run started from an init_weights file: its checkpoint loads (same weights, same outputs,
    the start still recorded) after that file is deleted."""
    import shutil

    from mdeq.cli import main
    from mdeq.lightning import ClassificationModule

    start = tmp_path / "start.safetensors"
    shutil.copy(REPO / "checkpoints" / "mdeq_digits.safetensors", start)
    args = ["--config", str(REPO / "configs/digits/mdeq_digits.yaml"), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    assert main(["fit", *args, "--model.init_args.init_weights", str(start), "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2",
                 "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.default_root_dir", str(tmp_path / "run")]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    start.unlink()
    module = ClassificationModule.load_from_checkpoint(str(ckpt)).eval()
    state = torch.load(ckpt, weights_only=True)
    for k, v in module.state_dict().items():
        assert torch.equal(v, state["state_dict"][k]), k
    assert module.started_from == {"init_weights": str(start), "sha256": state["mdeq_started_from"]["sha256"]}
    with pytest.raises(Exception, match="not found"):
        ClassificationModule.load_from_checkpoint(str(ckpt), init_weights=str(start))  # asked for explicitly: still checked
