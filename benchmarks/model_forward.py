"""Forward f-evaluations and CPU wall time per batch for the named models at initialisation.

Train mode (batch statistics) and eval mode after calibrating BatchNorm statistics on a few
batches. Usage: python benchmarks/model_forward.py [--batch 32] [--models mdeq_tiny conv_deq_small]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from mdeq import models

INPUT = {"gray": (1, 28, 28)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--models", nargs="+", default=["mdeq_tiny", "conv_deq_small"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    print(f"| model | params | mode | f-evals | frac rel. residual < 1e-2 | mean rel. residual | s / batch of {args.batch} (best of {args.repeats}) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = getattr(models, name)()
        shape = INPUT["gray"] if name.endswith("gray") else (3, 32, 32)
        x = torch.randn(args.batch, *shape)
        n = sum(q.numel() for q in model.parameters())
        for mode in ("train", "eval"):
            if mode == "eval":
                model.train()
                with torch.no_grad():
                    for _ in range(20):  # let BatchNorm running statistics settle
                        model.stem(x) if hasattr(model, "stem") else None
                model.eval()
            else:
                model.train()
            times = []
            for _ in range(args.repeats):
                with torch.no_grad():
                    t = time.perf_counter()
                    _, sol = model(x, return_solution=True)
                    times.append(time.perf_counter() - t)
            frac = float((sol.residual < 1e-2).float().mean())
            print(f"| {name} | {n:,} | {mode} | {sol.nfe} | {frac:.2f} | {float(sol.residual.mean()):.2e} | {min(times):.2f} |")


if __name__ == "__main__":
    main()
