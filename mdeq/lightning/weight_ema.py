"""An exponential moving average of the weights that is what gets validated, checkpointed,
tested and exported.

Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` validates the average and
stores it as a checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``), but
when the same trainer then tests a checkpoint (``mdeq fit`` tests the best one after training) it
loads ``current_model_state``: the reported test accuracy would be that of the raw weights, not of
the average that was validated and that ``mdeq export`` ships. :class:`WeightEMA` restores the raw
weights only when resuming ``fit``, so every evaluation sees the average."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class WeightEMA(EMAWeightAveraging):
    """EMA of parameters and buffers, updated every ``update_every_n_steps`` optimiser steps
    from ``update_starting_at_step`` on; ``decay`` sets the window (about ``1 / (1 - decay)``
    updates). Validation, checkpoints' ``state_dict``, the test after ``fit`` and exports use the
    average; ``--ckpt_path last`` resumes both the raw weights and the average.

    The first update copies the weights (there is no bias correction), so the average starts at
    the weights training starts from: right for fine-tuning or a warm restart, and for training
    from scratch start it late (``update_starting_at_step``). There is no epoch-based start:
    Lightning's ``update_starting_at_epoch`` adds end-of-epoch updates but does not hold back the
    per-step ones, which is not what its name says."""

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        device: str | None = None,
        use_buffers: bool = True,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WeightEMA decay must lie in (0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"WeightEMA update_every_n_steps must be >= 1, got {update_every_n_steps}")
        if update_starting_at_step is not None and update_starting_at_step < 0:
            raise ValueError(f"WeightEMA update_starting_at_step must be >= 0, got {update_starting_at_step}")
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        self.decay = decay

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming ``fit``: restore the raw weights and the average. Anything else (test,
        validate, predict): keep the checkpoint's ``state_dict``, which is the average."""
        if trainer.state.fn != TrainerFn.FITTING:
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
