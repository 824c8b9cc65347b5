"""Which solver copes when the map does not contract: convergence, f-evaluations and final
residual of every solver on three maps that defeat plain iteration.

- oscillating: f(z) = -1.5 z + x (linear, dimension 64): iteration diverges, but the flow
  dz/dt = f(z) - z is stable and z* = x / 2.5 exists;
- tanh, gain 1.3: f(z) = tanh(W z + x) with ||W||_2 = 1.3 (dimension 64, batch 32): locally
  expansive in places;
- mdeq_tiny with the paper's GroupNorm gains (1.0 instead of our 0.3 / 0.1): the cell is expansive
  at initialisation (power-iteration gain ~1.4), batch 8, CIFAR-sized random input.

All solves: relative tolerance 1e-3, at most 100 steps (ode: 100 step attempts).
Usage: python benchmarks/hard_maps.py [--tol 1e-3] [--max-steps 100]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from _common import rows_to_markdown
from mdeq.core.solvers import get_solver
from mdeq.models import mdeq_tiny

SOLVERS = ["fixed_point", {"name": "fixed_point", "damping": 0.5}, "anderson", "broyden", "newton_krylov", "ode", {"name": "fallback", "solvers": ["anderson", "broyden", "ode"]}]


def label(spec) -> str:  # noqa: ANN001
    if isinstance(spec, str):
        return spec
    opts = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({opts})"


def problems():  # noqa: ANN201
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    yield "oscillating f = -1.5 z + x", (lambda z: -1.5 * z + x), torch.zeros_like(x)
    w = torch.randn(64, 64)
    w = 1.3 * w / torch.linalg.matrix_norm(w, 2)
    xt = torch.randn(32, 64)
    yield "tanh, ||W|| = 1.3", (lambda z: torch.tanh(z @ w.T + xt)), torch.zeros_like(xt)
    model = mdeq_tiny(block_gain=1.0, post_fuse_gain=1.0).train()
    with torch.no_grad():
        xi = torch.randn(8, 3, 32, 32)
        inj = model.injection(model.stem(xi))
        f, z0, _, _ = model.deq.flat_problem(inj, model.initial_state(inj))
    yield "mdeq_tiny, paper gains (expansive at init)", f, z0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=100)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for name, f, z0 in problems():
        for spec in SOLVERS:
            solver = get_solver(spec)
            with torch.no_grad():
                t = time.perf_counter()
                r = solver.solve(f, z0, tol=args.tol, max_steps=args.max_steps)
                dt = time.perf_counter() - t
            rows.append([name, label(spec), f"{float(r.converged.float().mean()):.0%}", r.nfe, f"{float(r.residual.median()):.1e}", f"{float(r.residual.max()):.1e}", f"{dt:.2f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    print(f"\nSolvers on maps that defeat plain iteration (tol {args.tol:g} rel, max {args.max_steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print(rows_to_markdown(["map", "solver", "converged", "f-evals", "median rel. residual", "max rel. residual", "wall s"], rows))


if __name__ == "__main__":
    main()
