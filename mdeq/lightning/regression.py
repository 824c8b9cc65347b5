"""A regression LightningModule (the classic y = 2x DEQ toy and similar small problems)."""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdeq.core.solution import DEQSolution
from mdeq.lightning.classification import DEQLightningModule


SHOWN_TEST_POINTS = 16
"""A test split of at most this many scalar inputs (a toy's probe points) is printed point by point."""


class RegressionModule(DEQLightningModule):
    """Mean-squared-error training of a DEQ regressor (``forward(x, return_solution=True)``
    returns (prediction, solution)); logs loss, mean absolute error and solver statistics. When
    the test split is a few scalar points (the y = 2x toy's x = -5, 0, 3.5, 12), the test prints
    each prediction beside its target and logs it as ``test/prediction/x=<x>``."""

    def __init__(self, backbone: Union[str, nn.Module] = "deq_toy_regressor", **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self._test_points: list[tuple[Tensor, Tensor, Tensor]] = []

    def on_test_epoch_start(self) -> None:
        self._test_points = []

    def on_test_epoch_end(self) -> None:
        if not self._test_points:
            return
        x, pred, y = (torch.cat(parts) for parts in zip(*self._test_points))
        self._test_points = []
        if x.dim() != 2 or x.shape[1] != 1 or pred.numel() != x.shape[0] or x.shape[0] > SHOWN_TEST_POINTS:
            return
        points = sorted(zip(x[:, 0].tolist(), pred.flatten().tolist(), y.flatten().tolist()))
        for xi, pi, _ in points:
            self.log(f"test/prediction/x={xi:g}", pi, sync_dist=False, rank_zero_only=True)
        shown = ", ".join(f"f({xi:g}) = {pi:.3f} (target {yi:g})" for xi, pi, yi in points)
        self.print(f"test predictions: {shown}")  # (rank 0 only, above the progress bar)

    def _step(self, batch: Any, split: str) -> tuple[Tensor, DEQSolution]:
        x, y = batch
        pred, sol = self.run_backbone(x, training=split == "train")
        mse = F.mse_loss(pred, y)
        loss = self.regularized(mse, sol, split) if split == "train" else mse
        metrics = {f"{split}/loss": loss.detach(), f"{split}/mae": (pred - y).abs().mean().detach()}
        self.log_dict(metrics, on_step=split == "train", on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log_solution(sol, split, len(y))
        if split == "test":
            self._test_points.append((x.detach().cpu(), pred.detach().cpu(), y.detach().cpu()))
        return loss, sol
