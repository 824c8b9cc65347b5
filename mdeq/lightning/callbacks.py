"""Callbacks: a figure of relative residual vs iteration (forward and backward) per validation."""

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
