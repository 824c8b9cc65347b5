"""Warn before a run asks the CPU for a precision it can only emulate.

``bf16-mixed`` (and ``16-mixed``) speed training up on CPUs with native low-precision arithmetic
(AVX-512 BF16/FP16, AMX). On a CPU without it (AVX2 only) oneDNN emulates the low-precision
convolutions and the same step runs many times *slower* than in float32 (measured in
``benchmarks/RESULTS.md``, "Precision"), and nothing says why. The CLI calls
:func:`check_cpu_precision` when it builds the Trainer.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["SlowPrecisionWarning", "check_cpu_precision", "cpu_supports_natively", "slow_cpu_precision_message"]


class SlowPrecisionWarning(UserWarning):
    """The requested precision is emulated (not native) on this CPU, so training runs slower than float32."""


def _low_precision_dtype(precision: str) -> torch.dtype | None:
    """The reduced dtype a Lightning precision string computes in (``None`` for 32/64-bit)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def cpu_supports_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has native ``dtype`` arithmetic for oneDNN's convolutions and matmuls
    (AVX-512 BF16/FP16 or AMX); ``False`` means torch emulates it in software."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: do not guess "slow"
        pass
    return True


def slow_cpu_precision_message(precision: str, on_cpu: bool, native: bool | None = None) -> str | None:
    """The warning for running ``precision`` on this CPU, or ``None`` when it is fine.

    ``native`` overrides the hardware probe (for tests and for callers that already know)."""
    dtype = _low_precision_dtype(precision)
    if not on_cpu or dtype is None:
        return None
    if native is None:
        native = cpu_supports_natively(dtype)
    if native:
        return None
    name = str(dtype).replace("torch.", "")
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"trainer.precision={precision} on a CPU without native {name} arithmetic (torch reports {capability}): "
        f"{name} convolutions and matmuls are emulated here, so training runs about 12x slower than in float32 "
        f"(benchmarks/RESULTS.md). Use --trainer.precision 32-true on this machine; keep {precision} for GPUs "
        f"and CPUs with AVX-512 BF16/AMX."
    )


def check_cpu_precision(trainer: Any) -> str | None:
    """Warn (:class:`SlowPrecisionWarning`, once, on the global-zero process) when ``trainer`` runs a
    low precision that this CPU emulates. Returns the message, or ``None`` when there is nothing to say."""
    from lightning.pytorch.accelerators import CPUAccelerator

    msg = slow_cpu_precision_message(str(trainer.precision), isinstance(trainer.accelerator, CPUAccelerator))
    if msg is not None and trainer.is_global_zero:
        warnings.warn(msg, SlowPrecisionWarning, stacklevel=2)
    return msg
