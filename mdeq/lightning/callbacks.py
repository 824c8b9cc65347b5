"""Callbacks: a figure of relative residual vs iteration (forward and backward) per validation; a step timer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from mdeq.core.budget import solver_budget
from mdeq.core.solution import DEQSolution
from mdeq.plots import log_figure, residual_figure


class ResidualPlotCallback(pl.Callback):
    """At each validation end, re-solves the first validation batch with traces on, runs the
    implicit backward (gradient with respect to the input only: parameters are untouched) and
    logs a residual-vs-iteration figure to W&B or TensorBoard, or saves a PNG beside the logs."""

    def __init__(self, every_n_epochs: int = 1, max_samples: int = 64) -> None:
        super().__init__()
        self.every_n_epochs, self.max_samples = every_n_epochs, max_samples
        self._batch: Any = None

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self._batch = batch

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batch is None or trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        # Every process asks for the folder: ``trainer.log_dir`` broadcasts from rank 0, a
        # collective that would wait forever if only rank 0 called it (DDP hang).
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "residual_traces"
        if not trainer.is_global_zero:
            return
        x = self._batch[0] if isinstance(self._batch, (tuple, list)) else self._batch
        solution = self.traced_solution(pl_module, x[: self.max_samples])
        if solution is None or solution.trace is None:
            return
        bw = solution.backward.trace if solution.backward is not None else None
        fig = residual_figure(solution.trace, bw, title=f"epoch {trainer.current_epoch}")
        log_figure(fig, trainer.loggers, trainer.global_step, fallback_path=folder / f"epoch{trainer.current_epoch:03d}.png")
        import matplotlib.pyplot as plt

        plt.close(fig)

    @staticmethod
    def traced_solution(pl_module: Any, x: Tensor) -> DEQSolution | None:
        deqs = getattr(pl_module, "deqs", [])
        if not deqs:
            return None
        with torch.enable_grad(), solver_budget(pl_module.budget(training=False)), solver_budget(record_trace=True):
            xi = x.detach().clone().requires_grad_()
            out, solution = pl_module.backbone(xi, return_solution=True)
            torch.autograd.grad(out.float().pow(2).sum(), xi, allow_unused=True)
        return solution


class StepTimer(pl.Callback):
    """Wall time of training steps, measured without slowing them: the device is synchronised
    only at ``start_step`` and ``end_step`` (two host reads in the whole run). At the end of
    training (or at ``end_step``), ``path`` (JSON) receives the seconds per step between them, the
    batch size and the number of training batches per epoch, so that a time budget can be turned
    into an epoch count (``tools/gpu/lease.py`` does). With ``stop=True`` training ends at
    ``end_step``."""

    def __init__(self, path: str, start_step: int = 10, end_step: int = 40, stop: bool = False) -> None:
        super().__init__()
        if not (isinstance(start_step, int) and isinstance(end_step, int) and 0 <= start_step < end_step):
            raise ValueError(f"StepTimer needs 0 <= start_step < end_step (integers), got {start_step}, {end_step}")
        self.path, self.start_step, self.end_step, self.stop = Path(path), start_step, end_step, stop
        self._t0: float | None = None
        self.seconds_per_step: float | None = None

    @staticmethod
    def _now(trainer: pl.Trainer) -> float:
        import time

        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.start_step:
            self._t0 = self._now(trainer)
        elif step == self.end_step and self._t0 is not None:
            self.seconds_per_step = (self._now(trainer) - self._t0) / (self.end_step - self.start_step)
            self._write(trainer, batch)
            if self.stop:
                trainer.should_stop = True

    def _write(self, trainer: pl.Trainer, batch: Any) -> None:
        import json

        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        record = {
            "seconds_per_step": self.seconds_per_step,
            "steps": self.end_step - self.start_step,
            "batch_size": int(len(x)),
            "train_batches_per_epoch": trainer.num_training_batches,
            "device": str(trainer.strategy.root_device),
        }
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(record, indent=1))
