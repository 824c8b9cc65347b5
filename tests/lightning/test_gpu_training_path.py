"""The GPU training recipe's step never waits for the device: data on the device, a fixed solver
budget (forward and implicit backward), the guard reading every N steps, Lightning logging every
N steps. Host reads are counted on CPU with a dispatch mode under accelerator semantics (the
CPU-only shortcuts off, the stop check real), per training step, from batch start to batch end."""

from __future__ import annotations

import traceback

import lightning.pytorch as pl
import pytest
import torch
from torch.overrides import TorchFunctionMode

from mdeq.core.solvers import base
from mdeq.lightning import ClassificationModule, ConvergenceGuard, SyntheticDataModule
from tests.core.test_host_syncs import HOST_READS, HostReads

# Values that live on the host by design, also on a GPU, so reading them is no device sync: the
# optimizers' step counters (torch keeps them on the CPU unless capturable/fused) and the Jacobian
# schedule's CPU-generator draw of whether this step is regularised.
HOST_BY_DESIGN = ("torch/optim/", "mdeq/lightning/recipes.py")


PYTHON_READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu"}


_PLUMBING = ("torch/_tensor.py", "torch/overrides.py", "torch/utils/_python_dispatch.py", "torch/_dynamo/", "torch/_compile.py", "test_gpu_training_path.py", "test_host_syncs.py")


def _host_by_design() -> bool:
    """Whether the code that asks for the value (the innermost frame outside the counters and
    torch's tensor plumbing) is one of :data:`HOST_BY_DESIGN`."""
    frames = [f for f in traceback.extract_stack() if not any(p in f.filename for p in _PLUMBING)]
    return bool(frames) and any(p in frames[-1].filename for p in HOST_BY_DESIGN)


class DeviceReads(HostReads):
    """Every read of a tensor value on the host: Python-level ones (``bool(t)``, ``t.item()``,
    ``t.tolist()``, ``float(t)``, ``t.cpu()``...; on a CPU tensor some of these bypass the
    dispatcher, so a function mode counts them) and those inside ops (linear-algebra error checks),
    less the reads of host-resident values (:data:`HOST_BY_DESIGN`)."""

    def __enter__(self):  # type: ignore[no-untyped-def]
        outer = self

        class PythonReads(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                if getattr(func, "__name__", "") in PYTHON_READS and not _host_by_design():
                    outer.count += 1
                    outer.ops.append(func.__name__)
                return func(*args, **(kwargs or {}))

        self._python = PythonReads()
        self._python.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        out = super().__exit__(*exc)
        self._python.__exit__(*exc)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in HOST_READS and _host_by_design():
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class CountReads(pl.Callback):
    """Host reads of each training step (training_step, backward, guard, optimizer step)."""

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self.ops: list[list[str]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.mode = DeviceReads()
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.mode.__exit__(None, None, None)
        self.per_step.append(self.mode.count)
        self.ops.append(self.mode.ops)


def fit(monkeypatch: pytest.MonkeyPatch, tmp_path, fixed: bool, every: int, steps: int = 8) -> CountReads:
    monkeypatch.setattr(base, "host_reads_are_free", lambda t: False)  # accelerator semantics; the stop check stays real
    pl.seed_everything(0, verbose=False)
    args = dict(channels=[8, 8], expansion=2, num_groups=4, head_channels=[2, 4], final_channels=16)
    module = ClassificationModule(backbone="mdeq_digits", backbone_kwargs=args, optimizer="adamw", train_max_steps=4,
                                  jacobian_weight=0.5, jacobian_probability=0.5, train_fixed_budget=fixed)
    counter = CountReads()
    guard = ConvergenceGuard(check_every_n_steps=every, stability_every_n_steps=0)
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    # as the GPU configs: the progress bar refreshed and the logger written every N steps
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=CSVLogger(str(tmp_path)), enable_checkpointing=False,
                         enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0, log_every_n_steps=every,
                         callbacks=[counter, guard, TQDMProgressBar(refresh_rate=every)])
    trainer.fit(module, datamodule=SyntheticDataModule(batch_size=8, data_on_device=True))
    assert guard.stopped_reason is None and all(torch.isfinite(p).all() for p in module.parameters())
    counter.guard = guard
    return counter


def test_the_gpu_recipes_training_step_reads_the_host_only_every_n_steps(monkeypatch: pytest.MonkeyPatch, tmp_path):
    counter = fit(monkeypatch, tmp_path, fixed=True, every=4)
    quiet = [r for i, r in enumerate(counter.per_step) if (i + 1) % 4]
    assert quiet == [0] * 6, counter.ops  # steps 1-3 and 5-7: not one read
    assert len(counter.guard.recent) == 2  # the guard read its device sums on steps 4 and 8


def test_the_counter_sees_an_early_stopping_solve_and_a_per_step_guard(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """The same run with the defaults reads at every step: the test above could fail."""
    assert all(r > 0 for r in fit(monkeypatch, tmp_path / "a", fixed=True, every=1, steps=3).per_step)
    assert all(r > 0 for r in fit(monkeypatch, tmp_path / "b", fixed=False, every=4, steps=3).per_step)


def test_step_timer_reports_the_time_per_step_and_can_stop_the_run(tmp_path):
    from mdeq.lightning import DigitsDataModule, StepTimer

    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(backbone="mdeq_digits", train_max_steps=4)
    timer = StepTimer(str(tmp_path / "t.json"), start_step=2, end_step=5, stop=True)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[timer, ConvergenceGuard()])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    import json

    record = json.loads((tmp_path / "t.json").read_text())
    assert trainer.global_step == 5 and record["steps"] == 3 and record["batch_size"] == 64
    assert record["train_batches_per_epoch"] == 21 and 0 < record["seconds_per_step"] == timer.seconds_per_step < 30
    for bad in ((3, 3), (-1, 2), (2.0, 4)):
        with pytest.raises(ValueError, match="StepTimer"):
            StepTimer(str(tmp_path / "x.json"), *bad)


def test_the_optimizers_allow_gradient_clipping_under_mixed_precision():
    """The GPU recipes clip gradients under bf16-mixed: Lightning refuses that for optimizers that
    unscale internally (the fused Adam kernels), which the CPU rehearsal in float32 would not see."""
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    from mdeq.lightning.recipes import build_optimizer

    for name in ("adam", "adamw", "sgd"):
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(3))], name, 1e-3, 0.0, 0.9)
        assert not _optimizer_handles_unscaling(opt), name
