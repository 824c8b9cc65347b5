"""Synchronised BatchNorm on every backend: ``--trainer.sync_batchnorm true`` under DDP on CPU.

Under DDP each process normalises with the statistics of its own shard of the batch, so N
processes do not reproduce one process (and small per-process batches give noisy statistics).
Lightning's ``sync_batchnorm=True`` converts BatchNorm layers to ``torch.nn.SyncBatchNorm``, which
raises on CPU tensors ("SyncBatchNorm expected input tensor to be on GPU"): CPU runs with the gloo
backend could not synchronise at all. :class:`CrossProcessBatchNorm` computes the batch mean and
variance over all processes with differentiable all-reduces (two per layer and step, any backend,
any device), so N processes normalise exactly as one process with the whole batch would, in the
forward pass and in the gradients. Every mdeq LightningModule swaps Lightning's plugin for
:class:`PortableSyncBatchNorm` when a Trainer asks for ``sync_batchnorm``; on CUDA it keeps
torch's fused ``SyncBatchNorm`` (faster), elsewhere it uses :class:`CrossProcessBatchNorm`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins import LayerSync, TorchSyncBatchNorm
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce (sum) of the incoming gradients: each
    process's input reaches every process's loss through the sum. (torch.distributed.nn's
    functional ``all_reduce`` does the same but is deprecated.)"""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _SumOverProcesses.apply(grad)


class CrossProcessBatchNorm(_BatchNorm):
    """BatchNorm (1d/2d/3d) whose training statistics are those of the batch across all processes
    of the default process group; outside training, or in one process, it is plain BatchNorm."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        dist = torch.distributed
        synced = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not synced:
            return super().forward(input)
        all_reduce = _SumOverProcesses.apply
        dims = [0, *range(2, input.dim())]
        shape = [1, -1, *([1] * (input.dim() - 2))]
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dims), count]))  # gradients flow back to every process
        n = sums[-1]
        mean = sums[:-1] / n
        centered = x - mean.view(shape)
        var = all_reduce(centered.square().sum(dims)) / n  # two passes: no E[x^2] - E[x]^2 cancellation
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y.to(input.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every BatchNorm layer replaced by a :class:`CrossProcessBatchNorm` holding
        the same parameters and running statistics (in place for children; returns the root)."""
        if isinstance(module, _BatchNorm) and not isinstance(module, (cls, nn.SyncBatchNorm)):
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            new.to(next(module.buffers(), next(module.parameters(), torch.empty(0))).device)
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            new.original_class = type(module)  # what revert() gives back
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module

    @classmethod
    def revert(cls, module: nn.Module) -> nn.Module:
        """The inverse of :meth:`convert`: the original BatchNorm classes, with the same state."""
        if isinstance(module, cls):
            new = getattr(module, "original_class", nn.BatchNorm2d)(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            new.to(module.running_mean.device if module.running_mean is not None else "cpu")
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.revert(child))
        return module


class PortableSyncBatchNorm(LayerSync):
    """Lightning's ``sync_batchnorm`` plugin for every backend: torch's ``SyncBatchNorm`` when the
    model lives on CUDA, :class:`CrossProcessBatchNorm` elsewhere (CPU with gloo, ...)."""

    def __init__(self) -> None:
        self._torch = TorchSyncBatchNorm()

    def apply(self, model: nn.Module) -> nn.Module:
        device = next(model.parameters(), torch.empty(0)).device
        if device.type == "cuda":
            return self._torch.apply(model)
        return CrossProcessBatchNorm.convert(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return CrossProcessBatchNorm.revert(self._torch.revert(model))


def use_portable_sync_batchnorm(trainer: pl.Trainer | Any) -> None:
    """When ``trainer`` was built with ``sync_batchnorm=True`` (Lightning's CUDA-only plugin),
    switch it to :class:`PortableSyncBatchNorm`. Called from every mdeq module's ``setup``, which
    Lightning runs before it converts the model."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and type(getattr(strategy, "_layer_sync", None)) is TorchSyncBatchNorm:
        strategy._layer_sync = PortableSyncBatchNorm()
