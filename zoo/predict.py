"""Classify image files with a zoo model: one record per input with its class, probability and
whether the DEQ solve converged for it, written as CSV or JSON.

Images are prepared with timm's inference recipe from the model's ``pretrained_cfg`` (the card's
input size, channels, mean and std), which equals the training pipeline's preprocessing
(tests/zoo/test_timm_conformance.py)."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Prediction:
    """What the model says about one input: its top classes with probabilities (best first), and
    the solve's relative residual and verdict for this sample."""

    input: str
    classes: tuple[str, ...]
    class_indices: tuple[int, ...]
    probabilities: tuple[float, ...]
    converged: bool
    residual: float

    def row(self) -> dict[str, object]:
        """A flat record (CSV columns): the top class, its probability, then the other top-k."""
        out: dict[str, object] = {"input": self.input, "class": self.classes[0], "class_index": self.class_indices[0], "probability": round(self.probabilities[0], 6)}
        for k in range(1, len(self.classes)):
            out[f"class_{k + 1}"] = self.classes[k]
            out[f"probability_{k + 1}"] = round(self.probabilities[k], 6)
        out.update(converged=self.converged, residual=float(f"{self.residual:.4g}"))
        return out


def load_images(paths: Sequence[str | Path], model: nn.Module) -> Tensor:
    """The files as one batch, prepared as the model's ``pretrained_cfg`` says (gray or RGB, its
    input size, its mean and std). An unreadable file is an error naming it."""
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform, resolve_data_config

    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        raise ValueError("the model has no pretrained_cfg (build it with zoo.create or timm.create_model)")
    transform = create_transform(**resolve_data_config({}, model=model))
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(transform(im.convert(mode)))
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"cannot read image {p}: {err}") from err
    return torch.stack(images)


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, names: Sequence[str], labels: Sequence[str] | None = None, top_k: int = 1, batch_size: int = 64) -> list[Prediction]:
    """Class probabilities of ``model`` (called as ``model(x, return_solution=True)``) for
    ``inputs``, one :class:`Prediction` per input named by ``names``."""
    if len(names) != len(inputs):
        raise ValueError(f"{len(names)} names for {len(inputs)} inputs")
    model.eval()
    out: list[Prediction] = []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size]
        logits, sol = model(x, return_solution=True)
        probs = logits.float().softmax(-1)
        k = max(1, min(top_k, probs.shape[-1]))
        p, idx = probs.topk(k, dim=-1)
        for i in range(len(x)):
            ids = tuple(int(j) for j in idx[i])
            out.append(Prediction(
                input=str(names[start + i]),
                classes=tuple(labels[j] if labels is not None else str(j) for j in ids),
                class_indices=ids,
                probabilities=tuple(float(v) for v in p[i]),
                converged=bool(sol.converged[i]),
                residual=float(sol.residual[i]),
            ))
    return out


def write_predictions(predictions: Sequence[Prediction], path: str | Path | None) -> None:
    """CSV (``.csv``, or to stdout for None or ``-``) or JSON (``.json``: a list of records with
    the full top-k)."""
    if path is not None and str(path) != "-" and Path(path).suffix == ".json":
        Path(path).write_text(json.dumps([asdict(p) for p in predictions], indent=1) + "\n")
        return
    if path is not None and str(path) != "-" and Path(path).suffix != ".csv":
        raise ValueError(f"--output {path}: write .csv or .json (or - for CSV on stdout)")
    rows = [p.row() for p in predictions]
    fields = list(rows[0]) if rows else ["input", "class", "class_index", "probability", "converged", "residual"]
    fh = sys.stdout if path is None or str(path) == "-" else open(path, "w", newline="")
    try:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if fh is not sys.stdout:
            fh.close()
