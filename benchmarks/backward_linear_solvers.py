"""Backward linear solvers: wall time of one implicit backward (tol 1e-6) by state size.

tanh(W z + U x) cell with ||W|| = 0.9 (float32, batch 32); forward by anderson to tol 1e-6.
Usage: python benchmarks/backward_linear_solvers.py [--dims 8 32 64 128 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from mdeq import DEQ, ImplicitBackward, TanhCell


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dims", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"| state dim | linear solver | backward ms (best of {args.repeats}) | backward evals | max rel. residual |")
    print("|---|---|---|---|---|")
    for dim in args.dims:
        torch.manual_seed(0)
        cell = TanhCell(dim, 16)
        with torch.no_grad():
            w = cell.linear_z.weight
            w.mul_(0.9 / torch.linalg.matrix_norm(w, ord=2))
        x = torch.randn(args.batch, 16)
        for linear in ("iterative", "gmres", "dense"):
            deq = DEQ(cell, backward=ImplicitBackward(linear_solver=linear, tol=1e-6), tol=1e-6, max_steps=200, state_shape=(dim,))
            best = float("inf")
            for _ in range(args.repeats):
                z, sol = deq(x)
                loss = z.square().sum()
                t = time.perf_counter()
                loss.backward()
                best = min(best, time.perf_counter() - t)
            bw = sol.backward
            print(f"| {dim} | {linear} ({bw.solver}) | {1000 * best:.2f} | {bw.nfe} | {float(bw.residual.max()):.1e} |")


if __name__ == "__main__":
    main()
