"""Shared pieces of the side-by-side benchmarks: the test problems, f-evaluation counting,
interleaved best-of-N timing, and TorchDEQ (the peer) loaded on demand."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from mdeq import ConvResidualCell
from mdeq.models import mdeq_tiny


def require_torchdeq() -> Any:
    """Import TorchDEQ or exit with the install command (it is a benchmark-only dependency)."""
    try:
        import torchdeq  # noqa: F401
        import torchdeq.solver
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(f"TorchDEQ is needed for this benchmark: pip install torchdeq==0.1.0 ({e})") from e
    return torchdeq


class Counted:
    """Wrap a flat map f(z) and count its batched evaluations."""

    def __init__(self, f: Callable[[Tensor], Tensor]) -> None:
        self.f, self.calls = f, 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        return self.f(z)


def relative_residual(f: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """||f(z) - z|| / ||f(z)|| per sample: one yardstick for both libraries' answers."""
    with torch.no_grad():
        z = z.reshape(z.shape[0], -1)
        fz = f(z).reshape_as(z)
        return (fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-12)


def synchronize() -> None:
    """Wait for queued GPU work (timings must include it); nothing on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def describe_device(device: str | torch.device) -> str:
    """'cpu, 2 threads' or the GPU's name, for result headers."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)}"
    return f"cpu, {torch.get_num_threads()} threads"


def conv_cell_problem(batch: int = 32, size: int = 32, seed: int = 0, device: str = "cpu") -> tuple[Callable[[Tensor], Tensor], Tensor, str]:
    """The implicit-layers tutorial's cell: 48 channels, inner width 64, GroupNorm, N(0, 0.01)."""
    torch.manual_seed(seed)
    cell = ConvResidualCell(48, 64, num_groups=8, init_std=0.01).to(device)
    x = torch.randn(batch, 48, size, size).to(device)

    def f(z: Tensor) -> Tensor:
        return cell(z.view_as(x), x).flatten(1)

    return f, torch.zeros(batch, x[0].numel(), device=device), f"tutorial conv cell (48 ch, {size}x{size}, batch {batch})"


def mdeq_tiny_problem(batch: int = 32, seed: int = 0, device: str = "cpu") -> tuple[Callable[[Tensor], Tensor], Tensor, str]:
    """mdeq_tiny's equilibrium map f(z, x) at initialisation on a CIFAR-sized random batch, as a
    flat map (both branches packed into one vector per sample)."""
    torch.manual_seed(seed)
    model = mdeq_tiny().train().to(device)
    with torch.no_grad():
        x = torch.randn(batch, 3, 32, 32).to(device)
        inj = model.injection(model.stem(x))
        f, z0, _, _ = model.deq.flat_problem(inj, model.initial_state(inj))
    return f, z0, f"mdeq_tiny f (2 branches, 32x32, batch {batch})"


def time_best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls, and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        synchronize()
        t = time.perf_counter()
        out = fn()
        synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, Any]]:
    """Best-of-``repeats`` timing of several callables, alternating between them so that drift in
    machine load hits all of them alike."""
    best = {k: float("inf") for k in fns}
    out: dict[str, Any] = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            synchronize()
            t = time.perf_counter()
            out[k] = fn()
            synchronize()
            best[k] = min(best[k], time.perf_counter() - t)
    return {k: (best[k], out[k]) for k in fns}


def training_step_fn(model: nn.Module, x: Tensor, y: Tensor, lr: float = 1e-3) -> Callable[[], None]:
    """One AdamW training step (cross-entropy) of ``model`` on the fixed batch (x, y)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def median_throughput(steps: dict[str, Callable[[], Any]], images_per_call: int, calls_per_block: int, blocks: int) -> dict[str, float]:
    """Median images/second of each callable over ``blocks`` timed blocks, the callables taking
    turns block by block (after one warm-up call each)."""
    import statistics

    for fn in steps.values():
        fn()
    rates: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(blocks):
        for k, fn in steps.items():
            synchronize()
            t = time.perf_counter()
            for _ in range(calls_per_block):
                fn()
            synchronize()
            rates[k].append(calls_per_block * images_per_call / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in rates.items()}


class TorchDEQClassifier(nn.Module):
    """An MDEQ classifier whose equilibrium layer is TorchDEQ's instead of ours: the very same
    stem, f and head modules (a deep copy of ``model``), only the solve and backward differ."""

    def __init__(self, model: nn.Module, **deq_kwargs: Any) -> None:
        super().__init__()
        from torchdeq import get_deq

        self.model = copy.deepcopy(model)
        self.peer_deq = get_deq(**deq_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        inj = m.injection(m.stem(x))
        f, z0, packer, _ = m.deq.flat_problem(inj, m.initial_state(inj))
        z_out, _ = self.peer_deq(f, z0)
        return m.head(packer.unpack(z_out[-1]))


def rows_to_markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
