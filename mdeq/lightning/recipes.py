"""DEQ training recipes shared by the LightningModules: Jacobian-regularization schedule, optimizer and learning-rate schedule, resumable random state."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "constant")


@dataclass
class JacobianSchedule:
    """Jacobian-regularization weight per step: ramps linearly from ``start_weight`` to
    ``weight`` over ``warmup_steps``, and is applied on a step with probability
    ``probability`` (a seeded draw per step, so resumed runs make the same draws)."""

    weight: float = 0.0
    probability: float = 1.0
    start_weight: float = 0.0
    warmup_steps: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.start_weight < 0:
            raise ValueError("Jacobian-regularization weights must be >= 0")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"jacobian_probability must be in [0, 1], got {self.probability}")

    def weight_at(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.weight
        return self.start_weight + (self.weight - self.start_weight) * step / self.warmup_steps

    def active(self, step: int) -> bool:
        if self.weight_at(step) <= 0:
            return False
        if self.probability >= 1.0:
            return True
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return bool(torch.rand((), generator=g) < self.probability)


def build_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """The named optimizer, torch's default implementation (multi-tensor on CUDA). Not the fused
    Adam kernels: Lightning refuses gradient clipping with them under mixed precision, and the
    default's step counters live on the host, so reading them is no device sync."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay to ``min_lr_ratio`` (or constant), stepped per batch."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")
    total = max(total_steps, 1)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(total - warmup_steps, 1))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) random states, for exact resumption."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        # plain types and tensors only: checkpoints stay loadable with weights_only=True
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))  # type: ignore[arg-type]
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
