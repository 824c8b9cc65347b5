"""The honest cost of implicit depth: training throughput of mdeq_tiny relative to an explicit
CIFAR ResNet of similar parameter count (0.15M; mdeq_tiny has 0.16M), same batch, same optimiser.

The DEQ's cost is (forward f-evaluations + backward linear-solve evaluations) applications of
its cell; the ResNet's is one pass. Both run alternately in timed blocks (median images/s).
mdeq_tiny runs with its defaults (Anderson, rel. tol 1e-3, at most 30 steps, implicit backward)
and with a training budget of 12 steps (as the configs use), on a fixed random CIFAR-sized batch.

Usage: python benchmarks/deq_overhead.py [--batch 32] [--steps 5] [--blocks 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from _common import describe_device, median_throughput, rows_to_markdown, training_step_fn
from mdeq.models import mdeq_tiny


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet_small(widths: tuple[int, ...] = (18, 36, 54), blocks: tuple[int, ...] = (2, 2, 2), num_classes: int = 10) -> nn.Module:
    """A CIFAR ResNet (He et al. 2016 layout) with 0.15M parameters at the defaults (a ResNet-14)."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, (w, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    models = {
        "resnet_small": resnet_small(),
        "mdeq_tiny (max 30 steps)": mdeq_tiny(),
        "mdeq_tiny (max 12 steps)": mdeq_tiny(max_steps=12),
    }
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    steps = {name: training_step_fn(m.train().to(args.device), x, y) for name, m in models.items()}
    rates = median_throughput(steps, args.batch, args.steps, args.blocks)
    ref = rates["resnet_small"]
    rows = []
    for name, m in models.items():
        r = rates[name]
        nfe = ""
        if name.startswith("mdeq"):
            with torch.no_grad():
                nfe = m(x, return_solution=True)[1].nfe
        rows.append([name, f"{sum(p.numel() for p in m.parameters()):,}", f"{r:.1f}", f"{r / ref:.2f}x", nfe])
    print(f"\nTraining throughput vs an explicit ResNet (batch {args.batch}, torch {torch.__version__}, {describe_device(args.device)})\n")
    print(rows_to_markdown(["model", "params", "img/s", "relative to resnet_small", "forward f-evals"], rows))


if __name__ == "__main__":
    main()
