"""f-evaluations and wall time each solver needs on the implicit-layers tutorial's conv cell.

48-channel ResNet-style cell with GroupNorm, conv weights N(0, 0.01), input injection x ~ N(0, 1).
Usage: python benchmarks/solver_nfe.py [--batch 32] [--size 32] [--tols 1e-3 1e-5]
"""

from __future__ import annotations

import argparse
import time

import torch

from mdeq import ConvResidualCell
from mdeq.core.solvers import get_solver, list_solvers


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-5])
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="wall time is the best of this many runs")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    cell = ConvResidualCell(48, 64, num_groups=8, init_std=0.01)
    x = torch.randn(args.batch, 48, args.size, args.size)
    z0 = torch.zeros(args.batch, x[0].numel())

    def f(z: torch.Tensor) -> torch.Tensor:
        return cell(z.view_as(x), x).flatten(1)

    with torch.no_grad():  # warm-up: first-call allocations and kernel selection
        get_solver("anderson").solve(f, z0, tol=1e-2, max_steps=5)
    print(f"| solver | tol (rel) | f-evals | max rel. residual | converged | wall s (best of N) |  (batch {args.batch}, {args.size}x{args.size}, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print("|---|---|---|---|---|---|")
    for tol in args.tols:
        for name in list_solvers():
            max_dim = getattr(get_solver(name), "max_dim", None)
            if max_dim is not None and z0.shape[1] > max_dim:  # newton, trust_region: dim f-evaluations per step
                print(f"| {name} | {tol:g} | - | - | - | not run: a dense {z0.shape[1]}-dim Jacobian per step (max_dim {max_dim}) |")
                continue
            times = []
            for _ in range(args.repeats):
                with torch.no_grad():
                    t = time.perf_counter()
                    r = get_solver(name).solve(f, z0, tol=tol, max_steps=args.max_steps)
                    times.append(time.perf_counter() - t)
            dt = min(times)
            print(f"| {name} | {tol:g} | {r.nfe} | {float(r.residual.max()):.2e} | {float(r.converged.float().mean()):.0%} | {dt:.2f} |")


if __name__ == "__main__":
    main()
