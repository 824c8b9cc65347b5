"""What the stability check of the equilibrium costs in training (issue #28).

The DEQ layer checks small states by itself (``stability="auto"``: the first training forward and
every 100th, up to 8 samples, min(20, dim) Jacobian-vector products); the ConvergenceGuard asks
larger layers for the same check every 500 steps. For each model this measures one training step
(forward, backward, Adam) without any check, the same step when it carries a check, and the
average overhead over the check's cadence. Interleaved, median of ``--repeats`` blocks.

Usage: python benchmarks/stability_check.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from _common import describe_device, rows_to_markdown
from mdeq import DEQ
from mdeq.models import mdeq_tiny
from mdeq.models.toy import DEQRegressor
from mdeq.nn.deq import STABILITY_EVERY


def toy() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], str, int]:
    torch.manual_seed(0)
    model = DEQRegressor()
    x = torch.arange(1.0, 11.0)[:, None]
    return model, lambda m: ((m(x) - 2 * x) ** 2).mean(), "forum toy (state dim 1, batch 10)", STABILITY_EVERY


class MLPCell(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        nn.init.normal_(self.b.weight, std=0.01)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(z))) + x


def mlp64() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], str, int]:
    torch.manual_seed(0)
    model = DEQ(MLPCell(64), tol=1e-4, max_steps=40)
    x, y = torch.randn(128, 64), torch.randn(128, 64)
    return model, lambda m: F.mse_loss(m(x)[0], y), "MLP DEQ (state dim 64, batch 128)", STABILITY_EVERY


def tiny() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], str, int]:
    torch.manual_seed(0)
    model = mdeq_tiny()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    return model, lambda m: F.cross_entropy(m(x), y), "mdeq_tiny (state dim 24,576, batch 32)", 500  # the guard's cadence


def step_time(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], opt: Any, check: bool) -> float:
    layer = next(m for m in model.modules() if isinstance(m, DEQ))
    layer.stability = "auto"
    layer.stability_warned = True  # time the check, not the warning
    if check:
        layer.request_stability_check()
    else:
        layer.stability = "never"
    t0 = time.perf_counter()
    opt.zero_grad()
    loss_fn(model).backward()
    opt.step()
    seconds = time.perf_counter() - t0
    assert (layer.last_stability is not None) or not check
    layer.last_stability = None
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rows = []
    for make in (toy, mlp64, tiny):
        model, loss_fn, label, every = make()
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        step_time(model, loss_fn, opt, False)  # warm-up
        step_time(model, loss_fn, opt, True)
        plain, checked = [], []
        for _ in range(args.repeats):
            plain.append(step_time(model, loss_fn, opt, False))
            checked.append(step_time(model, loss_fn, opt, True))
        p_med, c_med = statistics.median(plain), statistics.median(checked)
        extra = max(c_med - p_med, 0.0)
        rows.append([label, f"{p_med * 1e3:.2f}", f"{c_med * 1e3:.2f}", f"{extra / p_med:.1%}", str(every), f"{extra / every / p_med:.2%}"])
    print(f"device: {describe_device('cpu')}")
    print(rows_to_markdown(["model", "train step ms", "step with check ms", "check / step", "every n steps", "average overhead"], rows))


if __name__ == "__main__":
    main()
