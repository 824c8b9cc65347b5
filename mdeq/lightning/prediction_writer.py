"""``mdeq predict --config ... --ckpt_path ...``: the predictions of a trained module, one row per
input, written to ``<default_root_dir>/predictions.csv`` (or ``.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Writes each predicted batch's rows (sample index, class name and index, probability, the
    true label when the data has one, and whether the DEQ solve converged, with its residual).

    ``path`` defaults to ``<default_root_dir>/predictions.csv``; a ``.json`` path writes JSON. Under
    DDP every rank writes its own file (``predictions-rank<r>.csv``)."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.written: Path | None = None

    def target(self, trainer: pl.Trainer) -> Path:
        path = Path(self.path) if self.path else Path(trainer.default_root_dir) / "predictions.csv"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any, batch_indices: Sequence[int] | None, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if not isinstance(prediction, dict) or "probabilities" not in prediction:
            raise TypeError(f"{type(pl_module).__name__}.predict_step must return a dict with 'probabilities' (and 'converged', 'residual') for PredictionWriter")
        task = getattr(trainer.datamodule, "task", None) if trainer.datamodule is not None else None
        probs = prediction["probabilities"].float().cpu()
        p, idx = probs.max(-1)
        y = batch[1].cpu() if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        start = len(self.rows)
        for i in range(len(probs)):
            k = int(idx[i])
            row: dict[str, Any] = {
                "index": int(batch_indices[i]) if batch_indices is not None else start + i,
                "class": task.label(k) if task is not None else str(k),
                "class_index": k,
                "probability": round(float(p[i]), 6),
            }
            if y is not None:
                row["label"] = task.label(int(y[i])) if task is not None else str(int(y[i]))
            row["converged"] = bool(prediction["converged"][i])
            row["residual"] = float(f"{float(prediction['residual'][i]):.4g}")
            self.rows.append(row)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import csv
        import json

        path = self.target(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.rows, indent=1) + "\n")
        else:
            with open(path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(self.rows[0]) if self.rows else ["index", "class", "class_index", "probability"])
                writer.writeheader()
                writer.writerows(self.rows)
        self.written = path
        if trainer.is_global_zero:
            print(f"wrote {len(self.rows)} predictions to {path}")


def has_prediction_writer(callbacks: Sequence[Any]) -> bool:
    return any(isinstance(cb, BasePredictionWriter) for cb in callbacks)
