"""A regression LightningModule (the classic y = 2x DEQ toy and similar small problems)."""

from __future__ import annotations

from typing import Any, Union

import torch.nn.functional as F
from torch import Tensor, nn

from mdeq.core.solution import DEQSolution
from mdeq.lightning.classification import DEQLightningModule


class RegressionModule(DEQLightningModule):
    """Mean-squared-error training of a DEQ regressor (``forward(x, return_solution=True)``
    returns (prediction, solution)); logs loss, mean absolute error and solver statistics."""

    def __init__(self, backbone: Union[str, nn.Module] = "deq_toy_regressor", **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)

    def _step(self, batch: Any, split: str) -> tuple[Tensor, DEQSolution]:
        x, y = batch
        pred, sol = self.run_backbone(x, training=split == "train")
        mse = F.mse_loss(pred, y)
        loss = self.regularized(mse, sol, split) if split == "train" else mse
        metrics = {f"{split}/loss": loss.detach(), f"{split}/mae": (pred - y).abs().mean().detach()}
        self.log_dict(metrics, on_step=split == "train", on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log_solution(sol, split, len(y))
        return loss, sol
