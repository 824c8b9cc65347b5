"""One evaluation for every caller: (model, data, budget) -> metrics, without Lightning.

``mdeq test``, ``mdeq export``, the equilibrium check (:mod:`mdeq.equilibrium_check`), the model
cards and the tests all measure through :func:`evaluate`, so a number in a card is the number a
user gets from the same call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mdeq.core.budget import SolverBudget, solver_budget
from mdeq.data.normalized import NormalizedTensorDataset
from mdeq.data.tasks import Task, get_task


@dataclass(frozen=True)
class Metrics:
    """What one evaluation measured (means are over samples unless said otherwise)."""

    accuracy: float
    top5: float
    loss: float
    """Mean cross-entropy."""
    nfe: float
    """Forward f-evaluations per batch, averaged with the batch sizes as weights."""
    residual_mean: float
    residual_max: float
    """The largest relative residual of any sample."""
    converged_fraction: float
    num_samples: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(data: Any, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    """(x, y) batches of a normalised dataset, a pair of tensors,
    any map-style dataset of (x, y) items, or an iterable of batches (a DataLoader)."""
    if isinstance(data, NormalizedTensorDataset):
        n = len(data)
        return (data.normalized(i, i + batch_size) for i in range(0, n, batch_size))
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"images and labels differ in number: {len(x)} vs {len(y)}")
        return ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size))
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        n = len(data)  # type: ignore[arg-type]

        def stacked():  # noqa: ANN202
            for i in range(0, n, batch_size):
                items = [data[j] for j in range(i, min(i + batch_size, n))]
                yield torch.stack([a for a, _ in items]), torch.as_tensor([int(b) for _, b in items])

        return stacked()
    if hasattr(data, "__iter__"):
        return data
    raise TypeError(f"cannot evaluate on {type(data).__name__}: give a task name, a dataset, (images, labels) or a DataLoader")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: str | Task | Any,
    budget: SolverBudget | None = None,
    *,
    root: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> Metrics:
    """Classification metrics of ``model`` (called as ``model(x, return_solution=True)``) on ``data``.

    ``data`` is a task name or :class:`~mdeq.data.tasks.Task` (its test split, the first ``limit``
    images when given, read from ``root``), a dataset of ``(image, label)`` items, a pair
    ``(images, labels)`` or an iterable of batches. ``budget`` overrides the DEQ layers' solver
    budget for this evaluation only (the layers keep their own settings). The model runs in eval
    mode on ``device`` (default: where its parameters are) and is put back in the mode it was in.
    Convergence is reported in the metrics (``converged_fraction``, residuals), not warned per batch.
    """
    if isinstance(data, (str, Task)):
        data = get_task(data).test_set(root, limit)
    elif limit is not None or root is not None:
        raise ValueError("root and limit apply when data is a task name")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    param = next(iter(model.parameters()), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    batches = _batches(data, batch_size)
    was_training = model.training
    model.eval()
    correct = top5 = loss = nfe = residual_sum = residual_max = converged = 0.0
    count = 0
    try:
        with solver_budget(replace(budget, quiet=True) if budget is not None else SolverBudget(quiet=True)):
            for x, y in batches:
                x, y = x.to(dev), y.to(dev)
                logits, sol = model(x, return_solution=True)
                n = len(y)
                k = min(5, logits.shape[-1])
                correct += float((logits.argmax(-1) == y).sum())
                top5 += float((logits.topk(k, dim=-1).indices == y[:, None]).any(-1).sum())
                loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
                nfe += float(sol.nfe) * n
                res = sol.residual.detach().double()
                residual_sum += float(res.sum())
                residual_max = max(residual_max, float(res.max())) if res.numel() else residual_max
                converged += float(sol.converged.sum())
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("nothing to evaluate: the data holds no samples")
    return Metrics(
        accuracy=correct / count,
        top5=top5 / count,
        loss=loss / count,
        nfe=nfe / count,
        residual_mean=residual_sum / count,
        residual_max=residual_max,
        converged_fraction=converged / count,
        num_samples=count,
    )


__all__ = ["Metrics", "evaluate"]
